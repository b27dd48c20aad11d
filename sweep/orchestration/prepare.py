"""What the sweep launchers do around the jobs, the same on a laptop and on SLURM.

Before anything is queued: compose every job's config, check them ALL (bad ones are reported
together and nothing is queued), check the tracking server, create the MLflow experiment and the
synthetic dataset once (parallel jobs would race), and drop the (config, fold) pairs that already
have a FINISHED run, so a half-done sweep resumes where it stopped. After the jobs: a summary of
failures with their reasons, and one parent MLflow run per config (sweep.tracking.parents).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing as tp

from omegaconf import DictConfig

from sweep.core.errors import ConfigError, SweepConfigError
from sweep.core.runplan import RunPlan, plan_run
from sweep.jobs.fusing import (
    check_fusing,
    finished_fusing,
    fusing_experiment,
    fusing_plan,
    select_trained_config,
    trained_run,
)
from sweep.jobs.train import ensure_dataset
from sweep.resources.memory import apply_memory_policy, gpu_budget, record_skipped
from sweep.resources.standin import check_stand_in
from sweep.tracking import client as tracking
from sweep.tracking.client import finished_fold_runs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    idx: int
    overrides: list[str]
    cfg: DictConfig
    plan: RunPlan

    @property
    def pair(self) -> tuple[str, int]:
        return self.plan.config_key, self.plan.fold


@dataclasses.dataclass
class PreparedSweep:
    todo: list[Job]
    finished: list[tuple[Job, dict[str, float]]]  # skipped: FINISHED in MLflow, with its metrics
    duplicates: list[Job]
    tracking_uri: str
    experiment_id: str
    task: str = "train"
    skipped: list[tuple[Job, str]] = dataclasses.field(default_factory=list)  # not queued (GPU memory), why


def check_jobs(jobs: tp.Sequence[tuple[int, tp.Sequence[str], DictConfig]]) -> list[Job]:
    """Plan every job; raise SweepConfigError naming each bad one (index, overrides, field)."""
    planned, errors = [], []
    for idx, overrides, cfg in jobs:
        try:
            planned.append(Job(idx, list(overrides), cfg, plan_run(cfg)))
        except ConfigError as exc:
            errors.append(f"  #{idx} {' '.join(overrides)}: {exc}")
    if len(errors) == 1:  # one line, as a single run says it
        raise SweepConfigError(f"{errors[0].strip()} (1 of {len(jobs)} configs is invalid; nothing was queued)")
    if errors:
        raise SweepConfigError(f"{len(errors)} of {len(jobs)} configs are invalid; nothing was queued:\n" + "\n".join(errors))
    from model.devices import JIT_MANY_REPLICAS

    jit = [j for j in planned if j.plan.settings.jit_compile and gpu_budget(j.cfg).gpus > 1]
    if jit:  # every such job would fail at its first step (model.devices.check_jit)
        raise SweepConfigError("train.jit_compile: " + JIT_MANY_REPLICAS.format(n=gpu_budget(jit[0].cfg).gpus)
                               + f" ({len(jit)} of {len(jobs)} configs; nothing was queued)")
    uris = {j.plan.tracking_uri for j in planned}
    if len(uris) > 1:
        raise SweepConfigError(f"mlflow.tracking_uri differs between jobs ({sorted(uris)}); one sweep, one store")
    return planned


def prepare_sweep_or_exit(jobs: tp.Sequence[tuple[int, tp.Sequence[str], DictConfig]]) -> PreparedSweep:
    """:func:`prepare_sweep` for a launcher: a bad sweep ends the command with one ``error:`` line and exit
    status 2, as a single run does, instead of Hydra's traceback and status 1."""
    import sys

    from data.errors import DataError

    try:
        return prepare_sweep(jobs)
    except (SweepConfigError, ConfigError, DataError, tracking.TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def prepare_sweep(jobs: tp.Sequence[tuple[int, tp.Sequence[str], DictConfig]]) -> PreparedSweep:
    t0 = time.perf_counter()
    planned = check_jobs(jobs)
    # A laptop/synthetic stand-in on GPUs, or the paper profile on this CPU: refused before anything is queued.
    check_stand_in([j.cfg for j in planned], log=log)
    t1 = time.perf_counter()
    uri, experiment = planned[0].plan.tracking_uri, planned[0].plan.experiment
    tasks = {str(j.cfg.get("task", "train")) for j in planned}
    if len(tasks) > 1 or not tasks <= {"train", "fusing"}:
        raise SweepConfigError(f"task: one sweep runs one task (train or fusing), got {sorted(tasks)}")
    task = tasks.pop()
    skipped: list[tuple[Job, str]] = []
    if task == "train":  # runs that cannot fit their GPUs are refused, skipped or halved before anything runs

        try:
            planned, skipped, _ = apply_memory_policy(planned)
        except ConfigError as exc:
            raise SweepConfigError(str(exc)) from None
    tracking.check_tracking_uri(uri)
    if task == "fusing":

        errors = []
        try:  # resolved once (fusing.model=best can change while a sweep runs): every job gets the same config
            trained = select_trained_config(planned[0].cfg, planned[0].plan)
        except ConfigError as exc:
            raise SweepConfigError(f"fusing jobs cannot run; nothing was queued: {exc}") from None
        log.info("fusing: config %s (%s), %s", trained.config_key, trained.name, trained.note)
        # Quoted: an all-digit key must stay a string. The note keeps saying how the key was chosen.
        pin = [f"fusing.model='{trained.config_key}'", f"fusing.selection_note='{trained.note.replace(chr(39), '')}'"]
        for j in planned:  # every fold must have a trained model before any GPU time is spent
            try:
                check_fusing(j.cfg)
                j.plan = fusing_plan(j.plan, trained)
                j.overrides = [o for o in j.overrides if not o.lstrip("+~").startswith(
                    ("fusing.model=", "fusing.selection_note="))] + pin
                trained_run(j.plan)
            except ConfigError as exc:
                errors.append(f"  #{j.idx} {' '.join(j.overrides)}: {exc}")
        if errors:
            raise SweepConfigError(f"{len(errors)} of {len(planned)} fusing jobs cannot run; nothing was queued:\n"
                                   + "\n".join(errors))
        experiment = fusing_experiment(planned[0].cfg)
    made = set()  # before anything is written to MLflow: a bad dataset leaves the store as it was
    for j in planned:  # one synthetic dataset per distinct setting, made here rather than by racing jobs
        if str(j.plan.dataset) not in made:
            ensure_dataset(j.cfg)
            made.add(str(j.plan.dataset))
    experiment_id = tracking.ensure_experiment(uri, experiment)
    if skipped:

        for j, why in skipped:
            record_skipped(uri, experiment_id, j.plan, why, str(j.cfg.get("experiment_name", "single")))
            log.warning("%s: skipped, %s", j.plan.run_name, why)
    t2 = time.perf_counter()
    done = finished_fusing(uri, experiment_id) if task == "fusing" else finished_fold_runs(uri, experiment_id)
    todo, finished, duplicates, seen = [], [], [], set()
    for j in planned:
        if j.pair in seen:
            duplicates.append(j)
        elif j.pair in done:
            finished.append((j, done[j.pair]))
        else:
            todo.append(j)
        seen.add(j.pair)
    n_halved = sum(1 for j in planned if j.cfg.get("batch_halved"))
    log.info("sweep: %d jobs, %d already FINISHED in MLflow (skipped), %d duplicates, %d not fitting the GPUs "
             "(skipped), %d at a halved batch, %d to run (checked in %.1f s, MLflow and data %.1f s, finished runs "
             "%.1f s)", len(planned) + len(skipped), len(finished), len(duplicates), len(skipped), n_halved, len(todo),
             t1 - t0, t2 - t1, time.perf_counter() - t2)
    return PreparedSweep(todo, finished, duplicates, uri, experiment_id, task, skipped)


def summarize(failed: tp.Sequence[tuple[Job, str]], total: int) -> None:
    if not failed:
        log.info("sweep: all %d runs completed", total)
        return
    lines = "\n".join(f"  #{j.idx} {j.plan.run_name}: {why}" for j, why in failed)
    log.error("sweep: %d of %d runs FAILED:\n%s", len(failed), total, lines)
