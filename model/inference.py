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

import contextlib
import dataclasses
import functools
import hashlib
import os
import shutil
import sys
import threading
import time
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from data.errors import DataError
from data.rotation import other_axes, rotated_volume_shape
from data.volume import (CLASS_NAMES, NUM_CLASSES, VolumeRef, atomic_output, atomic_path, create_zarr_array,
                         create_zarr_group, is_zarr_path, iter_slabs, open_volume, read_checked, write_label_pyramid)
from model.fusion import UNCERTAINTY_MAPS, mean_probabilities, quantize_probabilities, uncertainty_maps, vote

AXIS_PLANES = ("rc", "cp", "pr")  # plane set whose slices are indexed by axis 0, 1, 2
PLANE_FILE_DATASET = "probabilities"
CHUNK = 32


@dataclasses.dataclass(frozen=True)
class Plane:
    """One slicing plane: slices along ``slice_axis`` of the volume rotated 45° about ``rotation_axis``."""

    name: str
    slice_axis: int
    rotation_axis: tp.Optional[int] = None

    @property
    def rotated(self) -> bool:
        return self.rotation_axis is not None


def _all_planes() -> dict[str, Plane]:
    planes = {name: Plane(name, axis) for axis, name in enumerate(AXIS_PLANES)}
    for a in range(3):
        # Slicing the rotated volume along the rotation axis gives S_rc/S_cp/S_pr turned in-plane:
        # the paper drops those 3 redundant sets, which leaves 2 new sets per rotation axis.
        for s in other_axes(a):
            name = f"{AXIS_PLANES[s]}_r{a}"
            planes[name] = Plane(name, s, a)
    return planes


PLANES = _all_planes()
PLANE_SETS: dict[str, tuple[str, ...]] = {
    "rc": ("rc",), "cp": ("cp",), "pr": ("pr",),
    "3": AXIS_PLANES,
    "9": AXIS_PLANES + ("cp_r0", "pr_r0", "rc_r1", "pr_r1", "rc_r2", "cp_r2"),
}
# Table 2 of the paper: method → (plane set, vote).
TABLE2_METHODS: dict[str, tuple[str, str]] = {
    "baseline_rc": ("rc", "soft"), "baseline_cp": ("cp", "soft"), "baseline_pr": ("pr", "soft"),
    "avr_3": ("3", "soft"), "mv_3": ("3", "majority"), "avr_9": ("9", "soft"), "mv_9": ("9", "majority"),
}

SlicePredictor = tp.Callable[[np.ndarray], np.ndarray]
"""(n, h, w) float32 slices → (n, h, w, K) class probabilities."""


def plane_set(name: str) -> tuple[str, ...]:
    """A named set (``rc``, ``3``, ``9``, ...) or a single plane (``cp_r0``)."""
    if str(name) in PLANE_SETS:
        return PLANE_SETS[str(name)]
    if str(name) in PLANES:
        return (str(name),)
    raise ValueError(f"planes must be one of {list(PLANE_SETS)} or a plane {list(PLANES)}, got {name!r}")


