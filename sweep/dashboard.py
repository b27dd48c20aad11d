"""``python -m sweep.dashboard <study folder> [--port 8080]``: Optuna's own dashboard on this project's study, read-only.

optuna-dashboard opens the study's storage (``study.json`` names it: ``journal:<file>`` or an RDB URL) and serves
its trials, their intermediate values (the rungs a pruner judged), the Pareto front of a two-objective study and
parameter importances. It can also write (notes, trial states): so the dashboard gets a SNAPSHOT of a journal,
copied up to its last complete line, never the live file the sweep's slots append to; an RDB study is served as it
is (grant the dashboard a read-only database user). Binds 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import typing as tp
from pathlib import Path

from sweep.orchestration.trials import STUDY_RECORD


class DashboardError(ValueError):
    """A bad study folder or record; the message names it."""


def study_storage(folder: Path) -> tuple[str, str]:
    """(storage, study name) from ``<folder>/study.json``; DashboardError naming the file."""
    record = Path(folder) / STUDY_RECORD
    try:
        rec = json.loads(record.read_text())
        return str(rec["storage"]), str(rec["study_name"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DashboardError(f"{record}: not a study record ({exc})") from None


def journal_snapshot(journal: Path, into: Path) -> Path:
    """A copy of the journal up to its last complete line (a slot may be writing the next one right now)."""
    if not journal.is_file():
        raise DashboardError(f"the journal {journal} does not exist")
    out = into / journal.name
    with open(journal, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        out.write_bytes(data[: data.rfind(b"\n") + 1])
    return out


def open_storage(storage: str, snapshot_dir: Path):
    """The Optuna storage the dashboard reads: a journal's snapshot, or the RDB URL as given."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if storage.startswith("journal:"):
        copy = journal_snapshot(Path(storage[len("journal:"):].removeprefix("//")).expanduser(), snapshot_dir)
        return optuna.storages.JournalStorage(JournalFileBackend(str(copy)))
    return optuna.storages.RDBStorage(storage)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.dashboard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="the study folder (work/optuna/<study name>), printed by the sweep")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port: must be 1..65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        storage, name = study_storage(args.folder)
        with tempfile.TemporaryDirectory(prefix="scaling-unet-dashboard-") as tmp:
            st = open_storage(storage, Path(tmp))
            if name not in {s.study_name for s in st.get_all_studies()}:
                raise DashboardError(f"{args.folder / STUDY_RECORD}: study {name!r} is not in its storage")
            from optuna_dashboard import run_server

            print(f"optuna-dashboard: study {name!r} (a snapshot of {storage}) at http://{args.host}:{args.port}/",
                  flush=True)
            run_server(st, host=args.host, port=args.port)
    except DashboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
