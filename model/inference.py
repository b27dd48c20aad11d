"""Whole-volume prediction along 3 or 9 slicing planes with bounded memory (paper, multi-axes fusing).

Work is split into plane tasks and one fuse step, each streaming chunk-aligned slabs of HDF5
files, so peak memory follows the slice size, never volume × planes × classes:

1. plane task (one per plane; a SLURM array task on a cluster): predict every slice of one plane
   set and write the class probabilities on the ORIGINAL grid to its own file, uint8 (255 = 1).
   A rotated plane (9 planes) first writes the volume rotated by 45° about axis ``a``
   (data.rotation, slab by slab along ``a``) to a temporary file, predicts the slices of that
   volume along axis ``s`` into a temporary probability file of the rotated grid, then rotates the
   probabilities back onto the original grid, again slab by slab along ``a``.
2. fuse: read the same slab of every plane file, vote (model.fusion), write labels.

A plane file records the volume and model it was made from; an existing matching file is reused,
so a requeued or restarted job does not predict a plane twice.
"""

from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path

import h5py
import numpy as np

from data.atomic import atomic_path
from data.rotation import other_axes, rotated_volume_shape
from data.volume import NUM_CLASSES, VolumeRef, open_volume
from model.fuse import PLANE_FILE_DATASET, evaluate_methods  # noqa: F401 - evaluate_methods re-exported for sweep/
from model.fusion import FOLD_DISAGREEMENT, quantize_fraction, quantize_probabilities
from model.planes import PLANE_SETS, PLANES, TABLE2_METHODS, plane_set  # noqa: F401 - re-exported for sweep/
from model.streaming import NoTimes, PhaseTimes, Progress, create_dataset, read_slab, slabs, stream, temp_arrays

SlicePredictor = tp.Callable[[np.ndarray], np.ndarray]
"""(n, h, w) float32 slices → (n, h, w, K) class probabilities."""


def _predict_along(source, axis: int, out: h5py.Dataset, predictor: SlicePredictor, *, batch_size: int,
                   desc: str, progress: Progress, ref: tp.Optional[VolumeRef] = None, overlap: bool = False,
                   times: tp.Optional[PhaseTimes] = None, extra: tp.Optional[h5py.Dataset] = None) -> None:
    """Predict every slice of ``source`` along ``axis`` into uint8 probabilities ``out`` (shape + (K,)).

    ``extra``: the predictor returns one more channel, a fraction in [0, 1] (the fold disagreement of an
    ensemble, model.predict.ensemble_predictor), written as uint8 (255 = 1) to ``extra`` (shape)."""
    n = source.shape[axis]
    k_out = out.shape[-1]
    k_pred = k_out + (extra is not None)
    with progress.bar(n, desc) as bar:
        def compute(key, slab):
            slab = slab.astype(np.float32, copy=False)
            probs = np.empty(slab.shape + (k_out,), np.uint8)
            fraction = np.empty(slab.shape, np.uint8) if extra is not None else None
            for b in range(0, slab.shape[0], batch_size):
                p = np.asarray(predictor(slab[b:b + batch_size]))
                if p.shape != slab[b:b + batch_size].shape + (k_pred,):
                    raise ValueError(f"predictor returned shape {p.shape} for slices {slab[b:b + batch_size].shape}, "
                                     f"expected {k_pred} channels last")
                probs[b:b + batch_size] = quantize_probabilities(p[..., :k_out])
                if fraction is not None:
                    fraction[b:b + batch_size] = quantize_fraction(p[..., k_out])
                bar.update(p.shape[0])
            return probs, fraction

        def write(key, result):
            probs, fraction = result
            out[key + (slice(None),)] = np.moveaxis(probs, 0, axis)
            if fraction is not None:
                tp.cast(h5py.Dataset, extra)[key] = np.moveaxis(fraction, 0, axis)

        stream([key for key, _ in slabs(n, axis)], lambda key: read_slab(source, key, axis, ref), compute, write,
                overlap=overlap, times=times or NoTimes(), compute_phase="predict")


def _rotate_volume(source, axis: int, out: h5py.Dataset, *, progress: Progress, desc: str,
                   ref: tp.Optional[VolumeRef] = None, rotation=None, overlap: bool = False,
                   times: tp.Optional[PhaseTimes] = None) -> None:
    """Write ``source`` rotated by 45° about ``axis`` into ``out``, slab by slab along ``axis``."""
    from model.rotate import CpuRotation

    rotation = rotation or CpuRotation()
    with progress.bar(source.shape[axis], desc) as bar:
        def compute(key, slab):
            rotated = rotation.rotate(slab, dtype=out.dtype)
            bar.update(slab.shape[0])
            return rotated

        def write(key, rotated):
            out[key] = np.moveaxis(rotated.astype(out.dtype, copy=False), 0, axis)

        stream([key for key, _ in slabs(source.shape[axis], axis)], lambda key: read_slab(source, key, axis, ref),
                compute, write, overlap=overlap, times=times or NoTimes(), compute_phase="rotate")


