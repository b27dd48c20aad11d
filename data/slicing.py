"""Slicing a volume along its three axes (paper, Data section), read lazily from HDF5.

V ∈ R^{H×W×D}; S_rc: S_n(i, j) = V(n, i, j); S_cp: V(i, n, j); S_pr: V(i, j, n).
Slices are never written to disk: training reads whole chunk-aligned slabs along a random axis and
hands out their slices in random order, so each HDF5 chunk is read once per slab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing as tp

import numpy as np

from data.errors import DataError
from data.manifest import Sample
from data.volume import VolumeRef, open_volume, read_checked

PLANES: dict[str, int] = {"rc": 0, "cp": 1, "pr": 2}


def plane_axis(plane: str) -> int:
    """Axis that indexes the slices of a plane: rc → 0, cp → 1, pr → 2."""
    try:
        return PLANES[plane]
    except KeyError:
        raise DataError(None, "plane", f"must be one of {sorted(PLANES)}, got {plane!r}") from None


def slice_index(axis: int, n: int) -> tuple:
    return tuple(n if a == axis else slice(None) for a in range(3))


def take_slice(volume, plane: str, n: int) -> np.ndarray:
    """Slice ``n`` of a plane set: S_rc → V[n], S_cp → V[:, n], S_pr → V[:, :, n]."""
    return np.asarray(volume[slice_index(plane_axis(plane), n)])


def num_slices(shape: tp.Sequence[int], plane: str) -> int:
    return int(shape[plane_axis(plane)])


class SampleVolumes:
    """Open image and label datasets of several samples for the life of a reader (HDF5 or TIFF)."""

    def __init__(self, samples: tp.Sequence[Sample], *, need_labels: bool = True, cache_mb: int = 64):
        self.samples = list(samples)
        self._stack = contextlib.ExitStack()
        self.images, self.labels = [], []
        try:
            for s in self.samples:
                img = self._stack.enter_context(open_volume(s.image))
                self.images.append(img)
                if s.label is None:
                    if need_labels:
                        raise DataError(s.image.path, "label", f"sample {s.id} has no label volume")
                    self.labels.append(None)
                    continue
                lab = self._stack.enter_context(open_volume(s.label))
                if tuple(lab.shape) != tuple(img.shape):
                    raise DataError(s.label.path, s.label.dataset or "label",
                                    f"label shape {tuple(lab.shape)} differs from image shape {tuple(img.shape)}")
                self.labels.append(lab)
        except BaseException:
            self._stack.close()
            raise

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "SampleVolumes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def chunk_depth(self, i: int, axis: int) -> int:
        chunks = getattr(self.images[i], "chunks", None)
        return int(chunks[axis]) if chunks else 1


@dataclasses.dataclass
class _OpenSlab:
    image: np.ndarray
    label: np.ndarray
    order: list[int]


def random_training_slices(samples: tp.Sequence[Sample], *, seed: int, planes: tp.Sequence[str] = ("rc", "cp", "pr"),
                           open_slabs: int = 8, slab_depth: tp.Optional[int] = None) -> tp.Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless, seeded stream of (image slice, label slice) drawn from all samples and planes.

    Paper: training uses the slices of all three plane sets of every training sample. A slab of
    ``slab_depth`` slices (default: the HDF5 chunk depth along that axis, so chunks are read once)
    is read along a random axis of a random sample (weighted by its number of slices); ``open_slabs``
    slabs are kept open and slices are drawn from them at random, to mix samples and planes.
    """
    rng = np.random.default_rng(seed)
    axes = [plane_axis(p) for p in planes]
    with SampleVolumes(samples) as vols:
        shapes = [tuple(v.shape) for v in vols.images]
        choices = [(i, a) for i in range(len(shapes)) for a in axes]
        weights = np.array([shapes[i][a] for i, a in choices], np.float64)
        weights /= weights.sum()

        def new_slab() -> _OpenSlab:
            i, axis = choices[rng.choice(len(choices), p=weights)]
            depth = slab_depth or vols.chunk_depth(i, axis)
            n = shapes[i][axis]
            start = int(rng.integers(0, max(1, (n + depth - 1) // depth))) * depth
            stop = min(start + depth, n)
            s = vols.samples[i]
            img = _read_slab(vols.images[i], axis, start, stop, s.image, "image")
            lab = _read_slab(vols.labels[i], axis, start, stop, s.label, "label")
            return _OpenSlab(img, lab, list(rng.permutation(stop - start)))

        pool = [new_slab() for _ in range(max(1, open_slabs))]
        while True:
            k = int(rng.integers(len(pool)))
            slab = pool[k]
            j = slab.order.pop()
            yield slab.image[j], slab.label[j]
            if not slab.order:
                pool[k] = new_slab()


def _read_slab(volume, axis: int, start: int, stop: int, ref: VolumeRef, field: str) -> np.ndarray:
    """Slices ``start:stop`` along ``axis``, moved so that the slice index is axis 0."""
    key = tuple(slice(start, stop) if a == axis else slice(None) for a in range(3))
    return np.moveaxis(read_checked(volume, key, ref=ref, field=field), axis, 0)


def iter_slices(samples: tp.Sequence[Sample], *, planes: tp.Sequence[str] = ("rc", "cp", "pr"), step: int = 1,
                need_labels: bool = True) -> tp.Iterator[tuple[str, str, int, np.ndarray, tp.Optional[np.ndarray]]]:
    """Deterministic pass over every ``step``-th slice of each plane: (sample id, plane, n, image, label)."""
    with SampleVolumes(samples, need_labels=need_labels) as vols:
        for s, img, lab in zip(vols.samples, vols.images, vols.labels):
            for plane in planes:
                axis = plane_axis(plane)
                for n in range(step // 2, img.shape[axis], step):
                    key = slice_index(axis, n)
                    yield (s.id, plane, n, read_checked(img, key, ref=s.image, field="image"),
                           None if lab is None else read_checked(lab, key, ref=s.label, field="label"))