class _Progress:
    """A tqdm bar per phase, or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def bar(self, total: int, desc: str):
        if not self.enabled:
            return contextlib.nullcontext(_NoBar())
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="slice", file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _slabs(n: int, axis: int) -> tp.Iterator[tuple[tuple, int]]:
    """(index of one chunk-deep slab along ``axis``, its number of slices) over ``n`` slices."""
    for sl in iter_slabs((n,), CHUNK):
        yield tuple(sl if d == axis else slice(None) for d in range(3)), sl.stop - sl.start


def _read_slab(source, key: tuple, axis: int, ref: tp.Optional[VolumeRef]) -> np.ndarray:
    """A slab with its slices along axis 0; ``ref`` names the file in read errors of user volumes."""
    if ref is not None:
        block = read_checked(source, key, ref=ref, field="image")
    else:  # a temporary memmap: copy here (numpy drops the GIL), not lazily in the compute threads
        block = np.array(source[key])
    return np.moveaxis(block, axis, 0)


def _create(f: h5py.File, name: str, shape: tp.Sequence[int], dtype, *, compression: tp.Optional[str] = "lzf") -> h5py.Dataset:
    chunks = tuple(max(1, min(int(s), CHUNK)) for s in shape[:3]) + tuple(int(s) for s in shape[3:])
    return f.create_dataset(name, shape=tuple(int(s) for s in shape), dtype=dtype, chunks=chunks, compression=compression)


class PhaseTimes:
    """Seconds spent per phase (read, rotate, predict, rotate_back, fuse, write), summed over threads."""

    PHASES = ("read", "rotate", "predict", "rotate_back", "fuse", "write")

    def __init__(self):
        self.seconds = {p: 0.0 for p in self.PHASES}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + dt


class _NoTimes(PhaseTimes):
    @contextlib.contextmanager
    def phase(self, name: str):
        yield


def _stream(keys: tp.Sequence, read, compute, write, *, overlap: bool, times: PhaseTimes, compute_phase: str) -> None:
    """read → compute → write over ``keys``; with ``overlap`` the next read and the last write run in
    background threads while the current slab is computed (I/O hidden behind interpolation or the network)."""
    def timed(phase, fn, *a):
        with times.phase(phase):
            return fn(*a)

    if not overlap or len(keys) < 2:
        for k in keys:
            x = timed("read", read, k)
            y = timed(compute_phase, compute, k, x)
            timed("write", write, k, y)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="read") as rd, ThreadPoolExecutor(1, thread_name_prefix="write") as wr:
        pending = None
        nxt = rd.submit(timed, "read", read, keys[0])
        for i, k in enumerate(keys):
            x = nxt.result()
            if i + 1 < len(keys):
                nxt = rd.submit(timed, "read", read, keys[i + 1])
            y = timed(compute_phase, compute, k, x)
            if pending is not None:
                pending.result()
            pending = wr.submit(timed, "write", write, k, y)
        if pending is not None:
            pending.result()


def _predict_along(source, axis: int, out: h5py.Dataset, predictor: SlicePredictor, *, batch_size: int,
                   desc: str, progress: _Progress, ref: tp.Optional[VolumeRef] = None, overlap: bool = False,
                   times: tp.Optional[PhaseTimes] = None) -> None:
    """Predict every slice of ``source`` along ``axis`` into uint8 probabilities ``out`` (shape + (K,))."""
    n = source.shape[axis]
    k_out = out.shape[-1]
    with progress.bar(n, desc) as bar:
        def compute(key, slab):
            slab = slab.astype(np.float32, copy=False)
            probs = np.empty(slab.shape + (k_out,), np.uint8)
            for b in range(0, slab.shape[0], batch_size):
                p = np.asarray(predictor(slab[b:b + batch_size]))
                if p.shape != slab[b:b + batch_size].shape + (k_out,):
                    raise ValueError(f"predictor returned shape {p.shape} for slices {slab[b:b + batch_size].shape}, "
                                     f"expected {k_out} classes last")
                probs[b:b + batch_size] = quantize_probabilities(p)
                bar.update(p.shape[0])
            return probs

        def write(key, probs):
            out[key + (slice(None),)] = np.moveaxis(probs, 0, axis)

        _stream([key for key, _ in _slabs(n, axis)], lambda key: _read_slab(source, key, axis, ref), compute, write,
                overlap=overlap, times=times or _NoTimes(), compute_phase="predict")


def _rotate_volume(source, axis: int, out: h5py.Dataset, *, progress: _Progress, desc: str,
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

        _stream([key for key, _ in _slabs(source.shape[axis], axis)], lambda key: _read_slab(source, key, axis, ref),
                compute, write, overlap=overlap, times=times or _NoTimes(), compute_phase="rotate")


def _unrotate_probabilities(rot: h5py.Dataset, axis: int, out: h5py.Dataset, *, progress: _Progress, desc: str,
                            rotation=None, overlap: bool = False, times: tp.Optional[PhaseTimes] = None) -> None:
    """Rotate uint8 probabilities of the rotated grid back onto the original grid ``out`` (model.rotate)."""
    from model.rotate import CpuRotation

    rotation = rotation or CpuRotation()
    b, c = other_axes(axis)
    plane_shape = (out.shape[b], out.shape[c])
    n = out.shape[axis]
    with progress.bar(n, desc) as bar:
        def compute(key, block):
            res = rotation.unrotate_probabilities(block, plane_shape)
            bar.update(block.shape[0])
            return res

        def write(key, res):
            out[key + (slice(None),)] = np.moveaxis(res, 0, axis)

        _stream([key for key, _ in _slabs(n, axis)], lambda key: _read_slab(rot, key + (slice(None),), axis, None),
                compute, write, overlap=overlap, times=times or _NoTimes(), compute_phase="rotate_back")


@dataclasses.dataclass(frozen=True)
class Source:
    """The input volume of a prediction and what identifies it in plane files."""

    ref: VolumeRef
    shape: tuple[int, int, int]

    @property
    def key(self) -> str:
        st = self.ref.path.stat()
        return f"{self.ref.path.resolve()}:{self.ref.dataset or ''}:{st.st_size}:{st.st_mtime_ns}"


def plane_file_matches(path: Path, source: Source, plane: str, model_id: str) -> bool:
    """True if ``path`` is a complete plane file of this volume, plane and model (reusable)."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            ds = f.get(PLANE_FILE_DATASET)
            return (ds is not None and tuple(ds.shape[:3]) == source.shape and f.attrs.get("plane") == plane
                    and f.attrs.get("source") == source.key and f.attrs.get("model") == model_id)
    except OSError:
        return False


