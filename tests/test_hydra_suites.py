"""Hydra's own plugin test suites (hydra-core's ``hydra.test_utils.launcher_common_tests``, with the fixtures of its
pytest plugin, as hydra-submitit-launcher's tests use them) against this project's launchers and sweeper, on apps
that are not scaling-unet: the launchers and the sweeper must work for any Hydra app.

The SLURM suites run on the test cluster (tests/slurm_fixture.py), waiting mode; submit-and-exit has its own tests
(test_sweep_lifecycle.py).
"""

from __future__ import annotations

import pytest
from pytest import mark

from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.test_utils.launcher_common_tests import (BatchedSweeperTestSuite, IntegrationTestSuite,
                                                   LauncherTestSuite)
from hydra_plugins.scaling_unet.pool import PoolLauncher
from hydra_plugins.scaling_unet.slurm_array import SlurmArrayLauncher
from hydra_plugins.scaling_unet.sweeper import ComposeOnceSweeper
from tests.slurm_fixture import JOB_PREFIX, slurm_cluster  # noqa: F401

POOL = ["hydra.launcher.n_workers=2"]
# The test cluster: partition gpu, no GPUs asked for, one core and a little memory per job, a quick poll.
SLURM = ["hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=5", "hydra.launcher.poll_interval_s=0.5",
         f"hydra.launcher.name={JOB_PREFIX}hydra-suite"]


@pytest.fixture(autouse=True)
def fresh_version_base():
    """Hydra's suites expect a fresh process: no version_base set yet (its legacy default: jobs chdir to their
    folder). Tests that ran before in this session set it with initialize(version_base="1.3")."""
    from hydra.core.singleton import Singleton
    from hydra.version import VersionBase

    saved = Singleton.get_state()
    Singleton._instances.pop(VersionBase, None)
    yield
    Singleton.set_state(saved)


@mark.parametrize("cls, kind", [(PoolLauncher, Launcher), (SlurmArrayLauncher, Launcher), (ComposeOnceSweeper, Sweeper)])
def test_discovery(cls, kind) -> None:
    assert cls.__name__ in [x.__name__ for x in Plugins.instance().discover(kind)]


@mark.parametrize("launcher_name, overrides", [("scaling_unet_pool", POOL)])
class TestPoolLauncher(LauncherTestSuite):
    pass


@mark.parametrize("task_launcher_cfg, extra_flags",
                  [({}, ["-m", "hydra/hydra_logging=disabled", "hydra/job_logging=disabled",
                         "hydra/launcher=scaling_unet_pool", *POOL])])
class TestPoolLauncherIntegration(IntegrationTestSuite):
    pass


@mark.usefixtures("slurm_cluster")
@mark.parametrize("launcher_name, overrides", [("scaling_unet_slurm", SLURM)])
class TestSlurmArrayLauncher(LauncherTestSuite):
    pass


@mark.usefixtures("slurm_cluster")
@mark.parametrize("task_launcher_cfg, extra_flags",
                  [({}, ["-m", "hydra/hydra_logging=disabled", "hydra/job_logging=disabled",
                         "hydra/launcher=scaling_unet_slurm", *SLURM])])
class TestSlurmArrayLauncherIntegration(IntegrationTestSuite):
    pass


@mark.parametrize("launcher_name, overrides", [("basic", ["hydra/sweeper=scaling_unet"]),
                                               ("scaling_unet_pool", ["hydra/sweeper=scaling_unet", *POOL])])
class TestSweeperWithLaunchers(LauncherTestSuite):
    pass


@mark.parametrize("task_launcher_cfg, extra_flags",
                  [({}, ["-m", "hydra/hydra_logging=disabled", "hydra/job_logging=disabled",
                         "hydra/sweeper=scaling_unet"])])
class TestSweeperIntegration(IntegrationTestSuite):
    pass


@mark.parametrize("launcher_name, overrides", [("basic", ["hydra/sweeper=scaling_unet",
                                                          "hydra.sweeper.max_batch_size=2"])])
class TestSweeperBatches(BatchedSweeperTestSuite):
    pass
