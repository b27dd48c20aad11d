"""Augmentation parameters (paper, Training section) as plain data, importable without TensorFlow."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation parameters; the defaults are the paper's where it gives them."""

    input_size: int = 384
    area_range: tuple[float, float] = (0.85, 1.0)
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip: bool = True
    rotation_deg: float = 90.0
    # Elastic deformation: Gaussian displacements on a coarse grid, smoothly interpolated (not
    # given in the paper; sized so structures bend but do not tear).
    elastic_grid: int = 6
    elastic_sigma: float = 0.01  # displacement std at grid points, as a fraction of input_size
    brightness: float = 0.1  # additive, uniform in [-b, b]
    contrast: tuple[float, float] = (0.8, 1.2)  # multiplicative about the patch mean

    def __post_init__(self) -> None:
        if self.input_size <= 0:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        lo, hi = self.area_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"area_range must satisfy 0 < low <= high <= 1, got {self.area_range}")
        if not 0 < self.aspect_range[0] <= self.aspect_range[1]:
            raise ValueError(f"aspect_range invalid: {self.aspect_range}")