def predict_plane(source: Source, plane: str, predictor: SlicePredictor, out_path: Path, *, model_id: str,
                  num_classes: int = NUM_CLASSES, batch_size: int = 4, tmp_dir: tp.Optional[Path] = None,
                  progress: bool = True, rotation=None, workers: int = 1,
                  times: tp.Optional[PhaseTimes] = None) -> Path:
    """One plane task: class probabilities of ``plane`` on the original grid → ``out_path`` (atomic, reused).

    ``rotation``: where the 45° rotations run (model.rotate; default scipy on ``workers`` threads);
    ``workers`` > 1 also overlaps slab reads and writes with the computation; ``times`` collects
    seconds per phase.
    """
    p = PLANES[plane]
    out_path = Path(out_path)
    if plane_file_matches(out_path, source, plane, model_id):
        return out_path
    bars = _Progress(progress)
    times = times or _NoTimes()
    overlap = workers > 1
    own_rotation = rotation is None and p.rotated
    if own_rotation:
        from model.rotate import CpuRotation

        rotation = CpuRotation(workers)
    tmp_dir = Path(tmp_dir or out_path.parent)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with open_volume(source.ref) as vol, atomic_path(out_path, inputs=[source.ref.path]) as tmp:
        with h5py.File(tmp, "w") as f:
            out = _create(f, PLANE_FILE_DATASET, source.shape + (num_classes,), np.uint8)
            f.attrs.update({"plane": plane, "source": source.key, "model": model_id, "scale": 255})
            if not p.rotated:
                _predict_along(vol, p.slice_axis, out, predictor, batch_size=batch_size, desc=f"{plane} predict",
                               progress=bars, ref=source.ref, overlap=overlap, times=times)
            else:
                a = tp.cast(int, p.rotation_axis)
                rshape = rotated_volume_shape(source.shape, a)
                with _temp_arrays(tmp_dir, f"{out_path.stem}.rotated") as temp:
                    # float16 halves the temporary file; its 1e-3 relative step is below scan noise.
                    rimg = temp("image", rshape, np.float16)
                    _rotate_volume(vol, a, rimg, progress=bars, desc=f"{plane} rotate", ref=source.ref,
                                   rotation=rotation, overlap=overlap, times=times)
                    rprob = temp("probabilities", rshape + (num_classes,), np.uint8)
                    _predict_along(rimg, p.slice_axis, rprob, predictor, batch_size=batch_size,
                                   desc=f"{plane} predict", progress=bars, overlap=overlap, times=times)
                    _unrotate_probabilities(rprob, a, out, progress=bars, desc=f"{plane} rotate back",
                                            rotation=rotation, overlap=overlap, times=times)
    if own_rotation:
        rotation.close()
    return out_path


