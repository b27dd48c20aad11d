"""``python -m sweep.trials <study folder>``: an asynchronous Optuna study's trials per state (pruned ones apart),
its worker slots alive in SLURM, and the idle slot-time so far (sweep/orchestration/trials.py)."""

from __future__ import annotations

import sys
import typing as tp
from pathlib import Path

from sweep.orchestration.trials import print_study, study_summary  # noqa: F401 - study_summary: also this module's API


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    """``python -m sweep.trials <study folder>``: trials per state and the idle slot-time so far."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sweep.trials", description=main.__doc__)
    ap.add_argument("folder", type=Path, help="the study folder (work/optuna/<study name>), printed by the sweep")
    args = ap.parse_args(argv)
    return print_study(args.folder)


if __name__ == "__main__":
    sys.exit(main())
