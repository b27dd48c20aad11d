"""The fuse step of a prediction: stream the plane files block by block, vote (model.fusion), write labels,
probabilities and uncertainty maps as HDF5 or OME-Zarr, optionally a BigTIFF stack; or score several fusing
methods (Table 2) against a reference label in one pass."""

from __future__ import annotations

import contextlib
import functools
import typing as tp
from pathlib import Path

import h5py
import numpy as np

from data.atomic import atomic_path
from data.errors import DataError
from data.volume import (CLASS_NAMES, NUM_CLASSES, VolumeRef, atomic_output, create_zarr_array, create_zarr_group,
                         is_zarr_path, open_volume, read_checked, write_label_pyramid)
from model.evaluation import confusion_matrix
from model.fusion import FOLD_DISAGREEMENT, UNCERTAINTY_MAPS, mean_probabilities, uncertainty_maps, vote
from model.planes import PLANES, plane_set
from model.streaming import CHUNK, NoTimes, PhaseTimes, Progress, create_dataset

PLANE_FILE_DATASET = "probabilities"  # the dataset of a plane file (model.inference.predict_plane)


def fuse_blocks(plane_paths: tp.Sequence[Path], *, budget_bytes: int = 64 << 20
                ) -> tp.Iterator[tuple[tuple[slice, slice], np.ndarray]]:
    """Stream (block key, stacked uint8 probabilities (M, z, y, x, K)) over all plane files.

    Blocks are one chunk deep in z and as many chunk rows in y as ``budget_bytes`` allows for the
    stack of M planes, so memory does not grow with the number of planes times the slice area.
    """
    with contextlib.ExitStack() as stack:
        dsets = []
        for p in plane_paths:
            try:
                f = stack.enter_context(h5py.File(p, "r"))
            except OSError as exc:
                raise DataError(p, None, f"unreadable plane file ({exc})") from exc
            if PLANE_FILE_DATASET not in f:
                raise DataError(p, PLANE_FILE_DATASET, "missing: not a plane file of model.predict")
            dsets.append(f[PLANE_FILE_DATASET])
        shapes = {d.shape for d in dsets}
        if len(shapes) != 1:
            raise DataError(plane_paths[0], PLANE_FILE_DATASET, f"plane files differ in shape: {sorted(shapes)}")
        nz, ny, nx, k = dsets[0].shape
        row_bytes = len(dsets) * CHUNK * CHUNK * nx * k  # one chunk row of every plane
        band = CHUNK * max(1, budget_bytes // max(1, row_bytes))
        for z0 in range(0, nz, CHUNK):
            for y0 in range(0, ny, band):
                key = (slice(z0, min(z0 + CHUNK, nz)), slice(y0, min(y0 + band, ny)))
                yield key, np.stack([d[key] for d in dsets])


def fuse_planes(plane_paths: tp.Sequence[Path], out_path: Path, *, method: str, probabilities: bool = False,
                tiff_path: tp.Optional[Path] = None, attrs: tp.Optional[dict] = None, inputs: tp.Sequence[Path] = (),
                progress: bool = True, uncertainty: bool = False, times: tp.Optional[PhaseTimes] = None) -> Path:
    """The fuse step: ``labels`` (uint8) by ``method`` vote, optionally ``probabilities`` (float16, P_avr of Eq. 4)
    and, with ``uncertainty``, the uint8 maps of :func:`model.fusion.uncertainty_maps` on the same grid.

    ``out_path`` ending in ``.zarr`` gives an OME-Zarr store (NGFF 0.4): the labels as its multiscale
    image (arrays ``0``, ``1``, … halving each axis), the other outputs as full-resolution arrays of
    the same names; otherwise an HDF5 file with those datasets.
    """
    plane_paths = [Path(p) for p in plane_paths]
    times = times or NoTimes()
    with h5py.File(plane_paths[0], "r") as f:
        shape = tuple(f[PLANE_FILE_DATASET].shape)
    meta = {"vote": method, "planes": [_plane_of(p) for p in plane_paths], "class_names": list(CLASS_NAMES)}
    meta.update(attrs or {})
    zarr_out = is_zarr_path(out_path)
    bars = Progress(progress)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(out_path, inputs=inputs))
        tiff_tmp = stack.enter_context(atomic_path(tiff_path, inputs=inputs)) if tiff_path else None
        if zarr_out:
            group = create_zarr_group(tmp)
            make = functools.partial(create_zarr_array, group, chunk=CHUNK)
            labels = make("0", shape[:3], np.uint8)
            group.attrs.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()})
        else:
            group = stack.enter_context(h5py.File(tmp, "w"))
            make = functools.partial(create_dataset, group, compression="gzip")
            labels = make("labels", shape[:3], np.uint8)
            group.attrs.update(meta)
        probs = (make("probabilities", shape, np.float16) if zarr_out else create_dataset(group, "probabilities", shape, np.float16)
                 ) if probabilities else None
        maps = {name: make(name, shape[:3], np.uint8) for name in UNCERTAINTY_MAPS} if uncertainty else {}
        folds = _fold_maps(stack, plane_paths) if uncertainty else []
        if folds:
            maps[FOLD_DISAGREEMENT] = make(FOLD_DISAGREEMENT, shape[:3], np.uint8)
        writer = stack.enter_context(_tiff_writer(tiff_tmp)) if tiff_tmp else None
        with bars.bar(shape[0], f"fuse {method} ({len(plane_paths)} planes)") as bar:
            pages = np.empty((0,), np.uint8)
            blocks = fuse_blocks(plane_paths)
            while True:
                with times.phase("read"):
                    item = next(blocks, None)
                if item is None:
                    break
                key, block = item
                with times.phase("fuse"):
                    lab = vote(block, method)
                    mean = mean_probabilities(block).astype(np.float16) if probs is not None else None
                    extra = uncertainty_maps(block, lab) if maps else {}
                    if folds:  # the planes' mean of each plane's fold disagreement
                        extra[FOLD_DISAGREEMENT] = np.rint(np.mean([d[key] for d in folds], axis=0)).astype(np.uint8)
                with times.phase("write"):
                    labels[key] = lab
                    if probs is not None:
                        probs[key] = mean
                    for name, arr in extra.items():
                        maps[name][key] = arr
                    if writer is not None:  # TIFF pages are whole slices: collect the slab's bands, then write
                        if key[1].start == 0:
                            pages = np.empty((lab.shape[0],) + shape[1:3], np.uint8)
                        pages[:, key[1]] = lab
                    if key[1].stop == shape[1]:
                        for page in pages if writer is not None else ():
                            writer.write(page, contiguous=True)
                        bar.update(lab.shape[0])
        if zarr_out:
            with times.phase("write"):
                write_label_pyramid(group)
        else:
            group.close()
    return Path(out_path)


