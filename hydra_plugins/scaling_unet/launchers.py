"""Hydra launchers: a local process pool (the embedded default) and one SLURM job array.

Both wrap the jobs in the same sweep logic (sweep.dispatch): every config is checked before
anything runs, (config, fold) pairs that already have a FINISHED MLflow run are skipped, failures
are reported as they happen and summarised at the end, and each config gets a parent MLflow run.
Imports of TensorFlow and MLflow are lazy: Hydra imports this module during plugin discovery.
"""


import dataclasses
import logging
import os
import sys
import time
import typing as tp
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from hydra.core.config_store import ConfigStore

from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ScalingUnetSlurmConf(SlurmQueueConf):
    """hydra-submitit-launcher's SLURM options plus ours (conf/hydra/launcher/slurm_v100.yaml builds on it)."""

    _target_: str = "hydra_plugins.scaling_unet.launchers.SlurmArrayLauncher"
    poll_interval_s: float = 10.0  # how often the sweep process checks the array (sacct)
    parent_runs: bool = True  # one MLflow parent run per config after the sweep
    gpu_mem_gb: tp.Optional[float] = None  # memory of one GPU: runs estimated above it are refused/skipped/halved (on_oom)
    wait: bool = True  # false: submit, print the array ids and how to follow/cancel, and exit (python -m sweep.status)
    time_groups: int = 1  # at most this many arrays, grouped by predicted run time, each with its own --time (sweep.groups)
    time_factor: float = 2.0  # a group's --time: factor × its longest predicted run + time_margin_min, ≤ timeout_min
    time_margin_min: float = 10.0
    tflops_per_gpu: float = 30.0  # sustained training throughput assumed for the prediction (until runs FINISHED)


ConfigStore.instance().store(group="hydra/launcher", name="scaling_unet_slurm", node=ScalingUnetSlurmConf,
                             provider="scaling_unet")


def _compose(launcher, job_overrides: tp.Sequence[tp.Sequence[str]], initial_job_idx: int) -> list:
    from sweep.compose import compose_jobs

    pre = getattr(launcher, "_precomposed", None) or {}  # ComposeOnceSweeper composed this batch already
    launcher._precomposed = None  # the SLURM launcher is pickled into every job: never with all configs
    if all(tuple(o) in pre for o in job_overrides):
        return [(initial_job_idx + i, list(o), pre[tuple(o)]) for i, o in enumerate(job_overrides)]
    return compose_jobs(launcher.hydra_context.config_loader, launcher.config, job_overrides, initial_job_idx)


def _skipped_return(job, metrics) -> JobReturn:
    from sweep.dispatch import objective_values

    return JobReturn(overrides=job.overrides, cfg=job.cfg, status=JobStatus.COMPLETED,
                     _return_value=objective_values(job.cfg, metrics), task_name="skipped (FINISHED in MLflow)")


def _prepared_returns(prepared) -> dict:
    """Results of the jobs that run nowhere: FINISHED in MLflow already, or skipped (GPU memory; NaN IoU)."""
    from sweep.dispatch import objective_values

    results = {j.idx: (j, _skipped_return(j, m)) for j, m in prepared.finished}
    for j, why in prepared.skipped:
        results[j.idx] = (j, JobReturn(overrides=j.overrides, cfg=j.cfg, status=JobStatus.COMPLETED,
                                       _return_value=objective_values(j.cfg, {"mean_iou": float("nan"),
                                                                              "flops": j.plan.flops}),
                                       task_name=f"not queued: {why}"))
    return results


def _failed_return(job, exc: BaseException) -> JobReturn:
    return JobReturn(overrides=job.overrides, cfg=job.cfg, status=JobStatus.FAILED, _return_value=exc)


def _record(job, ret: JobReturn, results: dict, failed: list, where: str) -> None:
    """Keep a job's result; log it, and a failure at once with its reason."""
    from sweep.dispatch import failure_reason

    results[job.idx] = (job, ret)
    if ret.status == JobStatus.COMPLETED:
        log.info("%s %s done", where, job.plan.run_name)
    else:
        why = failure_reason(ret._return_value)
        failed.append((job, why))
        log.error("%s %s FAILED: %s", where, job.plan.run_name, why)


