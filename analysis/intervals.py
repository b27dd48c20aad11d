"""Measure intervals of a fused segmentation (not in the paper): each Table 3 measure on the labels narrowed and
widened by the planes' disagreement (uncertainty maps of model.fusion)."""

from __future__ import annotations

import math
import typing as tp

import numpy as np

from analysis.measures import BONE, RM, ArrayLike, implant_measures, volume_source
from data.errors import DataError

# The class whose uncertain voxels move each ML measure: DR counts residual material (v_r), BIC and
# BV/TV count bone (contact with the implant, bone in the ROI).
INTERVAL_CLASS = {"dr_mm_per_year": RM, "bic_percent": BONE, "bv_tv_percent": BONE}


class IntervalLabels:
    """One end of a measure interval, derived slab by slab from fused labels and the uncertainty maps.

    ``narrow``: a voxel of class c where any plane's own label differs (disagreement > 0) becomes
    background; ``wide``: a voxel of another class becomes c where at least one plane's own label
    is c (bit c of ``plane_classes``). Every other voxel keeps its fused label.
    """

    def __init__(self, labels: ArrayLike, disagreement: ArrayLike, plane_classes: ArrayLike, cls: int, end: str):
        if end not in ("narrow", "wide"):
            raise ValueError(f"end must be 'narrow' or 'wide', got {end!r}")
        for name, m in (("disagreement", disagreement), ("plane_classes", plane_classes)):
            if tuple(m.shape) != tuple(labels.shape):
                raise DataError(volume_source(m)[0], name, f"shape {tuple(m.shape)} differs from the labels' {tuple(labels.shape)}")
        self.labels, self.disagreement, self.plane_classes = labels, disagreement, plane_classes
        self.cls, self.end = int(cls), end
        self.shape, self.dtype, self.ndim = tuple(labels.shape), np.dtype(np.uint8), 3

    def __getitem__(self, key) -> np.ndarray:
        lab = np.array(self.labels[key], np.uint8)
        if self.end == "narrow":
            lab[(lab == self.cls) & (np.asarray(self.disagreement[key]) > 0)] = 0
        else:
            lab[(np.asarray(self.plane_classes[key]) & (1 << self.cls)) != 0] = self.cls
        return lab


def measure_intervals(labels: ArrayLike, disagreement: ArrayLike, plane_classes: ArrayLike, *,
                      fused: tp.Optional[dict] = None, **kwargs) -> dict[str, tuple[float, float]]:
    """Interval of each ML measure (DR, BIC, BV/TV) from the plane disagreement of a fused segmentation.

    For each measure, the measure of the fused labels and of the ``narrow`` and ``wide`` ends of
    :class:`IntervalLabels` for its class (:data:`INTERVAL_CLASS`); the interval is their [min, max],
    so it always holds the fused value. ``kwargs`` go to :func:`implant_measures`; ``fused``: its
    result on ``labels`` if already computed.
    """
    fused = fused or implant_measures(labels, **kwargs)
    ends = {(cls, end): implant_measures(IntervalLabels(labels, disagreement, plane_classes, cls, end), **kwargs)
            for cls in sorted(set(INTERVAL_CLASS.values())) for end in ("narrow", "wide")}
    out = {}
    for key, cls in INTERVAL_CLASS.items():
        vals = [float(fused[key]), float(ends[(cls, "narrow")][key]), float(ends[(cls, "wide")][key])]
        finite = [v for v in vals if not math.isnan(v)]
        out[key] = (min(finite), max(finite)) if finite else (math.nan, math.nan)
    return out
