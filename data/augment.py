"""Augmentation parameters (paper, Training section) as plain data, importable without TensorFlow."""

from __future__ import annotations

import dataclasses

CROP_REFERENCES = ("input_size", "slice")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation parameters; the defaults are the paper's where it gives them.

    ``crop_reference`` says what the random patch covers 85–100 % of (the paper contradicts itself,
    README "Training crops"): ``input_size`` (default) a window of 85–100 % of IS², so the network
    trains at the scale it is tested at (full slices, no resizing); ``slice`` 85–100 % of the whole
    slice, resized to IS (the literal Implementation sentence: IS becomes a resolution knob).
    """

    input_size: int = 384
    crop_reference: str = "input_size"
    area_range: tuple[float, float] = (0.85, 1.0)
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    # crop_reference=input_size only: source pixels per patch pixel allowed on each axis. The paper's
    # aspect range alone would reach 0.80 / 1.15 at 85 % area; the aspect is drawn within both bounds.
    zoom_range: tuple[float, float] = (0.9, 1.1)
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
        if self.crop_reference not in CROP_REFERENCES:
            raise ValueError(f"crop_reference must be one of {list(CROP_REFERENCES)}, got {self.crop_reference!r}")
        lo, hi = self.area_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"area_range must satisfy 0 < low <= high <= 1, got {self.area_range}")
        if not 0 < self.aspect_range[0] <= self.aspect_range[1]:
            raise ValueError(f"aspect_range invalid: {self.aspect_range}")
        zlo, zhi = self.zoom_range
        if not 0 < zlo <= 1 <= zhi:
            raise ValueError(f"zoom_range must satisfy 0 < low <= 1 <= high, got {self.zoom_range}")
        if self.crop_reference == "input_size" and not (zlo * zlo <= lo and hi <= zhi * zhi):
            raise ValueError(f"zoom_range {self.zoom_range} cannot give every area in area_range {self.area_range}: "
                             f"need low² <= {lo} and {hi} <= high²")