def _unrotate_probabilities(rot: h5py.Dataset, axis: int, out: h5py.Dataset, *, progress: Progress, desc: str,
                            rotation=None, overlap: bool = False, times: tp.Optional[PhaseTimes] = None,
                            fraction: bool = False) -> None:
    """Rotate uint8 probabilities of the rotated grid back onto the original grid ``out`` (model.rotate).

    ``fraction``: ``rot`` and ``out`` hold one uint8 fraction per voxel (no class axis); it is rotated as the
    two-class probabilities (1 − f, f), so it is sampled exactly as a class probability is."""
    from model.rotate import CpuRotation

    rotation = rotation or CpuRotation()
    b, c = other_axes(axis)
    plane_shape = (out.shape[b], out.shape[c])
    n = out.shape[axis]
    tail = () if fraction else (slice(None),)
    with progress.bar(n, desc) as bar:
        def compute(key, block):
            if fraction:
                block = np.stack([255 - block, block], axis=-1)
            res = rotation.unrotate_probabilities(block, plane_shape)
            bar.update(block.shape[0])
            return res[..., 1] if fraction else res

        def write(key, res):
            out[key + tail] = np.moveaxis(res, 0, axis)

        stream([key for key, _ in slabs(n, axis)], lambda key: read_slab(rot, key + tail, axis, None),
                compute, write, overlap=overlap, times=times or NoTimes(), compute_phase="rotate_back")


@dataclasses.dataclass(frozen=True)
class Source:
    """The input volume of a prediction and what identifies it in plane files."""

    ref: VolumeRef
    shape: tuple[int, int, int]

    @property
    def key(self) -> str:
        st = self.ref.path.stat()
        return f"{self.ref.path.resolve()}:{self.ref.dataset or ''}:{st.st_size}:{st.st_mtime_ns}"


def plane_file_matches(path: Path, source: Source, plane: str, model_id: str, fold_disagreement: bool = False) -> bool:
    """True if ``path`` is a complete plane file of this volume, plane and model (reusable)."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            ds = f.get(PLANE_FILE_DATASET)
            return (ds is not None and tuple(ds.shape[:3]) == source.shape and f.attrs.get("plane") == plane
                    and f.attrs.get("source") == source.key and f.attrs.get("model") == model_id
                    and (not fold_disagreement or FOLD_DISAGREEMENT in f))
    except OSError:
        return False


def predict_plane(source: Source, plane: str, predictor: SlicePredictor, out_path: Path, *, model_id: str,
                  num_classes: int = NUM_CLASSES, batch_size: int = 4, tmp_dir: tp.Optional[Path] = None,
                  progress: bool = True, rotation=None, workers: int = 1,
                  times: tp.Optional[PhaseTimes] = None, fold_disagreement: bool = False) -> Path:
    """One plane task: class probabilities of ``plane`` on the original grid → ``out_path`` (atomic, reused).

    ``rotation``: where the 45° rotations run (model.rotate; default scipy on ``workers`` threads);
    ``workers`` > 1 also overlaps slab reads and writes with the computation; ``times`` collects
    seconds per phase. ``fold_disagreement``: the predictor (an ensemble) returns one more channel, the fraction
    of its models that disagree with its label, kept as the plane file's :data:`FOLD_DISAGREEMENT` map.
    """
    p = PLANES[plane]
    out_path = Path(out_path)
    if plane_file_matches(out_path, source, plane, model_id, fold_disagreement):
        return out_path
    bars = Progress(progress)
    times = times or NoTimes()
    overlap = workers > 1
    own_rotation = rotation is None and p.rotated
    if own_rotation:
        from model.rotate import CpuRotation

        rotation = CpuRotation(workers)
    tmp_dir = Path(tmp_dir or out_path.parent)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with open_volume(source.ref) as vol, atomic_path(out_path, inputs=[source.ref.path]) as tmp:
        with h5py.File(tmp, "w") as f:
            out = create_dataset(f, PLANE_FILE_DATASET, source.shape + (num_classes,), np.uint8)
            f.attrs.update({"plane": plane, "source": source.key, "model": model_id, "scale": 255})
            extra = create_dataset(f, FOLD_DISAGREEMENT, source.shape, np.uint8) if fold_disagreement else None
            if not p.rotated:
                _predict_along(vol, p.slice_axis, out, predictor, batch_size=batch_size, desc=f"{plane} predict",
                               progress=bars, ref=source.ref, overlap=overlap, times=times, extra=extra)
            else:
                a = tp.cast(int, p.rotation_axis)
                rshape = rotated_volume_shape(source.shape, a)
                with temp_arrays(tmp_dir, f"{out_path.stem}.rotated") as temp:
                    # float16 halves the temporary file; its 1e-3 relative step is below scan noise.
                    rimg = temp("image", rshape, np.float16)
                    _rotate_volume(vol, a, rimg, progress=bars, desc=f"{plane} rotate", ref=source.ref,
                                   rotation=rotation, overlap=overlap, times=times)
                    rprob = temp("probabilities", rshape + (num_classes,), np.uint8)
                    rextra = temp(FOLD_DISAGREEMENT, rshape, np.uint8) if extra is not None else None
                    _predict_along(rimg, p.slice_axis, rprob, predictor, batch_size=batch_size,
                                   desc=f"{plane} predict", progress=bars, overlap=overlap, times=times, extra=rextra)
                    _unrotate_probabilities(rprob, a, out, progress=bars, desc=f"{plane} rotate back",
                                            rotation=rotation, overlap=overlap, times=times)
                    if extra is not None:
                        _unrotate_probabilities(tp.cast(h5py.Dataset, rextra), a, extra, progress=bars,
                                                desc=f"{plane} rotate back (folds)", rotation=rotation,
                                                overlap=overlap, times=times, fraction=True)
    if own_rotation:
        rotation.close()
    return out_path