def _finish(prepared, results: dict, failed: list, parent_runs: bool) -> list[JobReturn]:
    from sweep.aggregate import link_parent_runs
    from sweep.dispatch import summarize

    if prepared.task == "train" and prepared.todo:  # runs that ended while the server was away: complete them first
        from sweep.offline import sync_pairs

        try:
            counts = sync_pairs({j.plan.ckpt_dir for j in prepared.todo}, prepared.tracking_uri,
                                prepared.todo[0].plan.experiment)
            if counts.runs_created or counts.finished or counts.metrics:
                log.info("offline stores synced: %s", counts)
        except Exception as exc:  # the offline stores stay; python -m sweep.sync copies them later
            log.error("could not sync the runs' offline stores: %s (python -m sweep.sync copies them later)", exc)
    if parent_runs and prepared.task == "train":  # fusing runs have their own parents (sweep.fusing)
        keys = {j.plan.config_key for j in prepared.todo} | {j.plan.config_key for j, _ in prepared.finished}
        try:
            link_parent_runs(prepared.tracking_uri, prepared.experiment_id, keys)
        except Exception as exc:  # the fold runs are safe in MLflow; parents can be rebuilt later
            log.error("could not create the parent runs: %s", exc)
    for dup in prepared.duplicates:
        first = next(r for j, r in results.values() if j.pair == dup.pair)
        results[dup.idx] = (dup, first)
    summarize(failed, len(prepared.todo))
    return [results[i][1] for i in sorted(results)]


def _sweep_dir(config: DictConfig) -> None:
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))


# ----------------------------------------------------------------------------- local process pool

def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the sweep process dies (killed, not Ctrl-C), so no orphan trains on."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux/glibc: workers may outlive a killed sweep
        pass


def _init_worker(threads: tp.Optional[int]) -> None:
    _die_with_parent()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads:  # several TensorFlow processes on few cores: don't oversubscribe
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _execute(payload: bytes) -> list[bytes]:
    """Run the jobs of one config (its folds) one after the other in this worker; they reuse its traced model."""
    import cloudpickle

    hydra_context, config, task_function, jobs, singleton_state = cloudpickle.loads(payload)
    out = []
    for overrides, idx in jobs:
        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config.hydra.job) as job:
            job.id = f"job_id_for_{idx}"
            job.num = idx
        ret = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        try:
            out.append(cloudpickle.dumps(ret))
        except Exception as exc:  # an unpicklable exception must not hide the failure
            ret._return_value = RuntimeError(f"{type(ret._return_value).__name__}: {ret._return_value} ({exc})")
            out.append(cloudpickle.dumps(ret))
    return out


def _cost(group: list) -> float:
    return sum(j.plan.flops * j.plan.settings.max_iters for j in group)


def _split_for_idle_workers(pending: list, n_workers: int) -> None:
    """Fewer groups waiting than workers: split the costliest one so no worker idles.

    A group's runs go to one worker back to back to reuse its traced model; that saves seconds
    per run, an idle core loses whole runs (the Table 2 part trains one config, 4 folds).
    """
    while len(pending) < n_workers:
        big = max((i for i in range(len(pending)) if len(pending[i]) > 1), key=lambda i: _cost(pending[i]),
                  default=None)
        if big is None:
            return
        group = pending.pop(big)
        half = (len(group) + 1) // 2
        pending[big:big] = [group[:half], group[half:]]


