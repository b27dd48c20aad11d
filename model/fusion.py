"""Multi-axes prediction fusing (paper, Eq. 4 and Eq. 5) on stacks of per-plane class probabilities.

Both votes take an array ``(M, ..., K)`` (M planes, K classes, any spatial shape in between) of
probabilities — float in [0, 1], or uint8 with 255 = 1 as the per-plane files store them — and
return uint8 labels of the spatial shape. They work on one block at a time; the caller streams
blocks, so memory never holds a whole volume per plane.
"""

from __future__ import annotations

import numpy as np

VOTES = ("soft", "majority")


def _check(stack: np.ndarray) -> np.ndarray:
    stack = np.asarray(stack)
    if stack.ndim < 2:
        raise ValueError(f"expected (planes, ..., classes), got shape {stack.shape}")
    return stack


def mean_probabilities(stack: np.ndarray) -> np.ndarray:
    """Eq. 4, the average: P_avr = (1/M) Σ_i P_i, float32 in [0, 1] (uint8 inputs are read as /255)."""
    stack = _check(stack)
    total = stack.sum(axis=0, dtype=np.float32)
    scale = 255.0 if stack.dtype == np.uint8 else 1.0
    return total / np.float32(stack.shape[0] * scale)


def soft_vote(stack: np.ndarray) -> np.ndarray:
    """Eq. 4, soft voting: label = argmax_k (1/M) Σ_i P_i[k] (the 1/M does not change the argmax)."""
    stack = _check(stack)
    total = stack.sum(axis=0, dtype=np.uint32 if stack.dtype == np.uint8 else np.float32)
    return np.argmax(total, axis=-1).astype(np.uint8)


def majority_vote(stack: np.ndarray) -> np.ndarray:
    """Eq. 5, majority voting: argmax each P_i, then the per-voxel mode of the M label volumes.

    The paper does not say how ties are broken (with 3 planes and 4 classes every plane may vote
    differently); we give a tie to the tied class with the highest summed probability, i.e. the
    soft vote among the tied classes, so that the result does not favour low class indices.
    """
    stack = _check(stack)
    m, k = stack.shape[0], stack.shape[-1]
    labels = np.argmax(stack, axis=-1)
    counts = np.zeros(stack.shape[1:], np.float64)
    for c in range(k):
        counts[..., c] = (labels == c).sum(axis=0)
    total = stack.sum(axis=0, dtype=np.float64)
    scale = 255.0 if stack.dtype == np.uint8 else 1.0
    # A vote outweighs any probability sum (≤ M): counts first, probabilities only among ties.
    key = counts * (m + 1) + total / scale
    return np.argmax(key, axis=-1).astype(np.uint8)


def vote(stack: np.ndarray, method: str) -> np.ndarray:
    """``soft`` (Eq. 4) or ``majority`` (Eq. 5)."""
    if method == "soft":
        return soft_vote(stack)
    if method == "majority":
        return majority_vote(stack)
    raise ValueError(f"vote must be one of {VOTES}, got {method!r}")


def quantize_probabilities(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] → uint8 (255 = 1): per-plane files are 4× smaller than float32.

    The step 1/255 only changes a label where two classes are within 0.4 % of each other.
    """
    return np.clip(np.rint(np.asarray(probs, np.float32) * 255.0), 0, 255).astype(np.uint8)



UNCERTAINTY_MAPS = ("confidence", "disagreement", "plane_classes")
# An ensemble's map beside them: the fraction of its fold models whose label differs from the ensemble's, averaged
# over the planes (uint8, 255 = every fold model disagrees in every plane); written only for several models.
FOLD_DISAGREEMENT = "fold_disagreement"


def uncertainty_maps(stack: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-voxel uncertainty of a fused label (not in the paper; written by ``--uncertainty``), all uint8:

    * ``confidence``: the soft-vote probability of the chosen class, P_avr[label] of Eq. 4, 255 = 1;
    * ``disagreement``: the fraction of the M planes whose own label (argmax P_i) differs from the
      fused one, 255 = all planes differ, 0 = every plane agrees;
    * ``plane_classes``: bit c set when at least one plane's own label is class c (what any plane
      would assign; the upper end of the measure intervals of Table 3).
    """
    stack = _check(stack)
    labels = np.asarray(labels)
    m, k = stack.shape[0], stack.shape[-1]
    own = np.argmax(stack, axis=-1)
    differ = (own != labels[None]).sum(axis=0)
    p = np.take_along_axis(mean_probabilities(stack), labels[..., None].astype(np.intp), axis=-1)[..., 0]
    classes = np.zeros(labels.shape, np.uint8)
    for c in range(k):
        classes |= ((own == c).any(axis=0).astype(np.uint8) << c)
    return {"confidence": np.clip(np.rint(p * 255.0), 0, 255).astype(np.uint8),
            "disagreement": np.rint(differ * (255.0 / m)).astype(np.uint8),
            "plane_classes": classes}
