"""The fuse step of a prediction: stream the plane files block by block, vote (model.fusion), write labels,
probabilities and uncertainty maps as HDF5 or OME-Zarr, optionally a BigTIFF stack; or score several fusing
methods (Table 2) against a reference label in one pass."""

from __future__ import annotations

import contextlib
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from data.atomic import atomic_path
from data.errors import DataError
from data.voxel_size import scan_voxel_size_um
from data.volume import (CLASS_NAMES, NUM_CLASSES, VolumeRef, atomic_output, class_label_metadata, class_omero,
                         class_set_label_metadata, copy_volume, create_zarr_array, create_zarr_group, grey_omero,
                         is_zarr_path, open_volume, read_checked, write_label_image, write_multiscale_image)
from model.evaluation import confusion_matrix
from model.fusion import (FOLD_DISAGREEMENT, UNCERTAINTY_MAPS, fold_disagreement_from_sum, map_names,
                          mean_probabilities, uncertainty_maps, vote)
from model.planes import PLANES, plane_set
from model.rotate import available_cores
from model.streaming import CHUNK, NoTimes, ParallelDeflate, PhaseTimes, Progress, create_dataset

PLANE_FILE_DATASET = "probabilities"  # the dataset of a plane file (model.inference.predict_plane)
LABEL_IMAGE = "segmentation"  # the fused labels in an OME-Zarr store: labels/segmentation
LABEL_MAPS = ("plane_classes",)  # class sets are label-like (labels/NAME); other maps are fractions (uncertainty/NAME)


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


def zarr_map_path(name: str) -> str:
    """Where an uncertainty map lives in an OME-Zarr store: label-like maps beside the labels, fractions apart."""
    return f"labels/{name}" if name in LABEL_MAPS else f"uncertainty/{name}"


def _subgroup(group, path: str):
    """The group at ``path`` (``a/b``), created with its parents: the layout is named by paths."""
    for part in path.split("/"):
        group = group.require_group(part)
    return group


def _zarr_level0(group, shape: tuple, *, probabilities: bool, maps: tp.Sequence[str]) -> dict:
    """Level-0 arrays of the OME-Zarr layout the fuse loop fills: ``labels/segmentation``, ``probabilities``
    (classes first, the NGFF channel axis) and each map at :func:`zarr_map_path`."""
    labels = _subgroup(group, f"labels/{LABEL_IMAGE}")
    out = {"labels": create_zarr_array(labels, "0", shape[:3], np.uint8, chunk=CHUNK)}
    if probabilities:
        out["probabilities"] = create_zarr_array(_subgroup(group, "probabilities"), "0", (shape[3],) + shape[:3],
                                                 np.float16, chunk=CHUNK)
    for name in maps:
        out[name] = create_zarr_array(_subgroup(group, zarr_map_path(name)), "0", shape[:3], np.uint8, chunk=CHUNK)
    return out


def _write_zarr_image(group, image: VolumeRef, shape: tuple) -> tuple[float, float]:
    """The input scan as the store's level 0 (streamed, its own dtype); returns its range for the contrast."""
    with open_volume(image) as vol:
        dtype = vol.dtype
    return copy_volume(image, create_zarr_array(group, "0", shape[:3], dtype, chunk=CHUNK))


def _finish_zarr(group, voxel_size_um: float, grey_range: tuple[float, float], names: tp.Sequence[str]) -> None:
    """Pyramids and NGFF metadata of every image once level 0 is complete: the scan averaged, labels strided."""
    write_multiscale_image(group, name="image", voxel_size_um=voxel_size_um, how="mean", omero=grey_omero(*grey_range))
    labels = group["labels"]
    colors, properties = class_label_metadata()
    write_label_image(labels, LABEL_IMAGE, voxel_size_um=voxel_size_um, colors=colors, properties=properties)
    for name in names:
        if name == "probabilities":
            write_multiscale_image(group[name], name=name, voxel_size_um=voxel_size_um, how="mean", channels=True,
                                   omero=class_omero())
        elif name in LABEL_MAPS:
            colors, properties = class_set_label_metadata()
            write_label_image(labels, name, voxel_size_um=voxel_size_um, colors=colors, properties=properties)
        elif name != "labels":
            write_multiscale_image(group[zarr_map_path(name)], name=name, voxel_size_um=voxel_size_um, how="mean",
                                   omero=grey_omero(0, 255, name))


