"""``hydra/launcher=local``: the jobs of a batch in a pool of long-lived local worker processes (any Hydra app).

TensorFlow is imported once per worker, not once per job. With :class:`~hydra_plugins.scaling_unet.hints.LaunchHints`
from a sweeper, jobs of one group run back to back in one worker (they reuse its traced model) and costly groups
start first; without hints every job is its own group, in order.
"""

import dataclasses
import logging
import os
import sys
import time
import typing as tp

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from hydra_plugins.scaling_unet.hints import JobGroup, take_hints

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PoolLauncherConf:
    _target_: str = "hydra_plugins.scaling_unet.pool.PoolLauncher"
    n_workers: int = 2  # parallel jobs
    threads_per_worker: tp.Optional[int] = None  # TensorFlow/OpenMP threads per worker (default: cores / n_workers)
    parent_runs: bool = True  # read by scaling-unet's sweeper: one MLflow parent run per config after the sweep
    gpu_mem_gb: tp.Optional[float] = None  # read by scaling-unet's sweeper: memory of the workstation's GPU (on_oom)


ConfigStore.instance().store(group="hydra/launcher", name="scaling_unet_pool", node=PoolLauncherConf,
                             provider="scaling_unet")


def die_with_parent() -> None:
    """Linux: SIGTERM this worker when the sweep process dies (killed, not Ctrl-C), so no orphan trains on."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux/glibc: workers may outlive a killed sweep
        pass


def init_worker(threads: tp.Optional[int]) -> None:
    die_with_parent()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads:  # several TensorFlow processes on few cores: don't oversubscribe
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _execute(payload: bytes) -> list[bytes]:
    """Run the jobs of one group one after the other in this worker."""
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


def split_for_idle_workers(pending: list[JobGroup], n_workers: int) -> None:
    """Fewer groups waiting than workers: split the costliest one so no worker idles.

    A group's jobs go to one worker back to back to reuse its traced model; that saves seconds
    per job, an idle core loses whole jobs (scaling-unet's Table 2 part trains one config, 4 folds).
    """
    while len(pending) < n_workers:
        big = max((i for i in range(len(pending)) if len(pending[i].positions) > 1), key=lambda i: pending[i].cost,
                  default=None)
        if big is None:
            return
        group = pending.pop(big)
        half = (len(group.positions) + 1) // 2
        share = group.cost / len(group.positions)
        pending[big:big] = [dataclasses.replace(group, positions=p, cost=share * len(p))
                            for p in (group.positions[:half], group.positions[half:])]


def failed_return(overrides: tp.Sequence[str], exc: BaseException) -> JobReturn:
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=exc)


class PoolLauncher(Launcher):
    """Runs a batch on this machine in ``n_workers`` long-lived processes (spawned, one job at a time each)."""

    def __init__(self, n_workers: int = 2, threads_per_worker: tp.Optional[int] = None, parent_runs: bool = True,
                 gpu_mem_gb: tp.Optional[float] = None) -> None:
        self.n_workers = n_workers  # checked in launch(): one error line, exit 2
        self.threads_per_worker = threads_per_worker
        self.parent_runs = parent_runs
        self.gpu_mem_gb = gpu_mem_gb
        self.hints = None
        self.config: tp.Optional[DictConfig] = None
        self.hydra_context: tp.Optional[HydraContext] = None
        self.task_function: tp.Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def check_settings(self) -> None:
        if isinstance(self.n_workers, bool) or not isinstance(self.n_workers, int) or self.n_workers < 1:
            print(f"error: hydra.launcher.n_workers: must be an integer >= 1, got {self.n_workers!r}", file=sys.stderr)
            raise SystemExit(2)

    def threads(self, n_processes: tp.Optional[int] = None) -> int:
        return self.threads_per_worker or max(1, (os.cpu_count() or 1) // (n_processes or self.n_workers))

    def launch(self, job_overrides: tp.Sequence[tp.Sequence[str]], initial_job_idx: int) -> tp.Sequence[JobReturn]:
        import concurrent.futures as cf
        import multiprocessing

        import cloudpickle

        assert self.config is not None and self.hydra_context is not None
        hints, idx, names = take_hints(self, len(job_overrides), initial_job_idx)
        self.check_settings()
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir(self.config)
        n = len(job_overrides)
        results: list[tp.Optional[JobReturn]] = [None] * n
        if not n:
            return []
        threads = self.threads()
        log.info("local pool: %d jobs on %d workers × %d threads", n, self.n_workers, threads)
        # Costliest groups first: the pool's tail then holds small jobs, not one long one.
        pending = sorted(hints.groups or [JobGroup([p]) for p in range(n)], key=lambda g: -g.cost)
        t0 = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")  # fork after TensorFlow/MLflow threads start is unsafe
        pool = cf.ProcessPoolExecutor(self.n_workers, mp_context=ctx, initializer=init_worker, initargs=(threads,))
        k = 0
        try:
            futures: dict = {}

            def submit_next() -> None:
                while pending and len(futures) < self.n_workers:
                    split_for_idle_workers(pending, self.n_workers)
                    group = pending.pop(0)
                    payload = cloudpickle.dumps((self.hydra_context, self.config, self.task_function,
                                                 [(job_overrides[p], idx[p]) for p in group.positions],
                                                 Singleton.get_state()))
                    futures[pool.submit(_execute, payload)] = group

            submit_next()
            while futures:
                fut = next(cf.as_completed(futures))
                group = futures.pop(fut)
                submit_next()  # before bookkeeping: a worker never waits for the log
                try:
                    rets = [cloudpickle.loads(b) for b in fut.result()]
                except Exception as exc:  # the worker process died (killed, out of memory)
                    rets = [failed_return(job_overrides[p], exc) for p in group.positions]
                for p, ret in zip(group.positions, rets):
                    k += 1
                    results[p] = ret
                    where = f"[{k}/{n}, {time.perf_counter() - t0:.0f} s]"
                    if hints.on_result:
                        hints.on_result(p, ret, where)
                    else:
                        log.info("%s %s %s", where, names[p], ret.status.name)
        except BaseException:
            # Ctrl-C / errors: stop now instead of draining the queue; a rerun resumes where the app allows it.
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            log.error("interrupted after %d of %d jobs", k, n)
            raise
        pool.shutdown(wait=True)
        return tp.cast(list, results)


def sweep_dir(config: DictConfig) -> None:
    """The multirun folder, with the mode Hydra's own launchers give it."""
    from pathlib import Path

    folder = Path(str(config.hydra.sweep.dir))
    folder.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(folder, mode=int(str(config.hydra.sweep.mode), 8))
