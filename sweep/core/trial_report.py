"""What a training job tells the search that runs it, at every checkpoint: its objective so far, and whether to stop.

The job does not know Optuna: an asynchronous Optuna slot (sweep.orchestration.trials) installs a reporter around
the job with :func:`reporting`; a training run calls :func:`report` after every validation and stops at once with
:class:`TrialPruned` when the reporter says so. Without a reporter (a grid sweep, a single run) :func:`report` does
nothing.
"""

from __future__ import annotations

import contextlib
import typing as tp

# (value, iteration) → prune now? One per process: a slot runs one trial at a time.
Reporter = tp.Callable[[float, int], bool]

_reporter: tp.Optional[Reporter] = None
TAG_PRUNED_AT = "pruned_at_iteration"


class TrialPruned(Exception):
    """The search stopped this training early; its MLflow run ends KILLED with the tags in :attr:`run_tags`."""

    run_status = "KILLED"

    def __init__(self, iteration: int, value: float, objective: str = "mean_iou", why: str = "pruner") -> None:
        self.iteration = int(iteration)
        self.value = float(value)
        self.objective = objective
        self.why = why
        super().__init__(f"pruned at iteration {self.iteration} ({why}): {objective} {self.value:.4f}")

    @property
    def run_tags(self) -> dict[str, str]:
        return {TAG_PRUNED_AT: str(self.iteration), f"pruned_{self.objective}": f"{self.value:.6g}",
                "pruned_by": self.why}


@contextlib.contextmanager
def reporting(reporter: Reporter) -> tp.Iterator[None]:
    """Install ``reporter`` for the job run inside this block."""
    global _reporter
    before, _reporter = _reporter, reporter
    try:
        yield
    finally:
        _reporter = before


def active() -> bool:
    return _reporter is not None


def report(value: float, iteration: int, objective: str = "mean_iou") -> None:
    """Tell the search the objective at ``iteration``; raises :class:`TrialPruned` when it says stop."""
    if _reporter is not None and _reporter(float(value), int(iteration)):
        raise TrialPruned(iteration, value, objective)
