"""Hydra entry point, sweep launch logic and MLflow tracking of scaling-unet training runs."""

from pathlib import Path

from omegaconf import OmegaConf

# conf/ uses ${abspath:...} so every process of a sweep (local workers, SLURM jobs) sees the same folders.
if not OmegaConf.has_resolver("abspath"):
    OmegaConf.register_new_resolver("abspath", lambda p: str(Path(str(p)).expanduser().resolve()))
