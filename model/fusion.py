"""Multi-axes prediction fusing (paper, Eq. 4 and Eq. 5) on stacks of per-plane class probabilities.

Both votes take an array ``(M, ..., K)`` (M planes, K classes, any spatial shape in between) of
probabilities — float in [0, 1], or uint8 with 255 = 1 as the per-plane files store them — and
return uint8 labels of the spatial shape. They work on one block at a time; the caller streams
blocks, so memory never holds a whole volume per plane.
"""

from __future__ import annotations

import numpy as np

VOTES = ("soft", "majority")


class _NumpyOps:
    """The few ``keras.ops`` functions that the votes on accumulated totals use, for numpy arrays: one definition
    of each equation serves the host (numpy) and the device (``keras.ops``, model.resident)."""

    argmax = staticmethod(np.argmax)
    take_along_axis = staticmethod(np.take_along_axis)
    expand_dims = staticmethod(np.expand_dims)
    round = staticmethod(np.rint)
    clip = staticmethod(np.clip)
    sum = staticmethod(np.sum)

    @staticmethod
    def cast(x, dtype):
        return np.asarray(x).astype(dtype, copy=False)


NUMPY_OPS = _NumpyOps()


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


def mean_from_sums(sums, m: int, ops=None):
    """Eq. 4's P_avr from accumulated sums of uint8 probabilities (255 = 1) over ``m`` planes, float32."""
    ops = ops or NUMPY_OPS
    return ops.cast(sums, "float32") / float(int(m) * 255)


def soft_vote(stack: np.ndarray) -> np.ndarray:
    """Eq. 4, soft voting: label = argmax_k (1/M) Σ_i P_i[k] (the 1/M does not change the argmax)."""
    stack = _check(stack)
    total = stack.sum(axis=0, dtype=np.uint32 if stack.dtype == np.uint8 else np.float32)
    return soft_vote_from_sums(total)


def soft_vote_from_sums(sums, ops=None):
    """Eq. 4 on accumulated sums Σ_i P_i (…, K): argmax over classes, the first class on an exact tie.

    ``ops``: numpy (default) or ``keras.ops`` (the device-resident prediction votes on the device)."""
    ops = ops or NUMPY_OPS
    return ops.cast(ops.argmax(sums, axis=-1), "uint8")


def majority_vote(stack: np.ndarray) -> np.ndarray:
    """Eq. 5, majority voting: argmax each P_i, then the per-voxel mode of the M label volumes.

    The paper does not say how ties are broken (with 3 planes and 4 classes every plane may vote
    differently); we give a tie to the tied class with the highest summed probability, i.e. the
    soft vote among the tied classes, so that the result does not favour low class indices.
    """
    stack = _check(stack)
    m, k = stack.shape[0], stack.shape[-1]
    if stack.dtype == np.uint8:  # the plane files' probabilities: the same vote as on accumulated counts
        return majority_vote_from_counts(plane_votes(stack), stack.sum(axis=0, dtype=np.uint32), m)
    labels = np.argmax(stack, axis=-1)
    counts = np.zeros(stack.shape[1:], np.float64)
    for c in range(k):
        counts[..., c] = (labels == c).sum(axis=0)
    total = stack.sum(axis=0, dtype=np.float64)
    scale = 255.0 if stack.dtype == np.uint8 else 1.0
    # A vote outweighs any probability sum (≤ M): counts first, probabilities only among ties.
    key = counts * (m + 1) + total / scale
    return np.argmax(key, axis=-1).astype(np.uint8)


def plane_votes(stack: np.ndarray) -> np.ndarray:
    """Eq. 5's ballots: per voxel and class, how many of the M planes label it that class (argmax P_i), uint8."""
    stack = _check(stack)
    labels = np.argmax(stack, axis=-1)
    return np.stack([(labels == c).sum(axis=0, dtype=np.uint8) for c in range(stack.shape[-1])], axis=-1)


def majority_vote_from_counts(counts, sums, m: int, ops=None):
    """Eq. 5 on accumulated ballots: ``counts`` (…, K) planes per class, ``sums`` (…, K) Σ_i P_i in units of 1/255.

    Ties between classes with as many votes go to the larger probability sum, as :func:`majority_vote`; in
    integers, so numpy and a device agree exactly (a vote, (M + 1)·255, outweighs any sum, at most M·255)."""
    ops = ops or NUMPY_OPS
    key = ops.cast(counts, "int32") * ((int(m) + 1) * 255) + ops.cast(sums, "int32")
    return ops.cast(ops.argmax(key, axis=-1), "uint8")


