"""Slicing along S_rc, S_cp, S_pr, read lazily from HDF5."""

from __future__ import annotations

import collections

import h5py
import numpy as np
import pytest

from data.errors import DataError
from data.manifest import load_dataset
from data.slicing import iter_slices, random_training_slices, take_slice


def test_plane_definitions_match_the_paper(prepared_dataset):
    s = load_dataset(prepared_dataset).samples[0]
    with h5py.File(s.image.path) as f:
        v = f["image"][...]
        ds = f["image"]
        np.testing.assert_array_equal(take_slice(ds, "rc", 3), v[3, :, :])  # S_n(i, j) = V(n, i, j)
        np.testing.assert_array_equal(take_slice(ds, "cp", 5), v[:, 5, :])  # V(i, n, j)
        np.testing.assert_array_equal(take_slice(ds, "pr", 7), v[:, :, 7])  # V(i, j, n)
    with pytest.raises(DataError, match="plane"):
        take_slice(v, "xy", 0)


def test_iter_slices_covers_every_slice_of_every_plane(prepared_dataset):
    samples = load_dataset(prepared_dataset).train[:2]
    got = collections.Counter((sid, plane) for sid, plane, *_ in iter_slices(samples))
    assert got == {(s.id, p): n for s in samples for p, n in zip(("rc", "cp", "pr"), (20, 24, 28))}


def _class_of(image_slice: np.ndarray) -> np.ndarray:
    # The fixture encodes the class in the grey value: prepared value ≈ (1000·c + 500 + noise) rescaled.
    return np.clip(np.rint(image_slice * 3), 0, 3).astype(np.uint8)


def test_training_stream_pairs_images_with_their_labels_and_mixes_planes(prepared_dataset):
    samples = load_dataset(prepared_dataset).train
    shapes = collections.Counter()
    stream = random_training_slices(samples, seed=0, open_slabs=4)
    for _ in range(300):
        img, lab = next(stream)
        assert img.shape == lab.shape
        assert (_class_of(img) == lab).mean() > 0.99
        shapes[img.shape] += 1
    assert set(shapes) == {(24, 28), (20, 28), (20, 24)}  # rc, cp and pr slices all drawn


def test_training_stream_is_seeded(prepared_dataset):
    samples = load_dataset(prepared_dataset).train
    a = random_training_slices(samples, seed=7)
    b = random_training_slices(samples, seed=7)
    c = random_training_slices(samples, seed=8)
    xs = [next(a)[0] for _ in range(20)]
    ys = [next(b)[0] for _ in range(20)]
    zs = [next(c)[0] for _ in range(20)]
    assert all(np.array_equal(x, y) for x, y in zip(xs, ys))
    assert not all(x.shape == z.shape and np.array_equal(x, z) for x, z in zip(xs, zs))


def test_training_stream_needs_labels(prepared_dataset):
    ds = load_dataset(prepared_dataset)
    import dataclasses

    unlabeled = dataclasses.replace(ds.train[0], label=None)
    with pytest.raises(DataError, match="has no label volume"):
        next(random_training_slices([unlabeled], seed=0))
