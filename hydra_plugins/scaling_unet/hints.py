"""What a sweeper may tell this package's launchers about a batch (all optional): any Hydra app can ignore it.

A launcher reads :attr:`hints` once at the start of ``launch()`` and clears it, so the hints (callbacks, the
sweeper's state) are never pickled into a job. Without hints a launcher runs the batch as Hydra's own launchers do.
"""

import dataclasses
import typing as tp

from hydra.core.utils import JobReturn


@dataclasses.dataclass
class JobGroup:
    """Jobs launched together: on the pool, run back to back in one worker (they share a traced model);
    on SLURM, one job array with its own ``--time`` and ``%N`` cap."""

    positions: list[int]  # indices into the batch's job_overrides
    name: str = ""
    cost: float = 1.0  # relative cost: the pool starts costly groups first and splits them for idle workers
    time_min: tp.Optional[int] = None
    parallelism: tp.Optional[int] = None


@dataclasses.dataclass
class LaunchHints:
    job_idx: tp.Optional[list[int]] = None  # hydra.job.num of each job (a sweeper may leave finished jobs out)
    names: tp.Optional[list[str]] = None  # how the log names each job
    groups: tp.Optional[list[JobGroup]] = None
    on_result: tp.Optional[tp.Callable[[int, JobReturn, str], None]] = None  # (position, result, where) as each ends
    on_array: tp.Optional[tp.Callable[[JobGroup, str, int], None]] = None  # (group, array id, tasks) after each sbatch
    on_submitted: tp.Optional[tp.Callable[[list[tuple[str, int]]], None]] = None  # (job id, position): all queued


def take_hints(launcher: tp.Any, n_jobs: int, initial_job_idx: int) -> tuple[LaunchHints, list[int], list[str]]:
    """The launcher's hints (cleared on it), each job's number and log name."""
    hints = getattr(launcher, "hints", None) or LaunchHints()
    launcher.hints = None
    idx = list(hints.job_idx) if hints.job_idx is not None else [initial_job_idx + i for i in range(n_jobs)]
    if len(idx) != n_jobs:
        raise ValueError(f"launch hints name {len(idx)} job numbers for {n_jobs} jobs")
    names = list(hints.names) if hints.names is not None else [f"#{i}" for i in idx]
    return hints, idx, names