def input_voxel_size_um(volume: VolumeRef, *, required: bool) -> tp.Optional[float]:
    """The voxel size in the input's own metadata (data.voxel_size), read before any prediction; None when it
    gives none or the volume is missing (the input checks name that); anisotropic voxels refuse only if ``required``."""
    if not Path(volume.path).exists():
        return None
    try:
        return scan_voxel_size_um(volume)
    except DataError:  # anisotropic or not positive: only an output that needs the voxel size is refused
        if required:
            raise
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # h5py, tifffile and JSON raise these for broken files
        raise DataError(volume.path, volume.dataset, f"cannot read the voxel size, file corrupt ({exc})") from exc


def check_ome_zarr_inputs(out_path: Path, image: tp.Optional[VolumeRef], voxel_size_um: tp.Optional[float]) -> None:
    """An OME-Zarr store holds the scan at its physical scale: refuse one without either, before any work."""
    if image is None:
        raise ValueError(f"{out_path}: an OME-Zarr output needs image= (the input volume it shows the labels on)")
    if voxel_size_um is None or not (np.isfinite(voxel_size_um) and voxel_size_um > 0):
        raise ValueError(f"{out_path}: an OME-Zarr output needs a positive voxel size (--voxel-size UM), "
                         f"got {voxel_size_um!r}")


def fuse_planes(plane_paths: tp.Sequence[Path], out_path: Path, *, method: str, probabilities: bool = False,
                tiff_path: tp.Optional[Path] = None, attrs: tp.Optional[dict] = None, inputs: tp.Sequence[Path] = (),
                progress: bool = True, uncertainty: bool = False, times: tp.Optional[PhaseTimes] = None,
                image: tp.Optional[VolumeRef] = None, voxel_size_um: tp.Optional[float] = None) -> Path:
    """The fuse step: ``labels`` (uint8) by ``method`` vote, optionally ``probabilities`` (float16, P_avr of Eq. 4)
    and, with ``uncertainty``, the uint8 maps of :func:`model.fusion.uncertainty_maps` on the same grid.

    ``out_path`` ending in ``.zarr`` gives an OME-Zarr store (NGFF 0.4, needs ``image`` and ``voxel_size_um``):
    the scan ``image`` as its root multiscale image, the labels as ``labels/segmentation`` (and
    ``labels/plane_classes``), ``probabilities`` (c, z, y, x) and ``uncertainty/<map>`` as further multiscale
    images of the same scales; otherwise an HDF5 file with those datasets (``voxel_size_um`` in its attributes).
    """
    plane_paths = [Path(p) for p in plane_paths]
    times = times or NoTimes()
    with h5py.File(plane_paths[0], "r") as f:
        shape = tuple(f[PLANE_FILE_DATASET].shape)
    meta = {"vote": method, "planes": [_plane_of(p) for p in plane_paths], **(attrs or {})}
    with contextlib.ExitStack() as stack:
        folds = _fold_maps(stack, plane_paths) if uncertainty else []
        names = map_names(uncertainty, bool(folds))
        write = stack.enter_context(fused_output(
            out_path, shape, meta=meta, probabilities=probabilities, map_names=names, tiff_path=tiff_path,
            inputs=inputs, image=image, voxel_size_um=voxel_size_um, times=times, progress=progress,
            desc=f"fuse {method} ({len(plane_paths)} planes)"))
        blocks = fuse_blocks(plane_paths)
        while True:
            with times.phase("read"):
                item = next(blocks, None)
            if item is None:
                break
            key, block = item
            with times.phase("fuse"):
                lab = vote(block, method)
                mean = mean_probabilities(block).astype(np.float16) if probabilities else None
                extra = uncertainty_maps(block, lab) if names else {}
                if folds:  # the planes' mean of each plane's fold disagreement
                    fold_sum = np.sum([d[key] for d in folds], axis=0, dtype=np.uint16)
                    extra[FOLD_DISAGREEMENT] = fold_disagreement_from_sum(fold_sum, len(folds))
            write(key, lab, mean, extra)
    return Path(out_path)


