"""The submitit SLURM executor of a launcher's parameters, and the sbatch script it submits: one home for the
SLURM launcher (which submits) and ``sweep.plan`` (which prints what would be submitted)."""

from __future__ import annotations

import shlex
import typing as tp

# Keys of the SLURM launcher's config that are the launcher's own (polling, grouping, memory checks), never sbatch's.
LAUNCHER_OWN_KEYS = frozenset({"_target_", "poll_interval_s", "parent_runs", "gpu_mem_gb", "wait", "time_groups",
                               "time_factor", "time_margin_min", "tflops_per_gpu"})


def slurm_executor(params: tp.Mapping[str, tp.Any], folder: tp.Optional[str] = None):
    """A ``submitit.AutoExecutor`` for SLURM with the launcher's parameters (``submitit_folder``, ``max_num_timeout``,
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


def render_sbatch(params: tp.Mapping[str, tp.Any], n_tasks: int, *, folder: str, python: str) -> str:
    """The sbatch script submitit writes for ONE array of ``n_tasks`` runs with these launcher params."""
    from submitit.slurm.slurm import _make_sbatch_string

    ex = slurm_executor(dict(params, submitit_folder=folder), folder=folder)._executor
    command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(folder)])
    return _make_sbatch_string(command=command, folder=folder, map_count=n_tasks, **ex.parameters)
