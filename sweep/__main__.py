"""``python -m sweep``: one training run from conf/; ``-m`` runs a sweep (``+experiment=compound``) through the launchers."""

from __future__ import annotations

import logging
import os
import sys
import typing as tp

# MLflow's HTTP layer retries for minutes on its own; ours (sweep.tracking) retries and then fails loudly.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from data.errors import DataError
from model.devices import DeviceError
from sweep.core import SWEEP_APP
from sweep.core.errors import ConfigError
from sweep.core.results import objective_values
from sweep.jobs.fusing import run_fusing
from sweep.jobs.train import run
from sweep.resources.standin import check_stand_in
from sweep.slurm.lease import LeaseHeld
from sweep.tracking.client import TrackingError

log = logging.getLogger("sweep")


def task(cfg: DictConfig) -> tp.Any:
    try:
        if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep's jobs were checked by its sweeper (prepare_sweep)
            check_stand_in([cfg], launcher=HydraConfig.get().launcher, log=log)
        if cfg.get("task", "train") == "fusing":

            return objective_values(cfg, run_fusing(cfg))
        if cfg.get("task", "train") != "train":
            raise ConfigError("task", f"must be train or fusing, got {cfg.task!r}")
        return objective_values(cfg, run(cfg))
    except (ConfigError, DataError, TrackingError, DeviceError) as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        log.error("error: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except LeaseHeld as exc:  # not bad input: another live job trains this (config, fold)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        log.error("error: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)


setattr(task, SWEEP_APP, True)  # hydra/sweeper=scaling_unet: the sweep's checks around the launcher
main = hydra.main(version_base="1.3", config_path="../conf", config_name="config")(task)


if __name__ == "__main__":
    main()
