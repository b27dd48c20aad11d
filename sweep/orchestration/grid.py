"""One batch of a grid sweep around a launcher, the same on the local pool and on SLURM.

Before anything is queued, :func:`sweep.orchestration.prepare.prepare_sweep` checks every config, skips FINISHED and
memory-refused runs, and drops duplicates. The launcher then gets hints: on the pool, groups of runs that share
a traced model; on SLURM, one array per time group, each submission recorded (sweep.slurm.record) before any wait,
and pairs held by live jobs left to them. After the jobs: offline stores synced, one parent MLflow run per config,
and a summary of failures with their reasons.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import typing as tp
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig

from hydra_plugins.scaling_unet.hints import JobGroup, LaunchHints
from hydra_plugins.scaling_unet.pool import sweep_dir
from hydra_plugins.scaling_unet.slurm_array import SlurmArrayLauncher, not_waited_return
from model.schedule import model_key
from sweep.core.fold_pruning import fold_pruning_setting
from sweep.core.results import failure_reason, objective_values
from sweep.orchestration.planning import launcher_params
from sweep.orchestration.prepare import (
    Job,
    PreparedSweep,
    prepare_sweep_or_exit,
    summarize,
)
from sweep.resources.groups import job_groups, measured_rate
from sweep.resources.memory import halved_reason
from sweep.slurm import record as sweep_record
from sweep.slurm.lease import LeaseHeld, live_holders
from sweep.slurm.queue import SlurmQueryError
from sweep.tracking.client import finished_fold_runs, is_server_uri, redact_uri, ui_url
from sweep.tracking.offline import sync_pairs
from sweep.tracking.parents import link_parent_runs

log = logging.getLogger("hydra_plugins.scaling_unet.launchers")  # the name the sweep's log lines always had

Results = dict[int, tuple[Job, JobReturn]]


def _returned(job: Job, value: tp.Any, note: str) -> JobReturn:
    return JobReturn(overrides=job.overrides, cfg=job.cfg, status=JobStatus.COMPLETED, _return_value=value,
                     task_name=note)


def _failed(job: Job, exc: BaseException) -> JobReturn:
    return JobReturn(overrides=job.overrides, cfg=job.cfg, status=JobStatus.FAILED, _return_value=exc)


def _prepared_returns(prepared: PreparedSweep) -> Results:
    """Results of the jobs that run nowhere: FINISHED in MLflow already, or skipped (GPU memory; NaN IoU)."""
    results = {j.idx: (j, _returned(j, objective_values(j.cfg, m), "skipped (FINISHED in MLflow)"))
               for j, m in prepared.finished}
    for j, why in prepared.skipped:
        results[j.idx] = (j, _returned(j, objective_values(j.cfg, {"mean_iou": float("nan"), "flops": j.plan.flops}),
                                       f"not queued: {why}"))
    return results


def _keep(job: Job, ret: JobReturn, results: Results, failed: list, where: str) -> None:
    """Keep a job's result; log it, and a failure at once with its reason."""
    if ret.cfg is None:
        ret.cfg = job.cfg
    results[job.idx] = (job, ret)
    if ret.status == JobStatus.COMPLETED:
        log.info("%s %s done", where, job.plan.run_name)
    else:
        why = failure_reason(ret._return_value)
        failed.append((job, why))
        log.error("%s %s FAILED: %s", where, job.plan.run_name, why)


def _finish(prepared: PreparedSweep, results: Results, failed: list, parent_runs: bool) -> list[JobReturn]:
    if prepared.task == "train" and prepared.todo:  # runs that ended while the server was away: complete them first
        try:
            counts = sync_pairs({j.plan.ckpt_dir for j in prepared.todo}, prepared.tracking_uri,
                                prepared.todo[0].plan.experiment)
            if counts.runs_created or counts.finished or counts.metrics:
                log.info("offline stores synced: %s", counts)
        except Exception as exc:  # the offline stores stay; python -m sweep.sync copies them later
            log.error("could not sync the runs' offline stores: %s (python -m sweep.sync copies them later)", exc)
    if parent_runs and prepared.task == "train":  # fusing runs have their own parents (sweep.jobs.fusing)
        keys = {j.plan.config_key for j in prepared.todo} | {j.plan.config_key for j, _ in prepared.finished}
        try:
            link_parent_runs(prepared.tracking_uri, prepared.experiment_id, keys)
        except Exception as exc:  # the fold runs are safe in MLflow; parents can be rebuilt later
            log.error("could not create the parent runs: %s", exc)
    for dup in prepared.duplicates:
        first = next(r for j, r in results.values() if j.pair == dup.pair)
        results[dup.idx] = (dup, first)
    summarize(failed, len(prepared.todo))
    if prepared.experiment_id is not None:
        local = "" if is_server_uri(prepared.tracking_uri) else \
            f" (after: mlflow ui --backend-store-uri {redact_uri(prepared.tracking_uri)})"
        log.info("the runs in the MLflow UI: %s%s", ui_url(prepared.tracking_uri, prepared.experiment_id), local)
    return [results[i][1] for i in sorted(results)]


