"""The sbatch script the SLURM array launcher submits, rendered without submitting (``sweep.plan``).

submitit has no public API for the script's text: its private ``_make_sbatch_string`` is used, and
tests/test_sweep_plan.py pins the rendered text against a golden file, so a submitit upgrade that changes it fails there.
"""

from __future__ import annotations

import shlex
import typing as tp

from hydra_plugins.scaling_unet.slurm_array import slurm_executor


def render_sbatch(params: tp.Mapping[str, tp.Any], n_tasks: int, *, folder: str, python: str) -> str:
    """The sbatch script submitit writes for ONE array of ``n_tasks`` runs with these launcher params."""
    from submitit.slurm.slurm import _make_sbatch_string

    ex = slurm_executor(dict(params, submitit_folder=folder), folder=folder)._executor
    command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(folder)])
    return _make_sbatch_string(command=command, folder=folder, map_count=n_tasks, **ex.parameters)
