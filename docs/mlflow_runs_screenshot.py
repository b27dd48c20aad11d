"""docs/mlflow_runs.png: the MLflow UI on one demo run's Table 2 experiment, in a real (headless) browser.

    apt-get install chromium && .venv/bin/pip install playwright==1.65.3     # once; nothing else needs them
    .venv/bin/python docs/mlflow_runs_screenshot.py --store demo/work/mlflow.db \\
        --experiment scaling-unet-table2 --out docs/mlflow_runs.png

Needs Debian's chromium and the ``playwright`` package beside the project (only this script uses them). Starts ``.venv/bin/mlflow ui`` on 127.0.0.1 on the store, opens the
experiment's page by the link a sweep prints (``sweep.tracking.client.ui_url``: MLflow 3.17's UI opens the GenAI
view unless the link or the browser's remembered switch says model training), shows the Dataset and Models columns and the metrics of Table 2, expands the parent runs so
their folds show nested under them, and saves the screenshot. Prints the page's text, so a missing column fails
loudly in the log.
"""
from __future__ import annotations

import argparse
import socket
import sqlite3
import subprocess
import sys
import time
import typing as tp
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from sweep.tracking.client import ui_url  # noqa: E402 - the link the sweep prints, so the picture is what users open
COLUMNS = ("Dataset", "Models")
METRICS = ("mean_iou", "iou_bone", "iou_degradation_layer", "iou_residual_material", "flops")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def experiment_id(db: Path, name: str) -> str:
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT experiment_id FROM experiments WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise SystemExit(f"error: --experiment: no experiment {name!r} in {db}")
    return str(row[0])


def wait_up(url: str, timeout_s: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"error: mlflow ui at {url} did not answer within {timeout_s:.0f} s")


def shoot(url: str, out: Path, chromium: str) -> tuple[str, list[str]]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                                              "--disable-background-networking", "--disable-sync"])
        pg = b.new_page(viewport={"width": 1700, "height": 1000})
        pg.goto(url)
        pg.wait_for_timeout(6000)
        try:  # the assistant side panel takes a third of the screen
            pg.locator("button[aria-label='Close']").last.click(timeout=2000)
        except Exception:  # noqa: BLE001 - no panel in this UI version
            pass
        pg.get_by_role("button", name="Columns", exact=True).click()
        pg.wait_for_timeout(800)
        dlg = pg.get_by_role("dialog")
        for name in COLUMNS:
            if not shown(pg, name):  # the dialog toggles: a click on a shown column would hide it
                dlg.get_by_text(name, exact=True).first.click()
                pg.wait_for_timeout(200)
        search = pg.get_by_placeholder("Search columns")
        for col in METRICS:
            search.fill(col)
            pg.wait_for_timeout(500)
            dlg.get_by_text(col, exact=True).first.click()
            pg.wait_for_timeout(200)
        pg.keyboard.press("Escape")
        pg.wait_for_timeout(1500)
        expanders = pg.locator("button[data-component-id*='runnamecellrenderer']")
        for i in range(min(2, expanders.count())):  # two parent runs with their folds nested under them
            expanders.nth(i).click()
            pg.wait_for_timeout(500)
        pg.wait_for_timeout(1500)
        out.parent.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(out))
        text = pg.locator("body").inner_text()
        missing = [c for c in COLUMNS if not shown(pg, c)]
        b.close()
    return text, missing


def shown(page, column: str) -> bool:
    """A column header of the runs table (the toolbar's "Datasets" filter does not count)."""
    return page.get_by_role("columnheader", name=column, exact=True).count() > 0


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=REPO / "demo" / "work" / "mlflow.db", help="the demo's sqlite store")
    ap.add_argument("--experiment", default="scaling-unet-table2")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow_runs.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--mlflow", default=str(REPO / ".venv" / "bin" / "mlflow"))
    args = ap.parse_args(argv)
    exp = experiment_id(args.store, args.experiment)
    port = free_port()
    server = subprocess.Popen([args.mlflow, "ui", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{args.store.resolve()}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_up(base)
        text, missing = shoot(ui_url(base, exp), args.out, args.chromium)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(text[:2000])
    if missing:
        print(f"error: the runs table shows no {', '.join(missing)} column", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