def _fold_maps(stack: contextlib.ExitStack, plane_paths: tp.Sequence[Path]) -> list:
    """The fold disagreement of every plane file, when all have one (an ensemble's, model.inference)."""
    files = [stack.enter_context(h5py.File(p, "r")) for p in plane_paths]
    return [f[FOLD_DISAGREEMENT] for f in files] if all(FOLD_DISAGREEMENT in f for f in files) else []


def _plane_of(path: Path) -> str:
    with h5py.File(path, "r") as f:
        return str(f.attrs.get("plane", Path(path).stem))


@contextlib.contextmanager
def _tiff_writer(path: Path):
    import tifffile

    # One multi-page BigTIFF of uint8 labels: Fiji, Avizo and 3D Slicer open it as a stack.
    w = tifffile.TiffWriter(path, bigtiff=True)
    try:
        yield w
    finally:
        w.close()


def evaluate_methods(plane_files: dict[str, Path], reference: VolumeRef, methods: tp.Mapping[str, tuple[str, str]],
                     num_classes: int = NUM_CLASSES, save: tp.Optional[dict[str, Path]] = None,
                     uncertainty: bool = False) -> dict[str, np.ndarray]:
    """Confusion matrices of several fusing methods against ``reference``, one pass over the plane files.

    ``methods``: name → (plane set, vote). ``save``: name → HDF5 path that receives that method's labels
    (and, with ``uncertainty``, its maps of :func:`model.fusion.uncertainty_maps`).
    """
    needed = sorted({p for s, _ in methods.values() for p in plane_set(s)}, key=list(PLANES).index)
    missing = [p for p in needed if p not in plane_files]
    if missing:
        raise ValueError(f"plane files missing for {missing}")
    index = {p: i for i, p in enumerate(needed)}
    cms = {m: np.zeros((num_classes, num_classes), np.int64) for m in methods}
    with contextlib.ExitStack() as stack, open_volume(reference) as ref:
        with h5py.File(plane_files[needed[0]], "r") as f:
            predicted_shape = tuple(f[PLANE_FILE_DATASET].shape[:3])
        if tuple(ref.shape) != predicted_shape:
            raise DataError(reference.path, reference.dataset,
                            f"label shape {tuple(ref.shape)} differs from the predicted volume's {predicted_shape}")
        writers = {}
        for m, path in (save or {}).items():
            tmp = stack.enter_context(atomic_path(path))
            f = stack.enter_context(h5py.File(tmp, "w"))
            writers[m] = {"labels": create_dataset(f, "labels", tuple(ref.shape), np.uint8, compression="gzip")}
            for name in UNCERTAINTY_MAPS if uncertainty else ():
                writers[m][name] = create_dataset(f, name, tuple(ref.shape), np.uint8, compression="gzip")
            f.attrs.update({"method": m, "planes": list(plane_set(methods[m][0])), "vote": methods[m][1]})
        for key, block in fuse_blocks([plane_files[p] for p in needed]):
            truth = read_checked(ref, key, ref=reference, field="label")
            for m, (pset, how) in methods.items():
                sub = block[[index[p] for p in plane_set(pset)]]
                lab = vote(sub, how)  # one plane: its argmax (a baseline row)
                cms[m] += confusion_matrix(truth, lab, num_classes)
                if m in writers:
                    writers[m]["labels"][key] = lab
                    if uncertainty:
                        for name, arr in uncertainty_maps(sub, lab).items():
                            writers[m][name][key] = arr
    return cms
