"""The README stays a ten-minute read and every relative link in it and in docs/ resolves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", title)))
    return out


def test_readme_is_short():
    assert len((REPO / "README.md").read_text(encoding="utf-8")) <= 12_000


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page: Path):
    bad = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, "\n".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, page.name


def _demo_story(*args: str, cwd: Path = REPO) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(REPO / "docs" / "demo_story.py"), *args], cwd=cwd, text=True,
                          capture_output=True, timeout=120)


def test_readme_demo_block_is_one_kept_demo_run():
    """README's Table 2, ensemble and Table 3 figures are rendered from docs/demo_run/ (one `make demo`)."""
    res = _demo_story("readme", "--check")
    assert res.returncode == 0, res.stderr
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    kept = (REPO / "docs" / "demo_run" / "table2.md").read_text(encoding="utf-8")
    rows = [line for line in kept.splitlines() if line.startswith("| Avr 9-planes")]
    assert rows and all(r in readme for r in rows)


def test_demo_phase_times_are_logged_and_a_failed_phase_is_refused(tmp_path):
    log = tmp_path / "phases.jsonl"
    assert _demo_story("time", "--log", str(log), "--phase", "grid", "--", "true").returncode == 0
    assert _demo_story("time", "--log", str(log), "--phase", "fusing", "--", "sh", "-c", "exit 3").returncode == 3
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["phase"], r["rc"]) for r in recs] == [("grid", 0), ("fusing", 3)]
    assert "core" in recs[0]["machine"] and recs[0]["seconds"] >= 0
    reports = tmp_path / "reports"
    reports.mkdir()
    res = _demo_story("keep", "--reports", str(reports), "--phases", str(log))
    assert res.returncode != 0 and "fusing" in res.stderr and "failed" in res.stderr