class PoolLauncher(Launcher):
    """Runs the jobs on this machine in ``n_workers`` long-lived processes (TensorFlow imported once each).

    Runs that can share a built model (same width, depth, precision: ``model.schedule.model_key``; all
    folds and input sizes) go to one worker back to back, so the training step is traced once or twice
    instead of once per run, except when fewer groups wait than there are workers: then they are split.
    """

    def __init__(self, n_workers: int = 2, threads_per_worker: tp.Optional[int] = None, parent_runs: bool = True,
                 gpu_mem_gb: tp.Optional[float] = None) -> None:
        self.n_workers = n_workers  # checked in launch(): one error line, exit 2
        self.gpu_mem_gb = gpu_mem_gb  # read by sweep.resources from the composed config
        self.threads_per_worker = threads_per_worker
        self.parent_runs = parent_runs
        self.config: tp.Optional[DictConfig] = None
        self.hydra_context: tp.Optional[HydraContext] = None
        self.task_function: tp.Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: tp.Sequence[tp.Sequence[str]], initial_job_idx: int) -> tp.Sequence[JobReturn]:
        import concurrent.futures as cf
        import multiprocessing

        import cloudpickle

        from sweep.dispatch import prepare_sweep_or_exit

        assert self.config is not None and self.hydra_context is not None
        if isinstance(self.n_workers, bool) or not isinstance(self.n_workers, int) or self.n_workers < 1:
            print(f"error: hydra.launcher.n_workers: must be an integer >= 1, got {self.n_workers!r}", file=sys.stderr)
            raise SystemExit(2)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        _sweep_dir(self.config)
        prepared = prepare_sweep_or_exit(_compose(self, job_overrides, initial_job_idx))
        results = _prepared_returns(prepared)
        failed: list = []
        threads = self.threads_per_worker or max(1, (os.cpu_count() or 1) // self.n_workers)
        n = len(prepared.todo)
        log.info("local pool: %d runs on %d workers × %d threads", n, self.n_workers, threads)
        t0 = time.perf_counter()
        if prepared.todo:
            ctx = multiprocessing.get_context("spawn")  # fork after TensorFlow/MLflow threads start is unsafe
            pool = cf.ProcessPoolExecutor(self.n_workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,))
            k = 0
            try:
                from model.schedule import model_key

                by_model: dict[tuple, list] = {}
                for j in sorted(prepared.todo, key=lambda j: (j.plan.input_size, j.plan.config_key, j.plan.fold)):
                    by_model.setdefault(model_key(j.plan.width, j.plan.depth, j.plan.settings), []).append(j)
                # Largest groups first: the pool's tail then holds small runs, not one long one.
                pending = sorted(by_model.values(), key=lambda g: -_cost(g))
                futures: dict = {}

                def submit_next() -> None:
                    while pending and len(futures) < self.n_workers:
                        _split_for_idle_workers(pending, self.n_workers)
                        group = pending.pop(0)
                        payload = cloudpickle.dumps((self.hydra_context, self.config, self.task_function,
                                                     [(j.overrides, j.idx) for j in group], Singleton.get_state()))
                        futures[pool.submit(_execute, payload)] = group

                submit_next()
                while futures:
                    fut = next(cf.as_completed(futures))
                    group = futures.pop(fut)
                    submit_next()  # before bookkeeping: a worker never waits for the log
                    try:
                        rets = [cloudpickle.loads(b) for b in fut.result()]
                    except Exception as exc:  # the worker process died (killed, out of memory)
                        rets = [_failed_return(j, exc) for j in group]
                    for j, ret in zip(group, rets):
                        k += 1
                        _record(j, ret, results, failed, f"[{k}/{n}, {time.perf_counter() - t0:.0f} s]")
            except BaseException:
                # Ctrl-C / errors: stop now instead of draining the queue; a rerun resumes (checkpoints, MLflow).
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.terminate()
                pool.shutdown(wait=False, cancel_futures=True)
                log.error("sweep interrupted after %d of %d runs; run the same command again to resume", k, n)
                raise
            pool.shutdown(wait=True)
        return _finish(prepared, results, failed, self.parent_runs)


# ----------------------------------------------------------------------------- SLURM job array

def _run_cost(job) -> float:
    """Predicted cost of one run (training FLOPs to the iteration cap): orders tasks, splits groups, time left."""
    return float(job.plan.flops) * job.plan.settings.batch_size * job.plan.settings.max_iters


def _not_waited_return(job, note: str) -> JobReturn:
    return JobReturn(overrides=job.overrides, cfg=job.cfg, status=JobStatus.COMPLETED, _return_value=None,
                     task_name=note)


