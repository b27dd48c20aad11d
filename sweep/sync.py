"""``python -m sweep.sync``: copy the offline MLflow stores of a sweep's runs to the server (sweep.tracking.offline)."""

from __future__ import annotations

import sys
import typing as tp
from pathlib import Path

from sweep.orchestration.planning import expand_sweep
from sweep.tracking import client as tracking
from sweep.tracking.offline import sync_all


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sweep.sync", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="the sweep's Hydra overrides (paths.work, mlflow.*)")
    args = ap.parse_args(argv)
    try:
        base, _ = expand_sweep(list(args.overrides))
        counts = sync_all(Path(str(base.paths.checkpoints)), str(base.mlflow.tracking_uri), str(base.mlflow.experiment))
    except tracking.TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # composition errors from Hydra (a typo in an override): one line, as sweep.status
        if type(exc).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"synced: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
