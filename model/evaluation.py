"""Evaluation: per-class IoU (paper, Eq. 6) from an accumulated confusion matrix."""

from __future__ import annotations

import math
import typing as tp

import numpy as np

CLASS_NAMES = ("background", "bone", "degradation_layer", "residual_material")
FOREGROUND = (1, 2, 3)  # the paper averages IoU over bone, DL and RM


def confusion_matrix(reference: np.ndarray, prediction: np.ndarray, num_classes: int = 4) -> np.ndarray:
    """``cm[i, j]`` = number of voxels of reference class i predicted as class j (int64)."""
    ref = np.asarray(reference, np.int64).ravel()
    pred = np.asarray(prediction, np.int64).ravel()
    if ref.shape != pred.shape:
        raise ValueError(f"reference and prediction differ in size: {ref.size} vs {pred.size}")
    return np.bincount(ref * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """Eq. 6: IoU = TP / (TP + FP + FN) per class; NaN for a class absent from both reference and prediction."""
    cm = np.asarray(cm, np.float64)
    tp_ = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1) - tp_
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp_ / denom, np.nan)


def mean_iou(iou: tp.Sequence[float], classes: tp.Sequence[int] = FOREGROUND) -> float:
    """Paper: mean IoU over bone, degradation layer and residual material (background excluded)."""
    return float(np.nanmean([iou[c] for c in classes]))


def iou_metrics(cm: np.ndarray) -> dict[str, float]:
    """``iou_bone``, ``iou_degradation_layer``, ``iou_residual_material``, ``mean_iou`` from a confusion matrix."""
    iou = iou_per_class(cm)
    out = {f"iou_{CLASS_NAMES[c]}": float(iou[c]) for c in FOREGROUND}
    out["mean_iou"] = mean_iou(iou)
    return out


def mean_and_standard_error(values: tp.Sequence[float]) -> tuple[float, float]:
    """Paper: mean ± standard error over folds, SE = sample std (ddof=1) / sqrt(n); SE of one value is NaN."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