class SlurmArrayLauncher(BaseSubmititLauncher):
    """One SLURM job per (config, fold), in one job array per group; requeue on USR2 with a fresh checkpoint.

    Every submission is recorded (sweep.record) before the launcher waits, so ``python -m sweep.status``
    and a rerun of the same command know the arrays even when this process is gone; a rerun queues only
    pairs that are neither FINISHED in MLflow nor held by a live job.
    """

    _EXECUTOR = "slurm"

    def __init__(self, poll_interval_s: float = 5.0, parent_runs: bool = True, gpu_mem_gb: tp.Optional[float] = None,
                 wait: bool = True, time_groups: int = 1, time_factor: float = 2.0, time_margin_min: float = 10.0,
                 tflops_per_gpu: float = 30.0, **params: tp.Any) -> None:
        self.poll_interval_s = float(poll_interval_s)
        self.group_params = {"time_groups": time_groups, "time_factor": time_factor,
                             "time_margin_min": time_margin_min, "tflops_per_gpu": tflops_per_gpu}
        self.rate = 1.0
        self.parent_runs = parent_runs
        self.gpu_mem_gb = gpu_mem_gb  # read by sweep.resources from the composed config, never passed to sbatch
        self.wait = bool(wait)
        super().__init__(**params)

    def checkpoint(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        """submitit calls this on USR2 (preemption / time-out): save the running training, then requeue."""
        from sweep.task import checkpoint_before_requeue

        checkpoint_before_requeue("the run")
        return super().checkpoint(*args, **kwargs)

    def executor(self, folder: tp.Optional[str] = None):
        """The submitit executor with this launcher's parameters (sweep.sbatch, which sweep.plan renders with)."""
        from sweep.sbatch import slurm_executor

        return slurm_executor(self.params, folder)

    def _groups(self, todo: list) -> list[tuple[str, list, int, tp.Optional[int]]]:
        """(name, jobs longest first, --time in minutes, %N or None) of each array to submit."""
        from sweep.groups import job_groups

        groups = job_groups(todo, {**self.params, **self.group_params}, self.rate)
        return [(g.name, g.items, g.time_min, g.parallelism) for g in groups]

    def _submit(self, todo: list, rec, work: Path) -> list[tuple[tp.Any, tp.Any]]:
        """One sbatch --array per group; each submission recorded at once (file, then MLflow)."""
        from sweep import record as sweep_record

        out = []
        for name, group, time_min, parallelism in self._groups(todo):
            executor = self.executor()
            executor.update_parameters(timeout_min=time_min)
            if parallelism:
                executor.update_parameters(slurm_array_parallelism=parallelism)
            params = []
            for j in group:
                log.info("\t#%d : %s", j.idx, " ".join(filter_overrides(j.overrides)))
                params.append((j.overrides, "hydra.sweep.dir", j.idx, f"job_id_for_{j.idx}", Singleton.get_state()))
            jobs = executor.map_array(self, *zip(*params))
            array_id = jobs[0].job_id.split("_")[0]
            sub = sweep_record.Submission(array_id=array_id, tasks=[sweep_record.pair_name(j.pair) for j in group],
                                          time_min=time_min, submitit_folder=str(self.params["submitit_folder"]),
                                          submitted_at=time.time(), group=name)
            rec = sweep_record.update(work, rec, lambda r, s=sub: r.submissions.append(s))
            log.info("submitted %d runs as ONE SLURM job array %s (group %s, --time=%d, at most %s at a time)",
                     len(jobs), array_id, name, time_min, parallelism or self.params.get("array_parallelism"))
            out.extend(zip(jobs, group))
        return out

    def launch(self, job_overrides: tp.Sequence[tp.Sequence[str]], initial_job_idx: int) -> tp.Sequence[JobReturn]:
        from sweep import record as sweep_record
        from sweep.dispatch import prepare_sweep_or_exit
        from sweep.slurm_state import SlurmQueryError

        assert self.config is not None
        if not self.wait and "hydra_optuna_sweeper" in str(self.config.hydra.sweeper.get("_target_", "")):
            print("error: hydra.launcher.wait=false: hydra-optuna-sweeper's batches need each trial's result; "
                  "use wait=true, or the asynchronous slots (hydra/sweeper=optuna_async, +experiment=optuna's "
                  "default)", file=sys.stderr)
            raise SystemExit(2)
        t0 = time.perf_counter()
        composed = _compose(self, job_overrides, initial_job_idx)
        log.info("composed %d job configs in %.1f s", len(composed), time.perf_counter() - t0)
        prepared = prepare_sweep_or_exit(composed)
        results = _prepared_returns(prepared)
        failed: list = []
        _sweep_dir(self.config)
        work = Path(str(composed[0][2].paths.work))
        rec = self._record(prepared)
        self._experiment = rec.experiment
        from sweep.groups import measured_rate

        self.rate = measured_rate(prepared.finished, {**self.params, **self.group_params})
        try:
            live = sweep_record.live_pairs(work, rec.experiment, {j.pair: j.plan.ckpt_dir for j in prepared.todo},
                                           leases=prepared.task == "train")
        except SlurmQueryError as exc:  # queueing blind could start a second job on a pair
            print(f"error: cannot tell which runs SLURM still runs ({exc}); nothing was queued", file=sys.stderr)
            raise SystemExit(1)
        left = [j for j in prepared.todo if j.pair in live]
        todo = [j for j in prepared.todo if j.pair not in live]
        if left:
            log.warning("%d runs left to live jobs (not queued again):\n%s", len(left),
                        "\n".join(f"  {j.plan.run_name}: {live[j.pair]}" for j in left))
        submitted = self._submit(todo, rec, work) if todo else []
        rec = sweep_record.update(work, rec)
        sweep_record.write_pointer(Path(str(self.config.hydra.sweep.dir)), rec,
                                   sweep_record.record_path(work, rec.sweep_id))
        try:
            rec.mlflow_run_id = sweep_record.sync_mlflow(prepared.tracking_uri, rec)
            sweep_record.update(work, rec, lambda r: setattr(r, "mlflow_run_id", rec.mlflow_run_id))
        except Exception as exc:  # the record file has it all; the MLflow sweep run is a convenience
            log.error("could not record the sweep in MLflow: %s", exc)
        self._how_to_follow(rec, submitted, left, work)
        if not self.wait:
            for job, j in submitted:
                results[j.idx] = (j, _not_waited_return(j, f"queued as SLURM job {job.job_id}"))
            for j in left:
                results[j.idx] = (j, _not_waited_return(j, f"left to {live[j.pair]}"))
            for dup in prepared.duplicates:
                results[dup.idx] = (dup, _not_waited_return(dup, "duplicate"))
            return [results[i][1] for i in sorted(results)]
        self._wait_for(submitted, left, prepared, results, failed)
        return _finish(prepared, results, failed, self.parent_runs)

    def _record(self, prepared):
        from sweep import record as sweep_record
        from sweep.resources import halved_reason

        jobs = prepared.todo + [j for j, _ in prepared.finished] + [j for j, _ in prepared.skipped]
        pairs = {sweep_record.pair_name(j.pair): {"run_name": j.plan.run_name, "cost": _run_cost(j),
                                                  "config_key": j.plan.config_key, "fold": j.plan.fold}
                 for j in jobs}
        # Fusing runs live in their own experiment: named by id so they never mix with the training sweeps.
        experiment = str(jobs[0].plan.experiment) if prepared.task == "train" else f"fusing:{prepared.experiment_id}"
        return sweep_record.SweepRecord(
            sweep_id=sweep_record.sweep_id(experiment, [j.pair for j in jobs]), experiment=experiment,
            experiment_id=str(prepared.experiment_id), tracking_uri=tracking_redacted(prepared.tracking_uri),
            num_folds=jobs[0].plan.num_folds, pairs=pairs,
            skipped={sweep_record.pair_name(j.pair): why for j, why in prepared.skipped},
            halved={sweep_record.pair_name(j.pair): halved_reason(j.cfg) for j in jobs if halved_reason(j.cfg)},
            parallelism=self.params.get("array_parallelism"), max_num_timeout=self.params.get("max_num_timeout"))

    def _how_to_follow(self, rec, submitted: list, left: list, work: Path) -> None:
        arrays = sorted({job.job_id.split("_")[0] for job, _ in submitted})
        env = f"SCALING_UNET_WORK={work} " if os.environ.get("SCALING_UNET_WORK") else ""
        log.info("sweep %s: %d runs queued in array(s) %s, %d left to live jobs; record %s\n"
                 "  follow:  %spython -m sweep.status --sweep-id %s [--watch 60]   (or the same overrides)\n"
                 "  cancel:  scancel %s",
                 rec.sweep_id, len(submitted), ",".join(arrays) or "-", len(left),
                 sweep_record_path(work, rec.sweep_id), env, rec.sweep_id, " ".join(rec.array_ids) or "(nothing queued)")

    def _wait_for(self, submitted: list, left: list, prepared, results: dict, failed: list) -> None:
        """Poll the arrays (one sacct per poll) until every task ended; then the pairs left to live jobs."""
        from sweep.dispatch import finished_fold_runs
        from sweep.record import live_pairs

        pending = dict(submitted)
        while pending:
            next(iter(pending)).watcher.update()  # one sacct call for all arrays per poll
            for job in list(pending):
                if not job.done():
                    continue
                j = pending.pop(job)
                try:
                    ret = job.results()[0]
                except Exception as exc:  # cancelled, killed, out of requeues: no result pickle
                    ret = _failed_return(j, exc)
                _record(j, ret, results, failed, f"[{len(pending)} left, job {job.job_id}]")
            if pending:
                time.sleep(self.poll_interval_s)
        waiting = list(left)
        while waiting:
            work = Path(str(waiting[0].cfg.paths.work))
            try:
                alive = live_pairs(work, self._experiment, {j.pair: j.plan.ckpt_dir for j in waiting},
                                   leases=prepared.task == "train")
            except Exception as exc:  # SLURM briefly unreachable: ask again next poll
                log.warning("checking the live jobs failed: %s", exc)
                alive = {j.pair: "unknown" for j in waiting}
            done = [j for j in waiting if j.pair not in alive]
            if done:
                metrics = finished_fold_runs(prepared.tracking_uri, prepared.experiment_id)
                for j in done:
                    if j.pair in metrics:
                        _record(j, _skipped_return(j, metrics[j.pair]), results, failed, "[live job ended]")
                    else:
                        _record(j, _failed_return(j, RuntimeError("the live job that held it ended without a "
                                                                  "FINISHED MLflow run")), results, failed,
                                "[live job ended]")
                waiting = [j for j in waiting if j.pair in alive]
            if waiting:
                time.sleep(self.poll_interval_s)


def tracking_redacted(uri: str) -> str:
    from sweep.tracking import redact_uri

    return redact_uri(uri)


def sweep_record_path(work: Path, sid: str) -> Path:
    from sweep.record import record_path

    return record_path(work, sid)


# ----------------------------------------------------------------------------- sweeper: compose once

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf  # noqa: E402


@dataclasses.dataclass
class ScalingUnetSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.scaling_unet.launchers.ComposeOnceSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="scaling_unet", node=ScalingUnetSweeperConf,
                             provider="scaling_unet")


class ComposeOnceSweeper(BasicSweeper):
    """Hydra's basic sweeper, but the configs it composes to validate a batch are handed to our launchers.

    BasicSweeper composes every job once to validate it and the launcher composes it again to check it
    (192 compound jobs: ~30 s of the 33 s to queue). Here the batch is composed once, the fast way
    (sweep.compose), and our launchers reuse those configs; other launchers compose as usual.
    """

    def validate_batch_is_legal(self, batch: tp.Sequence[tp.Sequence[str]]) -> None:
        from sweep.compose import compose_jobs

        composed = compose_jobs(self.hydra_context.config_loader, self.config, batch)  # raises as Hydra would
        if isinstance(self.launcher, (PoolLauncher, SlurmArrayLauncher)):
            self.launcher._precomposed = {tuple(o): cfg for _, o, cfg in composed}