def launch_batch(launcher: tp.Any, config: DictConfig, composed: list[tuple[int, list[str], DictConfig]]
                 ) -> list[JobReturn]:
    """Run one batch of the sweep's jobs (index, overrides, composed config) on ``launcher``."""
    if hasattr(launcher, "check_settings"):  # a bad launcher setting is refused before any data or run is written
        launcher.check_settings()
    prepared = prepare_sweep_or_exit(composed)
    sweep_dir(config)
    params = launcher_params(config)
    parent_runs = bool(params.get("parent_runs", True))
    if isinstance(launcher, SlurmArrayLauncher):
        return _on_slurm(launcher, config, prepared, params, parent_runs)
    results, failed = _prepared_returns(prepared), []
    # Pairs another live process trains (a single run, another sweep): left to it, as the SLURM path leaves them.
    held = live_holders({j.pair: j.plan.ckpt_dir for j in prepared.todo}) if prepared.task == "train" else {}
    held_jobs = [(j, f"trained by {who}") for j in prepared.todo if (who := held.get(j.pair))]
    for j, who in held_jobs:
        results[j.idx] = (j, _failed(j, LeaseHeld(f"{j.plan.run_name}: {who}")))
    if held_jobs:
        log.warning("%d runs left to live processes (not run):\n%s", len(held_jobs),
                    "\n".join(f"  {j.plan.run_name}: {who}" for j, who in held_jobs))
    todo = sorted((j for j in prepared.todo if j.pair not in held),
                  key=lambda j: (j.plan.input_size, j.plan.config_key, j.plan.fold))
    if todo:
        launcher.hints = LaunchHints(job_idx=[j.idx for j in todo], names=[j.plan.run_name for j in todo],
                                     groups=pool_groups(todo),
                                     on_result=lambda p, ret, where: _keep(todo[p], ret, results, failed, where))
        rets = launcher.launch([j.overrides for j in todo], todo[0].idx)
        for j, ret in zip(todo, rets):  # a launcher without hints reports only here
            if j.idx not in results:
                _keep(j, ret, results, failed, "")
    # A lease taken between the check above and the run's start: the run refused it (LeaseHeld), not a failure.
    held_jobs += [(j, why.removeprefix(f"LeaseHeld: {j.plan.run_name}: ")) for j, why in failed
                  if why.startswith("LeaseHeld:")]
    failed[:] = [(j, why) for j, why in failed if not why.startswith("LeaseHeld:")]
    returns = _finish(prepared, results, failed, parent_runs)
    if held_jobs:
        j, why = held_jobs[0]
        others = f" (and {len(held_jobs) - 1} more, listed above)" if len(held_jobs) > 1 else ""
        print(f"error: {j.plan.run_name}: {why}{others}; the other runs of the sweep ran: run the same command "
              "again when it has ended", file=sys.stderr)
        raise SystemExit(3)  # as a single run on a held lease exits: another live job trains it
    return returns


def _cost(job: Job) -> float:
    return float(job.plan.flops) * job.plan.settings.max_iters


def pool_groups(todo: tp.Sequence[Job]) -> list[JobGroup]:
    """Runs that can share a built model (same width, depth, precision: ``model.schedule.model_key``; all folds and
    input sizes) in one group, run back to back by one worker: the training step is traced once or twice."""
    by_model: dict[tuple, list[int]] = {}
    for p, j in enumerate(todo):
        by_model.setdefault(model_key(j.plan.width, j.plan.depth, j.plan.settings), []).append(p)
    return [JobGroup(ps, cost=sum(_cost(todo[p]) for p in ps)) for ps in by_model.values()]


# ----------------------------------------------------------------------------- SLURM


