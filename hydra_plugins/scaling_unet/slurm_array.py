"""``hydra/launcher=slurm_v100`` (``scaling_unet_slurm``): a batch as SLURM job arrays through submitit (any Hydra app).

hydra-submitit-launcher's SLURM launcher, plus: with hints from a sweeper, one array per job group with its own
``--time`` and ``%N`` cap, and callbacks after each submission; ``wait=false`` submits and returns at once;
``on_requeue`` names a function run on USR2 before the job is requeued (save a checkpoint).
"""

import dataclasses
import logging
import sys
import time
import typing as tp

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from hydra_plugins.scaling_unet.hints import JobGroup, take_hints
from hydra_plugins.scaling_unet.pool import failed_return, sweep_dir

log = logging.getLogger(__name__)

# Keys of this launcher's config that are its own (or its sweeper's), never sbatch's.
LAUNCHER_OWN_KEYS = frozenset({"_target_", "poll_interval_s", "parent_runs", "gpu_mem_gb", "wait", "time_groups",
                               "time_factor", "time_margin_min", "tflops_per_gpu", "on_requeue"})


@dataclasses.dataclass
class ScalingUnetSlurmConf(SlurmQueueConf):
    """hydra-submitit-launcher's SLURM options plus ours (conf/hydra/launcher/slurm_v100.yaml builds on it)."""

    _target_: str = "hydra_plugins.scaling_unet.slurm_array.SlurmArrayLauncher"
    poll_interval_s: float = 10.0  # how often the launcher checks the arrays (one sacct per poll)
    wait: bool = True  # false: submit and return (the jobs' results are not waited for)
    on_requeue: tp.Optional[str] = None  # "module.function" run on USR2 before the requeue (save a checkpoint)
    # Read by scaling-unet's sweeper, not by the launcher:
    parent_runs: bool = True  # one MLflow parent run per config after the sweep
    gpu_mem_gb: tp.Optional[float] = None  # memory of one GPU: runs estimated above it follow on_oom
    time_groups: int = 1  # at most this many arrays, grouped by predicted run time, each with its own --time
    time_factor: float = 2.0  # a group's --time: factor × its longest predicted run + time_margin_min, ≤ timeout_min
    time_margin_min: float = 10.0
    tflops_per_gpu: float = 30.0  # sustained training throughput assumed for the prediction (until runs FINISHED)


ConfigStore.instance().store(group="hydra/launcher", name="scaling_unet_slurm", node=ScalingUnetSlurmConf,
                             provider="scaling_unet")


def not_waited_return(overrides: tp.Sequence[str], note: str) -> JobReturn:
    return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None, task_name=note)


