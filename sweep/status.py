"""``python -m sweep.status``: where a sweep stands, from SLURM (squeue, sacct) and MLflow together.

    python -m sweep.status +experiment=compound hydra/launcher=slurm_v100 profile=paper   # the sweep's overrides
    python -m sweep.status --sweep-id 3f2a9c0d51e7 [--watch 60]                            # or its id

Per config and in total, the (config, fold) runs FINISHED (in MLflow) / RUNNING / PENDING /
REQUEUED (waiting to run again after a preemption or time-out) / FAILED (the SLURM state, e.g.
OUT_OF_MEMORY, TIMEOUT, NODE_FAIL, CANCELLED, and the last lines of the task's stderr) / never
queued; GPU-hours spent (sacct elapsed × GPUs, every attempt); time left, estimated from the
finished runs' wall time per predicted FLOP and the plan. It builds the parent run of every config
whose folds are all FINISHED, so parents need no waiting process. ``--watch N`` refreshes every N
seconds until nothing is alive. Exit status: 0 finished, 3 running (something is alive), 1 failed
(nothing alive and some runs not FINISHED), 2 bad input. Given an asynchronous Optuna sweep's overrides
(``+experiment=optuna``, ``optuna_asha``), it prints its study as ``python -m sweep.trials`` does.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import typing as tp
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
from sweep.orchestration.planning import expand_sweep
from sweep.orchestration.status import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_FINISHED,
    EXIT_RUNNING,
    PairStatus,
    SweepStatus,
    collect,
    render,
    resolve,
)
from sweep.orchestration.trials import print_study, study_folder
from sweep.slurm import record as sweep_record
from sweep.tracking import client as tracking
from sweep.tracking.offline import sync_all, sync_pairs


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.status", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="the sweep's Hydra overrides (as for `python -m sweep ... -m`)")
    ap.add_argument("--sweep-id", help="the id printed at submission (instead of the overrides' grid)")
    ap.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until nothing is alive")
    ap.add_argument("--no-parents", action="store_true", help="do not build the parent runs of complete configs")
    ap.add_argument("--sync", action="store_true",
                    help="first copy the runs' offline stores (mlflow.offline=true) to the server (sweep.sync)")
    args = ap.parse_args(argv)
    if args.watch is not None and not (math.isfinite(args.watch) and 0 < args.watch <= 86400):
        print("error: --watch: must be a number of seconds in (0, 86400]", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if not args.sweep_id:
            study = _optuna_study_folder(args.overrides)
            if study is not None:  # an asynchronous Optuna sweep: its study, not a grid of (config, fold) pairs
                return print_study(study)
        rec, uri, base = resolve(args.overrides, args.sweep_id)
        work = Path(str(base.paths.work))
        if not rec.experiment_id:
            print(render(SweepStatus(rec, [PairStatus(sweep_record.parse_pair(n), i["run_name"], "NEVER_QUEUED")
                                           for n, i in rec.pairs.items()], 0.0, None, [])))
            return EXIT_FAILED
        while True:
            if args.sync:

                print(f"synced: {sync_all(Path(str(base.paths.checkpoints)), uri, rec.experiment)}")
            else:  # runs that ended while the server was away (sweep.tracking.outbox) wait in their offline stores
                _sync_outage_endings(rec, Path(str(base.paths.checkpoints)), uri)
            st = collect(rec, uri, build_parents=not args.no_parents)
            if args.watch is not None and sys.stdout.isatty():
                print("\033[H\033[J", end="")
            print(render(st), flush=True)
            if args.watch is None or st.exit_code != EXIT_RUNNING:
                break
            time.sleep(args.watch)
            rec = sweep_record.load(work, rec.sweep_id) or rec  # a rerun may add arrays
    except (ValueError, tracking.TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # composition errors from Hydra: one line, not a traceback
        if type(exc).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if st.exit_code != EXIT_RUNNING and rec.mlflow_run_id:
        _close_sweep_run(uri, rec, st.exit_code)
    return st.exit_code


def _optuna_study_folder(overrides: tp.Sequence[str]) -> tp.Optional[Path]:
    """The study folder of an asynchronous Optuna sweep (hydra/sweeper=optuna_async), else None."""
    from omegaconf import OmegaConf

    cfg, _jobs = expand_sweep(list(overrides))
    sweeper = OmegaConf.select(cfg, "hydra.sweeper", default=None)
    if sweeper is None or not str(sweeper.get("_target_", "")).endswith("AsyncOptunaSweeper"):
        return None
    return study_folder(Path(str(cfg.paths.work)), str(sweeper.get("study_name") or "scaling-unet"))


def _sync_outage_endings(rec, checkpoints: Path, uri: str) -> None:
    """Copy the offline stores of this sweep's runs into their server runs (only what is missing; cheap when none)."""

    dirs = [checkpoints / key / f"fold{fold}" for key, fold in map(sweep_record.parse_pair, rec.pairs)]
    counts = sync_pairs(dirs, uri, rec.experiment)
    if counts.runs_created or counts.metrics or counts.finished or counts.artifacts:
        print(f"synced offline stores: {counts}")


def _close_sweep_run(uri: str, rec, code: int) -> None:
    """The sweep's MLflow run ends FINISHED or FAILED once nothing is alive (once)."""
    try:
        sweep_record.close_mlflow(uri, rec, "FINISHED" if code == EXIT_FINISHED else "FAILED")
    except Exception as exc:  # the status itself is printed; the sweep run is bookkeeping
        print(f"warning: could not close the sweep's MLflow run: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
