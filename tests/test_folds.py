"""Per-sample 4-fold cross-validation: deterministic, disjoint, balanced, test samples apart."""

from __future__ import annotations

import collections

import pytest

from data.errors import DataError
from data.folds import assign_folds, split_fold
from data.manifest import load_dataset
from tests.conftest import write_raw_dataset


@pytest.fixture
def paper_like(tmp_path):
    # 14 training + 3 test samples, like the paper.
    write_raw_dataset(tmp_path / "d", n_train=14, n_test=3, shape=(4, 4, 4))
    return load_dataset(tmp_path / "d")


def test_folds_are_deterministic_disjoint_and_cover_training(paper_like):
    a = assign_folds(paper_like.samples, 4, seed=0)
    assert a == assign_folds(paper_like.samples, 4, seed=0)
    assert set(a) == {s.id for s in paper_like.train}
    seen = set()
    for fold in range(4):
        train, val = split_fold(paper_like, fold)
        ids_t, ids_v = {s.id for s in train}, {s.id for s in val}
        assert not ids_t & ids_v and not ids_v & seen
        assert ids_t | ids_v == {s.id for s in paper_like.train}
        assert not {s.id for s in paper_like.test} & (ids_t | ids_v)
        seen |= ids_v
    assert seen == set(a)


def test_folds_are_balanced_in_size_and_strata(paper_like):
    a = assign_folds(paper_like.samples, 4, seed=3)
    sizes = collections.Counter(a.values())
    assert sorted(sizes.values()) == [3, 3, 4, 4]
    by_stratum = collections.defaultdict(collections.Counter)
    for s in paper_like.train:
        by_stratum[(s.alloy, s.beamline)][a[s.id]] += 1
    for key, per_fold in by_stratum.items():
        n = sum(per_fold.values())
        # A stratum with n samples is spread so no fold holds more than ceil(n / 4) of it.
        assert max(per_fold.values()) <= -(-n // 4), (key, per_fold)


def test_seed_changes_the_assignment(paper_like):
    assert assign_folds(paper_like.samples, 4, seed=0) != assign_folds(paper_like.samples, 4, seed=1)


def test_fold_out_of_range_and_no_training_samples(paper_like, tmp_path):
    for bad in (-1, 4):
        with pytest.raises(DataError, match=r"fold: must be in 0\.\.3"):
            split_fold(paper_like, bad)
    write_raw_dataset(tmp_path / "t", n_train=0, n_test=2, shape=(4, 4, 4))
    with pytest.raises(DataError, match="no training samples"):
        split_fold(load_dataset(tmp_path / "t"), 0)
