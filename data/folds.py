"""Per-sample cross-validation (paper: 4-fold CV over the 14 training samples, never over slices)."""

from __future__ import annotations

import collections
import hashlib
import typing as tp

import numpy as np

from data.errors import DataError
from data.manifest import Dataset, Sample

PAPER_NUM_FOLDS = 4


def _stable_rng(seed: int, key: str) -> np.random.Generator:
    # Seeded by content, so adding a sample of another stratum does not reshuffle this one.
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def assign_folds(samples: tp.Sequence[Sample], num_folds: int = PAPER_NUM_FOLDS, seed: int = 0) -> dict[str, int]:
    """Paper: 4-fold cross-validation over samples. Deterministic, balanced by (alloy, beamline).

    Training samples are grouped into strata by (alloy, beamline), shuffled within each stratum from
    ``seed``, and dealt round-robin; the deal continues across strata so fold sizes differ by at most
    one and each stratum is spread over as many folds as it has samples. Test samples get no fold.
    """
    train = [s for s in samples if s.split == "train"]
    if num_folds < 2:
        raise DataError(None, "num_folds", f"need at least 2 folds, got {num_folds}")
    if len(train) < num_folds:
        raise DataError(None, "samples", f"{len(train)} training samples cannot make {num_folds} folds")
    strata: dict[tuple[str, str], list[Sample]] = collections.defaultdict(list)
    for s in sorted(train, key=lambda s: s.id):
        strata[(s.alloy, s.beamline)].append(s)
    folds: dict[str, int] = {}
    sizes = [0] * num_folds
    # Largest strata first, so the small ones fill the folds that are still short.
    for key in sorted(strata, key=lambda k: (-len(strata[k]), k)):
        members = strata[key]
        order = _stable_rng(seed, "|".join(key)).permutation(len(members))
        in_fold = [0] * num_folds
        for i in order:
            fold = min(range(num_folds), key=lambda f: (sizes[f], in_fold[f], f))
            folds[members[i].id] = fold
            sizes[fold] += 1
            in_fold[fold] += 1
    return folds


def split_fold(dataset: Dataset, fold: int, num_folds: int = PAPER_NUM_FOLDS, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(training samples, validation samples) of one fold; test samples are in neither."""
    if not 0 <= fold < num_folds:
        raise DataError(dataset.manifest, "fold", f"must be in 0..{num_folds - 1}, got {fold}")
    if not dataset.train:
        raise DataError(dataset.manifest, "samples", "dataset has no training samples (split: train)")
    folds = assign_folds(dataset.samples, num_folds, seed)
    train = [s for s in dataset.train if folds[s.id] != fold]
    val = [s for s in dataset.train if folds[s.id] == fold]
    return train, val