@contextlib.contextmanager
def _temp_arrays(folder: Path, stem: str) -> tp.Iterator[tp.Callable[..., np.ndarray]]:
    """Temporary arrays of a rotated plane as raw memory maps, removed afterwards.

    Not HDF5: h5py holds the GIL for every read and write, which serialised the slab I/O with the
    rotation threads (1 → 2 cores: 1.5×); numpy copies into a memory map release it.
    """
    paths: list[Path] = []

    def make(name: str, shape: tp.Sequence[int], dtype) -> np.ndarray:
        path = Path(folder) / f".{stem}.{name}.{os.getpid()}.tmp.npy"
        paths.append(path)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(int(s) for s in shape))

    try:
        yield make
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


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
    times = times or _NoTimes()
    with h5py.File(plane_paths[0], "r") as f:
        shape = tuple(f[PLANE_FILE_DATASET].shape)
    meta = {"vote": method, "planes": [_plane_of(p) for p in plane_paths], "class_names": list(CLASS_NAMES)}
    meta.update(attrs or {})
    zarr_out = is_zarr_path(out_path)
    bars = _Progress(progress)
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
            make = functools.partial(_create, group, compression="gzip")
            labels = make("labels", shape[:3], np.uint8)
            group.attrs.update(meta)
        probs = (make("probabilities", shape, np.float16) if zarr_out else _create(group, "probabilities", shape, np.float16)
                 ) if probabilities else None
        maps = {name: make(name, shape[:3], np.uint8) for name in UNCERTAINTY_MAPS} if uncertainty else {}
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
    from model.evaluation import confusion_matrix

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
            writers[m] = {"labels": _create(f, "labels", tuple(ref.shape), np.uint8, compression="gzip")}
            for name in UNCERTAINTY_MAPS if uncertainty else ():
                writers[m][name] = _create(f, name, tuple(ref.shape), np.uint8, compression="gzip")
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


def estimate_disk_bytes(shape: tp.Sequence[int], planes: tp.Sequence[str], *, num_classes: int = NUM_CLASSES,
                        probabilities: bool = False, tiff: bool = False, uncertainty: bool = False) -> dict[str, int]:
    """Upper bounds (uncompressed) of what a prediction writes: final outputs and plane/temporary files."""
    n = int(np.prod(shape))
    out = n + (2 * n * num_classes if probabilities else 0) + (n if tiff else 0) + (3 * n if uncertainty else 0)
    planes_b = n * num_classes * len(planes)
    rot = 0
    for p in planes:
        a = PLANES[p].rotation_axis
        if a is not None:
            nr = int(np.prod(rotated_volume_shape(shape, a)))
            rot = max(rot, nr * (2 + num_classes))  # float16 image + uint8 probabilities, one plane at a time
    return {"output": out, "planes": planes_b, "temporary": rot}


def check_disk(folder: Path, need_bytes: int, what: str) -> None:
    """Refuse to start when ``folder``'s file system has less free space than ``need_bytes``."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise DataError(folder, None, f"too little disk for {what}: needs up to {need_bytes / 2**30:.2f} GiB, "
                        f"{free / 2**30:.2f} GiB free")


def file_digest(path: Path, limit: int = 1 << 20) -> str:
    """A cheap identity of a model file: size, mtime and a hash of its first MiB."""
    st = Path(path).stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(limit)).hexdigest()[:16]
    return f"{Path(path).name}:{st.st_size}:{head}"