def run_cost(job: Job) -> float:
    """Predicted cost of one run (training FLOPs to the iteration cap): orders tasks, splits groups, time left."""
    return float(job.plan.flops) * job.plan.settings.batch_size * job.plan.settings.max_iters


def _sweep_record(prepared: PreparedSweep, params: tp.Mapping[str, tp.Any]) -> sweep_record.SweepRecord:
    jobs = prepared.todo + [j for j, _ in prepared.finished] + [j for j, _ in prepared.skipped]
    pairs = {sweep_record.pair_name(j.pair): {"run_name": j.plan.run_name, "cost": run_cost(j),
                                              "config_key": j.plan.config_key, "fold": j.plan.fold}
             for j in jobs}
    # Fusing runs live in their own experiment: named by id so they never mix with the training sweeps.
    experiment = str(jobs[0].plan.experiment) if prepared.task == "train" else f"fusing:{prepared.experiment_id}"
    return sweep_record.SweepRecord(
        sweep_id=sweep_record.sweep_id(experiment, [j.pair for j in jobs]), experiment=experiment,
        experiment_id=str(prepared.experiment_id), tracking_uri=redact_uri(prepared.tracking_uri),
        num_folds=jobs[0].plan.num_folds, pairs=pairs,
        skipped={sweep_record.pair_name(j.pair): why for j, why in prepared.skipped},
        halved={sweep_record.pair_name(j.pair): halved_reason(j.cfg) for j in jobs if halved_reason(j.cfg)},
        parallelism=params.get("array_parallelism"), max_num_timeout=params.get("max_num_timeout"))


def _on_slurm(launcher: SlurmArrayLauncher, config: DictConfig, prepared: PreparedSweep,
              params: dict[str, tp.Any], parent_runs: bool) -> list[JobReturn]:
    """Record the sweep, leave pairs to live jobs, one array per time group; wait (or not) and finish."""
    results, failed = _prepared_returns(prepared), []
    jobs_all = prepared.todo + [j for j, _ in prepared.finished] + [j for j, _ in prepared.skipped]
    work = Path(str(jobs_all[0].cfg.paths.work))
    rec = _sweep_record(prepared, params)
    rate = measured_rate(prepared.finished, params)
    try:
        live = sweep_record.live_pairs(work, rec.experiment, {j.pair: j.plan.ckpt_dir for j in prepared.todo},
                                       leases=prepared.task == "train")
    except SlurmQueryError as exc:  # queueing blind could start a second job on a pair
        print(f"error: cannot tell which runs SLURM still runs ({exc}); nothing was queued", file=sys.stderr)
        raise SystemExit(1)
    left = [j for j in prepared.todo if j.pair in live]
    if left:
        log.warning("%d runs left to live jobs (not queued again):\n%s", len(left),
                    "\n".join(f"  {j.plan.run_name}: {live[j.pair]}" for j in left))
    todo: list[Job] = []
    groups: list[JobGroup] = []
    for g in job_groups([j for j in prepared.todo if j.pair not in live], params, rate):
        if g.items and fold_pruning_setting(g.items[0].cfg, g.items[0].plan.num_folds).on:
            # Fold-major order: a config's later folds start after the other configs' first ones, so they can be judged.
            g.items.sort(key=lambda j: j.plan.fold)
        groups.append(JobGroup(list(range(len(todo), len(todo) + len(g.items))), name=g.name, time_min=g.time_min,
                               parallelism=g.parallelism))
        todo.extend(g.items)
    state = {"rec": rec, "submitted": []}

    def on_array(group: JobGroup, array_id: str, n: int) -> None:
        sub = sweep_record.Submission(array_id=array_id, tasks=[sweep_record.pair_name(todo[p].pair)
                                                                 for p in group.positions],
                                      time_min=group.time_min or int(params.get("timeout_min") or 0),
                                      submitit_folder=str(params["submitit_folder"]), submitted_at=time.time(),
                                      group=group.name)
        state["rec"] = sweep_record.update(work, state["rec"], lambda r: r.submissions.append(sub))
        log.info("submitted %d runs as ONE SLURM job array %s (group %s, --time=%s, at most %s at a time)",
                 n, array_id, group.name, group.time_min, group.parallelism or params.get("array_parallelism"))

    def on_submitted(submitted: list[tuple[str, int]]) -> None:
        state["submitted"] = submitted
        r = sweep_record.update(work, state["rec"])
        sweep_record.write_pointer(Path(str(config.hydra.sweep.dir)), r, sweep_record.record_path(work, r.sweep_id))
        try:
            r.mlflow_run_id = sweep_record.sync_mlflow(prepared.tracking_uri, r)
            sweep_record.update(work, r, lambda x: setattr(x, "mlflow_run_id", r.mlflow_run_id))
        except Exception as exc:  # the record file has it all; the MLflow sweep run is a convenience
            log.error("could not record the sweep in MLflow: %s", exc)
        state["rec"] = r
        _how_to_follow(r, submitted, left, work)

    if todo:
        launcher.hints = LaunchHints(job_idx=[j.idx for j in todo], names=[j.plan.run_name for j in todo],
                                     groups=groups, on_array=on_array, on_submitted=on_submitted,
                                     on_result=lambda p, ret, where: _keep(todo[p], ret, results, failed, where))
        rets = launcher.launch([j.overrides for j in todo], todo[0].idx)
    else:
        on_submitted([])
        rets = []
    if not launcher.wait:
        for j, ret in zip(todo, rets):
            results[j.idx] = (j, ret)
        for j in left:
            results[j.idx] = (j, _not_waited(j, f"left to {live[j.pair]}"))
        for dup in prepared.duplicates:
            results[dup.idx] = (dup, _not_waited(dup, "duplicate"))
        return [results[i][1] for i in sorted(results)]
    _wait_for_live(left, prepared, rec.experiment, results, failed, launcher.poll_interval_s)
    returns = _finish(prepared, results, failed, parent_runs)
    try:  # it waited for every run: its MLflow run ends here, as sweep.status would end it (it stayed RUNNING)
        sweep_record.close_mlflow(prepared.tracking_uri, state["rec"], "FAILED" if failed else "FINISHED")
    except Exception as exc:  # bookkeeping: the runs themselves are recorded
        log.warning("could not close the sweep's MLflow run: %s", exc)
    return returns