@contextlib.contextmanager
def fused_output(out_path: Path, shape: tp.Sequence[int], *, meta: dict, probabilities: bool,
                 map_names: tp.Sequence[str], tiff_path: tp.Optional[Path] = None, inputs: tp.Sequence[Path] = (),
                 image: tp.Optional[VolumeRef] = None, voxel_size_um: tp.Optional[float] = None,
                 times: tp.Optional[PhaseTimes] = None, progress: bool = True, desc: str = "fuse"
                 ) -> tp.Iterator[tp.Callable[..., None]]:
    """The outputs of a fused prediction (labels, ``probabilities``, each of ``map_names``; HDF5 or OME-Zarr,
    optionally a BigTIFF), written atomically: yields ``write(key, labels, mean, maps)`` for blocks
    ``key = (z slice, y slice)`` given in z order, every y band of a slab before the next slab.

    Whatever fused them (plane files, or model.resident's accumulator) writes the same files."""
    times = times or NoTimes()
    shape = tuple(int(s) for s in shape)
    zarr_out = is_zarr_path(out_path)
    if zarr_out:
        check_ome_zarr_inputs(Path(out_path), image, voxel_size_um)
    meta = {**meta, "class_names": list(CLASS_NAMES)}
    if voxel_size_um is not None:
        meta["voxel_size_um"] = float(voxel_size_um)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(out_path, inputs=inputs))
        tiff_tmp = stack.enter_context(atomic_path(tiff_path, inputs=inputs)) if tiff_path else None
        if zarr_out:
            group = create_zarr_group(tmp)
            group.attrs.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()})
            with times.phase("write"):
                grey_range = _write_zarr_image(group, tp.cast(VolumeRef, image), shape)
            level0 = _zarr_level0(group, shape, probabilities=probabilities, maps=map_names)
            labels, probs = level0["labels"], level0.get("probabilities")
            maps = {name: level0[name] for name in map_names}
        else:
            group = stack.enter_context(h5py.File(tmp, "w"))
            pool = stack.enter_context(ThreadPoolExecutor(min(16, available_cores()), thread_name_prefix="deflate"))

            def make(name: str):  # gzip, as Fiji, Avizo and h5py read it; deflated on threads
                return ParallelDeflate(create_dataset(group, name, shape[:3], np.uint8, compression="gzip"), pool)

            labels = make("labels")
            group.attrs.update(meta)
            probs = create_dataset(group, "probabilities", shape, np.float16) if probabilities else None
            maps = {name: make(name) for name in map_names}
        writer = stack.enter_context(_tiff_writer(tiff_tmp)) if tiff_tmp else None
        bar = stack.enter_context(Progress(progress).bar(shape[0], desc))
        pages = np.empty((0,), np.uint8)

        def write(key, lab, mean, extra) -> None:
            nonlocal pages
            with times.phase("write"):
                labels[key] = lab
                if probs is not None and zarr_out:  # NGFF puts the channel axis first
                    probs[(slice(None),) + key] = np.moveaxis(mean, -1, 0)
                elif probs is not None:
                    probs[key] = mean
                for name, arr in extra.items():
                    maps[name][key] = arr
                if writer is not None:  # TIFF pages are whole slices: collect the slab's bands, then write
                    if key[1].start in (0, None):
                        pages = np.empty((lab.shape[0],) + shape[1:3], np.uint8)
                    pages[:, key[1]] = lab
                if key[1].stop in (shape[1], None):
                    for page in pages if writer is not None else ():
                        writer.write(page, contiguous=True)
                    bar.update(lab.shape[0])

        yield write
        if zarr_out:
            with times.phase("write"):
                _finish_zarr(group, tp.cast(float, voxel_size_um), grey_range, list(level0))
        else:
            group.close()


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
