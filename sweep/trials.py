"""Asynchronous Optuna: N worker slots, each asking the shared study for a trial as soon as its last one ended.

hydra-optuna-sweeper asks ``n_jobs`` trials, launches them as one batch and waits for the slowest
before it asks again (hydra #2257, #2435, PR #2461): with trials of uneven length most slots idle.
Here the sweeper (hydra_plugins.scaling_unet.optuna_async) starts ``n_jobs`` long-lived workers, one
SLURM job array of that many tasks (or as many local processes). Each worker, in a loop:

1. claims a trial under a file lock beside the study, so the study never holds more than ``n_trials``:
   its own RUNNING trial first (a requeued job resumes the trial it was preempted in; the training
   resumes from its checkpoint), then a RUNNING trial whose worker is dead (adopted), then a new one;
2. runs it as a Hydra job through the same task function as every sweep (MLflow run, lease, checks);
3. tells the study the objectives (or FAIL), and claims the next trial, until none is left.

Every slot appends its trials' start and end to ``<study folder>/slots/<slot>.jsonl``; :func:`idle_share`
turns such intervals into the idle slot-time (``python -m sweep.trials`` reports it for a study).
"""

from __future__ import annotations

import json
import sys
import typing as tp
from pathlib import Path

from sweep.orchestration.trials import (
    STUDY_RECORD,
    StudyError,
    check_storage,
    format_idle,
    idle_share,
    lease_waits,
    open_storage,
    read_timelines,
    trial_intervals,
)
from sweep.slurm.queue import SlurmQueryError, live_tasks


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    """``python -m sweep.trials <study folder>``: trials per state and the idle slot-time so far."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sweep.trials", description=main.__doc__)
    ap.add_argument("folder", type=Path, help="the study folder (work/optuna/<study name>), printed by the sweep")
    args = ap.parse_args(argv)
    try:
        rec = json.loads((args.folder / STUDY_RECORD).read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {args.folder / STUDY_RECORD}: not a study record ({exc})", file=sys.stderr)
        return 2
    missing = [k for k in ("study_name", "storage", "n_trials", "n_slots") if k not in rec] if isinstance(rec, dict) \
        else ["a JSON object"]
    if missing:
        print(f"error: {args.folder / STUDY_RECORD}: not a study record (no {', '.join(missing)})", file=sys.stderr)
        return 2
    try:
        storage = check_storage(rec["storage"])
        if storage.startswith("journal:"):
            journal = Path(storage[len("journal:"):].removeprefix("//")).expanduser()
            if not journal.is_file():  # never made here: reading it would create an empty journal
                raise StudyError(f"the journal {journal} named by {args.folder / STUDY_RECORD} does not exist")
        counts = study_summary(storage, rec["study_name"])
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a corrupt journal or an unreadable database: one line
        print(f"error: study {rec.get('study_name')!r} in {rec.get('storage')}: cannot be read: "
              f"{type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        return 2
    arrays = rec.get("array_ids", [])
    workers = ""
    if arrays:

        try:
            live = live_tasks(arrays)
            states = sorted({t.state for t in live.values()})
            workers = f"; {len(live)} worker slot(s) alive in SLURM" + (f" ({', '.join(states)})" if states else "")
        except SlurmQueryError as exc:
            workers = f"; SLURM could not be asked ({exc})"
    shown = {k: v for k, v in counts.items() if k != "given_up"}
    print(f"study {rec['study_name']}: " + (", ".join(f"{v} {k}" for k, v in sorted(shown.items())) or "no trials yet")
          + f" of {rec['n_trials']} trials; arrays {','.join(arrays) or '-'}{workers}")
    events = read_timelines(args.folder)
    print(format_idle(idle_share(trial_intervals(events), int(rec["n_slots"]))))
    for line in lease_waits(events):
        print(line)
    if counts.get("PRUNED"):
        given_up = counts.pop("given_up", 0)
        print(f"pruned: {counts['PRUNED'] - given_up} by the pruner (stopped early at a checkpoint)"
              + (f", {given_up} given up (duplicates of a trial another slot trained)" if given_up else ""))
    left = rec["n_trials"] - counts.get("COMPLETE", 0) - counts.get("FAIL", 0) - counts.get("PRUNED", 0)
    return 0 if left <= 0 else 3


def study_summary(storage: str, study_name: str) -> dict[str, int]:
    import optuna

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
        if t.state == optuna.trial.TrialState.PRUNED and "given_up" in t.user_attrs:
            counts["given_up"] = counts.get("given_up", 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