def vote(stack: np.ndarray, method: str) -> np.ndarray:
    """``soft`` (Eq. 4) or ``majority`` (Eq. 5)."""
    if method == "soft":
        return soft_vote(stack)
    if method == "majority":
        return majority_vote(stack)
    raise ValueError(f"vote must be one of {VOTES}, got {method!r}")


def quantize_probabilities(probs, ops=None):
    """Probabilities in [0, 1] → uint8 (255 = 1): per-plane files are 4× smaller than float32.

    The step 1/255 only changes a label where two classes are within 0.4 % of each other. ``ops``: numpy
    (default) or ``keras.ops`` (the compiled forward of model.forward quantizes on the device).
    """
    ops = ops or NUMPY_OPS
    return ops.cast(ops.clip(ops.round(ops.cast(probs, "float32") * 255.0), 0, 255), "uint8")


def quantize_fraction(fraction, ops=None):
    """A fraction in [0, 1] (an ensemble's fold disagreement) → uint8 (255 = 1), as the plane files keep it."""
    ops = ops or NUMPY_OPS
    return ops.cast(ops.round(ops.clip(ops.cast(fraction, "float32"), 0, 1) * 255.0), "uint8")



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
    if stack.dtype == np.uint8:  # the plane files' probabilities: the same maps as on accumulated totals
        return uncertainty_from_totals(stack.sum(axis=0, dtype=np.uint32), plane_votes(stack), labels, m)
    own = np.argmax(stack, axis=-1)
    differ = (own != labels[None]).sum(axis=0)
    p = np.take_along_axis(mean_probabilities(stack), labels[..., None].astype(np.intp), axis=-1)[..., 0]
    classes = np.zeros(labels.shape, np.uint8)
    for c in range(k):
        classes |= ((own == c).any(axis=0).astype(np.uint8) << c)
    return {"confidence": np.clip(np.rint(p * 255.0), 0, 255).astype(np.uint8),
            "disagreement": np.rint(differ * (255.0 / m)).astype(np.uint8),
            "plane_classes": classes}


def uncertainty_from_totals(sums, counts, labels, m: int, ops=None) -> dict:
    """:func:`uncertainty_maps` from accumulated totals: ``sums`` Σ_i P_i (uint8 units), ``counts`` the planes'
    ballots per class (:func:`plane_votes`), ``labels`` the fused labels; numpy or ``keras.ops`` (``ops``)."""
    ops = ops or NUMPY_OPS
    at = ops.expand_dims(ops.cast(labels, "int32"), -1)
    p = ops.take_along_axis(mean_from_sums(sums, m, ops), at, axis=-1)[..., 0]
    counts = ops.cast(counts, "int32")
    differ = int(m) - ops.take_along_axis(counts, at, axis=-1)[..., 0]
    bits = np.asarray([1 << c for c in range(int(counts.shape[-1]))], np.int32)
    return {"confidence": ops.cast(ops.clip(ops.round(p * 255.0), 0, 255), "uint8"),
            "disagreement": ops.cast(ops.round(ops.cast(differ * 255, "float32") / float(m)), "uint8"),
            "plane_classes": ops.cast(ops.sum(ops.cast(counts > 0, "int32") * bits, axis=-1), "uint8")}


def fold_disagreement_from_sum(fold_sum, m: int, ops=None):
    """The planes' mean fold disagreement (uint8, 255 = every fold model disagrees) from its sum over ``m`` planes."""
    ops = ops or NUMPY_OPS
    return ops.cast(ops.round(ops.cast(fold_sum, "float32") / float(m)), "uint8")


def fuse_totals(sums, counts, fold_sum, m: int, vote: str, *, probabilities: bool, uncertainty: bool, ops=None):
    """(labels, P_avr as float16 or None, maps) of a block of accumulated totals over ``m`` planes (model.resident):
    Eq. 4 or 5 (``vote``), the uncertainty maps and an ensemble's fold disagreement; numpy or ``keras.ops``."""
    ops = ops or NUMPY_OPS
    lab = majority_vote_from_counts(counts, sums, m, ops) if vote == "majority" else soft_vote_from_sums(sums, ops)
    maps = uncertainty_from_totals(sums, counts, lab, m, ops) if uncertainty else {}
    if uncertainty and fold_sum is not None:
        maps[FOLD_DISAGREEMENT] = fold_disagreement_from_sum(fold_sum, m, ops)
    mean = ops.cast(mean_from_sums(sums, m, ops), "float16") if probabilities else None
    return lab, mean, maps


def map_names(uncertainty: bool, fold_disagreement: bool) -> list[str]:
    """The uncertainty maps a fused output holds: those of :func:`uncertainty_maps`, and an ensemble's fold
    disagreement when it has one."""
    return (list(UNCERTAINTY_MAPS) + ([FOLD_DISAGREEMENT] if fold_disagreement else [])) if uncertainty else []
