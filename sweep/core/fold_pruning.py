"""Fold-level early stopping for grid sweeps (opt-in, ``fold_pruning.test``): skip a config's remaining folds once its
finished folds are significantly worse than the best config's on the same folds.

The rule (:func:`skip_remaining_folds`): when fold f of config C is about to train and C has finished at least
``min_folds`` folds, take the best other config B (highest mean IoU over C's finished folds, among the configs that
finished all of them) and test, one-sided and paired over those folds (the folds are the same splits for every
config), whether C is worse than B. If p < ``fold_pruning.p``, fold f is not trained: an MLflow run KILLED and
tagged ``skipped_reason`` + ``fold_pruned`` records why. Off by default: the paper trains all 192 runs.

Tests: ``paired_t`` (scipy's ttest_rel, alternative="less"), or ``wilcoxon`` (the signed-rank test of Optuna's
WilcoxonPruner, exact). With n paired folds the smallest one-sided Wilcoxon p is 2^-n: 4 folds leave at most 3
finished ones before the last fold, 0.125, so at p=0.1 it could never skip a fold and is refused.
"""

from __future__ import annotations

import dataclasses
import math
import typing as tp

from sweep.core.errors import ConfigError

TESTS = ("paired_t", "wilcoxon")
TAG_FOLD_PRUNED = "fold_pruned"


@dataclasses.dataclass(frozen=True)
class FoldPruning:
    test: tp.Optional[str]  # None: off
    p: float = 0.1
    min_folds: int = 2

    @property
    def on(self) -> bool:
        return self.test is not None


def fold_pruning_setting(cfg: tp.Any, num_folds: int) -> FoldPruning:
    """``fold_pruning`` of a composed config, checked (raises ConfigError naming the field)."""
    node = cfg.get("fold_pruning") if hasattr(cfg, "get") else None
    if not node or node.get("test") in (None, "none", False):
        return FoldPruning(None)
    test = str(node.get("test"))
    if test not in TESTS:
        raise ConfigError("fold_pruning.test", f"must be null, {' or '.join(TESTS)}; got {test!r}")
    p = node.get("p", 0.1)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) < 1.0:
        raise ConfigError("fold_pruning.p", f"must be a number in (0, 1), got {p!r}")
    n = node.get("min_folds", 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError("fold_pruning.min_folds", f"must be an integer >= 2 (a paired test needs two folds), got {n!r}")
    if n > num_folds - 1:
        raise ConfigError("fold_pruning.min_folds", f"{n} finished folds leave no fold of {num_folds} to skip")
    if test == "wilcoxon" and 2.0 ** -(num_folds - 1) >= float(p):
        raise ConfigError("fold_pruning.test", f"wilcoxon over at most {num_folds - 1} finished folds cannot reach "
                                               f"p < {p} (its smallest one-sided p is {2.0 ** -(num_folds - 1):.3g}); "
                                               "use paired_t or more folds")
    return FoldPruning(test, float(p), n)


def paired_worse_p(mine: tp.Sequence[float], best: tp.Sequence[float], test: str) -> float:
    """One-sided p-value that ``mine`` is worse (lower IoU) than ``best``, paired fold by fold."""
    import numpy as np
    from scipy import stats

    a, b = np.asarray(mine, float), np.asarray(best, float)
    d = a - b
    if np.all(d == 0):
        return 1.0
    if test == "paired_t":
        if np.ptp(d) <= 1e-12:  # the same gap on every fold (to rounding): certain, but t is undefined
            return 0.0 if d[0] < 0 else 1.0
        return float(stats.ttest_rel(a, b, alternative="less").pvalue)
    return float(stats.wilcoxon(a, b, alternative="less", method="exact").pvalue)


@dataclasses.dataclass(frozen=True)
class FoldSkip:
    reason: str
    p: float
    best_key: str
    folds: tuple[int, ...]


def skip_remaining_folds(key: str, fold: int, finished: tp.Mapping[str, tp.Mapping[int, float]],
                         setting: FoldPruning) -> tp.Optional[FoldSkip]:
    """Whether fold ``fold`` of config ``key`` is skipped, given every config's finished folds (fold → mean IoU)."""
    if not setting.on:
        return None
    mine = {f: v for f, v in finished.get(key, {}).items() if v is not None and math.isfinite(v)}
    if fold in mine or len(mine) < setting.min_folds:
        return None
    folds = tuple(sorted(mine))
    rivals = {k: [runs[f] for f in folds] for k, runs in finished.items()
              if k != key and all(f in runs and math.isfinite(runs[f]) for f in folds)}
    if not rivals:
        return None
    best_key = max(rivals, key=lambda k: (sum(rivals[k]), k))
    ours = [mine[f] for f in folds]
    if sum(rivals[best_key]) <= sum(ours):
        return None
    p = paired_worse_p(ours, rivals[best_key], setting.test or "paired_t")
    if not p < setting.p:
        return None
    n = len(folds)
    reason = (f"fold pruning ({setting.test}): folds {','.join(map(str, folds))} mean IoU {sum(ours) / n:.4f} < "
              f"{sum(rivals[best_key]) / n:.4f} of config {best_key} on the same folds, one-sided p={p:.3g} < "
              f"{setting.p:g}")
    return FoldSkip(reason, p, best_key, folds)