class SlurmArrayLauncher(BaseSubmititLauncher):
    """One SLURM job per job of the batch, in one job array per group; requeued on USR2 (preemption, time-out)."""

    _EXECUTOR = "slurm"

    def __init__(self, poll_interval_s: float = 10.0, wait: bool = True, on_requeue: tp.Optional[str] = None,
                 parent_runs: bool = True, gpu_mem_gb: tp.Optional[float] = None, time_groups: int = 1,
                 time_factor: float = 2.0, time_margin_min: float = 10.0, tflops_per_gpu: float = 30.0,
                 **params: tp.Any) -> None:
        self.poll_interval_s = float(poll_interval_s)
        self.wait = bool(wait)
        self.on_requeue = on_requeue
        self.parent_runs = parent_runs
        self.gpu_mem_gb = gpu_mem_gb
        self.sweeper_params = {"time_groups": time_groups, "time_factor": time_factor,
                               "time_margin_min": time_margin_min, "tflops_per_gpu": tflops_per_gpu}
        self.hints = None
        super().__init__(**params)

    def checkpoint(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        """submitit calls this on USR2: run ``on_requeue`` (never raising: the job is requeued anyway), then requeue."""
        if self.on_requeue:
            try:
                from hydra.utils import get_method

                get_method(self.on_requeue)()
            except Exception as exc:
                log.error("USR2: %s failed: %s", self.on_requeue, exc)
        return super().checkpoint(*args, **kwargs)

    def executor(self, folder: tp.Optional[str] = None):
        """The submitit executor with this launcher's parameters (``sweep.plan`` renders its sbatch script)."""
        return slurm_executor(self.params, folder)

    def launch(self, job_overrides: tp.Sequence[tp.Sequence[str]], initial_job_idx: int) -> tp.Sequence[JobReturn]:
        assert self.config is not None
        hints, idx, names = take_hints(self, len(job_overrides), initial_job_idx)
        if not self.wait and "hydra_optuna_sweeper" in str(self.config.hydra.sweeper.get("_target_", "")):
            print("error: hydra.launcher.wait=false: hydra-optuna-sweeper's batches need each trial's result; "
                  "use wait=true, or the asynchronous slots (hydra/sweeper=optuna_async, +experiment=optuna's "
                  "default)", file=sys.stderr)
            raise SystemExit(2)
        sweep_dir(self.config)
        submitted: list[tuple[tp.Any, int]] = []
        for group in hints.groups or [JobGroup(list(range(len(job_overrides))))]:
            if not group.positions:
                continue
            executor = self.executor()
            if group.time_min:
                executor.update_parameters(timeout_min=group.time_min)
            if group.parallelism:
                executor.update_parameters(slurm_array_parallelism=group.parallelism)
            params = []
            for p in group.positions:
                log.info("\t#%d : %s", idx[p], " ".join(filter_overrides(job_overrides[p])))
                params.append((list(job_overrides[p]), "hydra.sweep.dir", idx[p], f"job_id_for_{idx[p]}",
                               Singleton.get_state()))
            jobs = executor.map_array(self, *zip(*params))
            array_id = jobs[0].job_id.split("_")[0]
            if hints.on_array:
                hints.on_array(group, array_id, len(jobs))
            else:
                log.info("submitted %d jobs as ONE SLURM job array %s", len(jobs), array_id)
            submitted.extend(zip(jobs, group.positions))
        if hints.on_submitted:
            hints.on_submitted([(job.job_id, p) for job, p in submitted])
        results: list[tp.Optional[JobReturn]] = [None] * len(job_overrides)
        if not self.wait:
            for job, p in submitted:
                results[p] = not_waited_return(job_overrides[p], f"queued as SLURM job {job.job_id}")
            return tp.cast(list, results)
        pending = dict(submitted)
        while pending:
            next(iter(pending)).watcher.update()  # one sacct call for all arrays per poll
            for job in list(pending):
                if not job.done():
                    continue
                p = pending.pop(job)
                try:
                    ret = job.results()[0]
                except Exception as exc:  # cancelled, killed, out of requeues: no result pickle
                    ret = failed_return(job_overrides[p], exc)
                results[p] = ret
                where = f"[{len(pending)} left, job {job.job_id}]"
                if hints.on_result:
                    hints.on_result(p, ret, where)
                else:
                    log.info("%s %s %s", where, names[p], ret.status.name)
            if pending:
                time.sleep(self.poll_interval_s)
        return tp.cast(list, results)


def slurm_executor(params: tp.Mapping[str, tp.Any], folder: tp.Optional[str] = None):
    """A ``submitit.AutoExecutor`` for SLURM with a launcher's parameters (``submitit_folder``, ``max_num_timeout``,
    hydra-submitit-launcher's queue keys, and slurm_* keys without their prefix)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    params = {k: v for k, v in params.items() if k not in LAUNCHER_OWN_KEYS}
    init = {"folder": folder or params["submitit_folder"]}
    if "max_num_timeout" in params:
        init["slurm_max_num_timeout"] = params["max_num_timeout"]
    executor = submitit.AutoExecutor(cluster="slurm", **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    return executor
