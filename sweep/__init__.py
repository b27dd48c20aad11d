"""Hydra entry point, sweep launch logic and MLflow tracking of scaling-unet training runs."""

from pathlib import Path

from omegaconf import OmegaConf

from model.quiet import quiet_tensorflow_logs

quiet_tensorflow_logs()  # before a job imports TensorFlow: no CUDA error lines on a machine without GPUs

# conf/ uses ${abspath:...} so every process of a sweep (local workers, SLURM jobs) sees the same folders.
if not OmegaConf.has_resolver("abspath"):
    OmegaConf.register_new_resolver("abspath", lambda p: str(Path(str(p)).expanduser().resolve()))


def _mkdir(path: str) -> str:
    Path(str(path)).mkdir(parents=True, exist_ok=True)
    return str(path)


# ${mkdir:...} for paths that a plugin opens before any of our code runs (the Optuna study's SQLite file).
if not OmegaConf.has_resolver("mkdir"):
    OmegaConf.register_new_resolver("mkdir", _mkdir)
