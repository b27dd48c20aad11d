"""``hydra/sweeper=scaling_unet``: Hydra's basic sweeper that composes each batch once, fast (sweep.core.compose).

For an app that asks for it (a task function with the attribute :data:`sweep.core.SWEEP_APP` set, as
``python -m sweep`` has), every batch goes through the sweep's own logic (sweep.orchestration.grid: check every
config, skip FINISHED runs, GPU memory, leases, time groups, parent runs) around the launcher; any other app gets
Hydra's basic sweeper, so the sweeper and both launchers work for any Hydra app.
"""

import dataclasses
import typing as tp

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from sweep.core import SWEEP_APP
from sweep.core.compose import compose_jobs


@dataclasses.dataclass
class ScalingUnetSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.scaling_unet.sweeper.ComposeOnceSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="scaling_unet", node=ScalingUnetSweeperConf,
                             provider="scaling_unet")


class _Orchestrated:
    """The launcher as the basic sweeper sees it: ``launch`` wrapped in the sweep's logic (sweep.orchestration.grid)."""

    def __init__(self, launcher: tp.Any, sweeper: "ComposeOnceSweeper") -> None:
        self._launcher, self._sweeper = launcher, sweeper

    def __getattr__(self, name: str) -> tp.Any:
        return getattr(self._launcher, name)

    def launch(self, job_overrides: tp.Sequence[tp.Sequence[str]], initial_job_idx: int) -> tp.Sequence[JobReturn]:
        from sweep.orchestration.grid import launch_batch

        composed = self._sweeper.take_composed(job_overrides, initial_job_idx)
        return launch_batch(self._launcher, self._sweeper.config, composed)


class ComposeOnceSweeper(BasicSweeper):
    """Hydra's basic sweeper, but a batch is composed once (the fast way) to validate it, and that composition is
    what the sweep's checks read (192 compound jobs: ~1 s instead of ~30 s)."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self._composed: tp.Optional[list] = None
        self.orchestrated = bool(getattr(task_function, SWEEP_APP, False))
        if self.orchestrated:
            self.launcher = _Orchestrated(self.launcher, self)

    def validate_batch_is_legal(self, batch: tp.Sequence[tp.Sequence[str]]) -> None:
        assert self.hydra_context is not None and self.config is not None
        self._composed = compose_jobs(self.hydra_context.config_loader, self.config, batch)  # raises as Hydra would

    def take_composed(self, job_overrides: tp.Sequence[tp.Sequence[str]], initial_job_idx: int) -> list:
        composed, self._composed = self._composed, None
        if composed is None or [list(o) for _, o, _ in composed] != [list(o) for o in job_overrides]:
            assert self.hydra_context is not None and self.config is not None
            return compose_jobs(self.hydra_context.config_loader, self.config, job_overrides, initial_job_idx)
        return [(initial_job_idx + i, o, cfg) for i, (_, o, cfg) in enumerate(composed)]