def _not_waited(job: Job, note: str) -> JobReturn:
    ret = not_waited_return(job.overrides, note)
    ret.cfg = job.cfg
    return ret


def _how_to_follow(rec: sweep_record.SweepRecord, submitted: list[tuple[str, int]], left: list[Job],
                   work: Path) -> None:
    arrays = sorted({job_id.split("_")[0] for job_id, _ in submitted})
    env = f"SCALING_UNET_WORK={work} " if os.environ.get("SCALING_UNET_WORK") else ""
    log.info("sweep %s: %d runs queued in array(s) %s, %d left to live jobs; record %s\n"
             "  follow:  %spython -m sweep.status --sweep-id %s [--watch 60]   (or the same overrides)\n"
             "  cancel:  scancel %s",
             rec.sweep_id, len(submitted), ",".join(arrays) or "-", len(left),
             sweep_record.record_path(work, rec.sweep_id), env, rec.sweep_id,
             " ".join(rec.array_ids) or "(nothing queued)")


def _wait_for_live(waiting: list[Job], prepared: PreparedSweep, experiment: str, results: Results, failed: list,
                   poll_interval_s: float) -> None:
    """Wait for the pairs left to live jobs; each ends FINISHED in MLflow or counts as failed."""
    while waiting:
        work = Path(str(waiting[0].cfg.paths.work))
        try:
            alive = sweep_record.live_pairs(work, experiment, {j.pair: j.plan.ckpt_dir for j in waiting},
                                            leases=prepared.task == "train")
        except Exception as exc:  # SLURM briefly unreachable: ask again next poll
            log.warning("checking the live jobs failed: %s", exc)
            alive = {j.pair: "unknown" for j in waiting}
        done = [j for j in waiting if j.pair not in alive]
        if done:
            metrics = finished_fold_runs(prepared.tracking_uri, prepared.experiment_id)
            for j in done:
                if j.pair in metrics:
                    _keep(j, _returned(j, objective_values(j.cfg, metrics[j.pair]), "skipped (FINISHED in MLflow)"),
                          results, failed, "[live job ended]")
                else:
                    _keep(j, _failed(j, RuntimeError("the live job that held it ended without a FINISHED MLflow "
                                                     "run")), results, failed, "[live job ended]")
            waiting = [j for j in waiting if j.pair in alive]
        if waiting:
            time.sleep(poll_interval_s)
