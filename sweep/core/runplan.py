"""The run plan: one (config, fold) resolved and checked before anything runs; its config key."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from data.augment import AugmentConfig
from model.complexity import count_flops, count_params
from model.schedule import TrainSettings, paper_batch_size
from sweep.core.errors import ConfigError
from sweep.core.fold_pruning import fold_pruning_setting
from sweep.core.params import config_key

KEY_EXCLUDE = ("fold", "mlflow", "paths", "hydra", "experiment_name", "objectives", "task", "fusing", "on_oom",
               "optuna_trial", "batch_halved", "allow_stand_in", "fold_pruning")


TRAIN_KEY_EXCLUDE = ("cpu_replicas", "jit_compile")


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What one run will do, resolved and checked."""

    width: int  # as trained (after the profile's scaling)
    depth: int
    input_size: int
    paper_width: int  # as configured (the paper's grid value)
    paper_input_size: int
    fold: int
    num_folds: int
    settings: TrainSettings
    augment: AugmentConfig
    dataset: Path
    config_key: str
    ckpt_dir: Path
    tracking_uri: str
    experiment: str
    flops: int
    params: int

    @property
    def run_name(self) -> str:
        return f"c{self.paper_width}-d{self.depth}-is{self.paper_input_size}-fold{self.fold}"


def _int(cfg: DictConfig, field: str) -> int:
    value = OmegaConf.select(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    return value


#: Switches of the training config: true or false, nothing else ("maybe" was read as true: allow_stand_in=maybe
#: started stand-in GPU jobs).
BOOLEAN_FIELDS = ("allow_stand_in", "mlflow.offline", "train.jit_compile", "data.synthesize",
                  "data.augment.horizontal_flip", "fusing.keep_planes", "fusing.progress", "fusing.ensemble")


def _check_boolean(cfg: DictConfig, field: str) -> None:
    value = OmegaConf.select(cfg, field, default=None)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(field, f"must be true or false, got {value!r}")


def plan_run(cfg: DictConfig) -> RunPlan:
    """Resolve and check a run's config. Raises ConfigError naming the field; touches no file."""
    width, depth, input_size, fold = (_int(cfg, f) for f in ("model.width", "model.depth", "model.input_size", "fold"))
    if width <= 0:
        raise ConfigError("model.width", f"must be positive, got {width}")
    if depth < 1:
        raise ConfigError("model.depth", f"must be at least 1, got {depth}")
    if input_size <= 0 or input_size % 2**depth:
        raise ConfigError("model.input_size", f"{input_size} is not divisible by 2^depth = {2**depth} (depth {depth})")
    num_folds = _int(cfg, "data.num_folds")
    if not 0 <= fold < num_folds:
        raise ConfigError("fold", f"must be in 0..{num_folds - 1}, got {fold}")
    divisor = int(OmegaConf.select(cfg, "profile.width_divisor", default=1) or 1)
    size_map = {int(k): int(v) for k, v in (OmegaConf.select(cfg, "profile.input_size_map", default={}) or {}).items()}
    for field in ("mlflow.outage_tolerance_s", "mlflow.end_wait_s", "mlflow.start_wait_s"):
        _check_seconds(cfg, field)
    interval = OmegaConf.select(cfg, "mlflow.system_metrics_interval_s", default=None)
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float))
                                 or not math.isfinite(interval) or interval < 0):
        raise ConfigError("mlflow.system_metrics_interval_s", f"must be a finite number of seconds >= 0 (0: off), "
                                                              f"got {interval!r}")
    fold_pruning_setting(cfg, num_folds)
    for field in BOOLEAN_FIELDS:
        _check_boolean(cfg, field)
    replicas = OmegaConf.select(cfg, "train.cpu_replicas", default=None)
    if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1):
        raise ConfigError("train.cpu_replicas", f"must be a whole number of logical CPU devices >= 1 (or null), "
                                                f"got {replicas!r}")
    eff_width = max(1, round(width / divisor))
    eff_size = size_map.get(input_size, input_size)
    if eff_size % 2**depth:
        raise ConfigError("profile.input_size_map", f"maps input size {input_size} to {eff_size}, not divisible by 2^{depth}")
    flops = count_flops(eff_width, depth, eff_size)
    train = OmegaConf.to_container(cfg.train, resolve=True)
    batch = train.pop("batch_size")
    if batch == "auto":
        batch = paper_batch_size(flops)
    try:
        settings = TrainSettings(batch_size=int(batch), seed=int(cfg.seed), planes=tuple(train.pop("planes")), **train)
    except (TypeError, ValueError) as exc:
        raise ConfigError("train", str(exc)) from None
    if settings.jit_compile and (settings.cpu_replicas or 1) > 1:
        from model.devices import JIT_MANY_REPLICAS

        raise ConfigError("train.jit_compile", JIT_MANY_REPLICAS.format(n=settings.cpu_replicas))
    if settings.cpu_replicas and settings.batch_size % settings.cpu_replicas:
        raise ConfigError("train.batch_size", f"{settings.batch_size} does not split evenly over train.cpu_replicas="
                                              f"{settings.cpu_replicas}; use a multiple of {settings.cpu_replicas}")
    aug = OmegaConf.to_container(cfg.data.augment, resolve=True)
    try:
        augment = AugmentConfig(input_size=eff_size, **{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError("data.augment", str(exc)) from None
    # A launcher's composed config still holds hydra.* with job-time values (hydra.job.num): leave it out.
    user_cfg = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    key_cfg = {k: v for k, v in user_cfg.items() if k not in KEY_EXCLUDE}
    # Where a run trains (N CPU stand-ins or N GPUs) is not what it computes: the same key either way.
    key_cfg["train"] = {k: v for k, v in key_cfg.get("train", {}).items() if k not in TRAIN_KEY_EXCLUDE}
    key = config_key(key_cfg)
    dataset = OmegaConf.select(cfg, "data.dataset")
    if dataset in (None, "???"):
        raise ConfigError("data.dataset", "missing: give the prepared dataset folder")
    return RunPlan(width=eff_width, depth=depth, input_size=eff_size, paper_width=width, paper_input_size=input_size,
                   fold=fold, num_folds=num_folds, settings=settings, augment=augment, dataset=Path(dataset),
                   config_key=key, ckpt_dir=Path(cfg.paths.checkpoints) / key / f"fold{fold}",
                   tracking_uri=str(cfg.mlflow.tracking_uri), experiment=str(cfg.mlflow.experiment), flops=flops,
                   params=count_params(eff_width, depth))


def _check_seconds(cfg: DictConfig, field: str) -> None:
    value = OmegaConf.select(cfg, field, default=None)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(field, f"must be a finite number of seconds >= 0, got {value!r}")
