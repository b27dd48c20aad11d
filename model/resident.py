"""Whole-volume multi-axes prediction held in memory: no plane files, no temporary rotated files.

The file path (model.inference + model.fuse) writes each plane's probabilities to disk and fuses them
afterwards; at paper scale those writes and reads took 44 % of a 9-plane prediction on an H200. Here
every plane's probabilities go straight into one fused accumulator instead:

* Σ_i P_i, the planes' uint8 probabilities (255 = 1) summed per class (uint16): Eq. 4's soft vote and P_avr;
* the planes' ballots per class (uint8), when a majority vote (Eq. 5) or the uncertainty maps need them;
* Σ of the fold disagreement of an ensemble (uint16), when asked for.

Each plane is predicted as the file path predicts it (the same slices, the same float16 rotated volume,
the same uint8 quantisation, the same rotation back), so the fused labels and maps are those of the file
path: on the host bit for bit (the same numpy and scipy code), on a device within float rounding
(model.resident_device). Where it runs is ``fuse_on``:

* ``host``: numpy arrays in RAM, rotations with scipy on threads (:func:`predict_on_host`);
* ``device``: the Keras backend's device (a GPU, or the CPU under TensorFlow), from the input volume to
  the argmax; only the uint8 outputs come back (model.resident_device);
* ``files``: the streaming plane files (what fits neither, SLURM plane arrays, ``--max-disk``, Table 2);
* ``auto``: the device when it is an accelerator and holds :func:`estimate_memory`, else the host when
  RAM holds it, else files. The choice and the estimate are printed before the first slice.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing as tp

import numpy as np

from data.rotation import other_axes, rotated_volume_shape
from data.volume import NUM_CLASSES, VolumeRef, open_volume, read_checked
from model.fusion import fuse_totals, map_names
from model.planes import PLANES
from model.streaming import CHUNK, NoTimes, PhaseTimes, Progress

log = logging.getLogger(__name__)

FUSE_ON = ("auto", "device", "host", "files")
#: Share of the free memory an estimate may take: allocator fragmentation and what the estimate leaves out.
MEMORY_HEADROOM = 0.8


class FuseOnError(ValueError):
    """A ``fuse_on`` that cannot run here (names the option and the numbers)."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of an in-memory prediction, by what holds them."""

    input: int  # the volume, float32
    rotated_image: int  # the largest rotated plane's volume, float16 (9 planes only)
    rotated_probabilities: int  # its uint8 probabilities (and fold disagreement) on the rotated grid
    accumulator: int  # Σ P_i (uint16), ballots (uint8), Σ fold disagreement (uint16)
    network: int  # one batch of slices through the network(s): activations, probabilities
    working: int = 0  # slabs in flight: float32 probabilities of a slab of slices, the rotation's float32 samples
    where: str = "host"

    PARTS = ("input", "rotated_image", "rotated_probabilities", "accumulator", "network", "working")

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in self.PARTS)

    def describe(self) -> str:
        unit, scale = ("GiB", 2**30) if self.total >= 2**30 else ("MiB", 2**20)
        parts = ", ".join(f"{k.replace('_', ' ')} {getattr(self, k) / scale:.2f}" for k in self.PARTS)
        return f"{self.total / scale:.2f} {unit} ({parts})"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def needs_ballots(vote: str, uncertainty: bool) -> bool:
    """Ballots per class are kept for Eq. 5 and for the uncertainty maps (disagreement, plane classes)."""
    return vote == "majority" or uncertainty


def estimate_memory(shape: tp.Sequence[int], planes: tp.Sequence[str], *, vote: str = "soft",
                    uncertainty: bool = False, fold_disagreement: bool = False, num_classes: int = NUM_CLASSES,
                    network_bytes: int = 0, where: str = "host") -> MemoryEstimate:
    """What :func:`predict_on_host` (``where="host"``) or the device path (``"device"``) holds at its peak.

    The device keeps only the K − 1 foreground classes of a rotated plane (background is the remainder when it is
    rotated back), the host all K packed in a uint32; both one rotated input volume for the two planes of its axis."""
    n = int(np.prod([int(s) for s in shape]))
    k = int(num_classes)
    rotated = [int(np.prod(rotated_volume_shape(shape, PLANES[p].rotation_axis)))
               for p in planes if PLANES[p].rotated]
    n_rot = max(rotated, default=0)
    k_rot = k - 1 if where == "device" else k  # the host packs all 4 classes of a voxel in one uint32
    acc = n * k * 2 + (n * k if needs_ballots(vote, uncertainty) else 0) + (n * 2 if fold_disagreement else 0)
    area = max((h * w for h, w in slice_shapes(shape, planes)), default=0)
    # Host: a slab of CHUNK slices computed while the last one is written (float32 probabilities and their uint8
    # copy) and the rotation back's float32 samples; the device goes batch by batch, in the network's part.
    working = 3 * CHUNK * area * k * 4 if where == "host" else 0
    return MemoryEstimate(input=4 * n, rotated_image=2 * n_rot,
                          rotated_probabilities=n_rot * (k_rot + (1 if fold_disagreement else 0)),
                          accumulator=acc, network=int(network_bytes), working=working, where=where)


def host_free_bytes() -> int:
    """RAM this process may still use: what the system has available, capped by a SLURM job's memory."""
    try:
        import psutil
    except ImportError:  # a bare GPU machine (benchmarks/gpu_check.py): the kernel's own figure
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return int(info.get("MemAvailable", 0))
    free = int(psutil.virtual_memory().available)
    slurm_mb = os.environ.get("SLURM_MEM_PER_NODE")
    if slurm_mb and slurm_mb.isdigit():  # the job's limit, not the node's: an overrun is an OOM kill
        free = min(free, int(slurm_mb) * 2**20 - int(psutil.Process().memory_info().rss))
    return max(0, free)


def check_fuse_on(requested: str, files_only: tp.Optional[str] = None) -> None:
    """Refuse an unknown ``fuse_on``, and an in-memory one where ``files_only`` says plane files are needed (before
    any model is loaded: no memory figures needed for that)."""
    if requested not in FUSE_ON:
        raise FuseOnError(f"--fuse-on: must be one of {FUSE_ON}, got {requested!r}")
    if files_only and requested in ("host", "device"):
        raise FuseOnError(f"--fuse-on {requested}: not with {files_only} (plane files are needed); "
                          "use --fuse-on files or auto")


def choose_fuse_on(requested: str, host: MemoryEstimate, device: tp.Optional[MemoryEstimate], *,
                   accelerator: bool, device_free: tp.Optional[int], host_free: int,
                   files_only: tp.Optional[str] = None) -> tuple[str, str]:
    """(``device`` | ``host`` | ``files``, why) for ``requested`` in :data:`FUSE_ON`.

    ``files_only``: a reason that rules out the in-memory paths (a single plane task, ``--keep-planes``, ...).
    An explicit ``host``/``device`` that does not fit, or that ``files_only`` rules out, raises FuseOnError."""
    check_fuse_on(requested, files_only)
    if files_only:
        return "files", files_only
    if requested == "files":
        return "files", "asked for"

    def fits(est: tp.Optional[MemoryEstimate], free: tp.Optional[int]) -> bool:
        return est is not None and free is not None and est.total <= MEMORY_HEADROOM * free

    gib = 2**30
    if requested == "device" or (requested == "auto" and accelerator):
        if fits(device, device_free):
            return "device", (f"needs ~{tp.cast(MemoryEstimate, device).describe()} of "
                              f"{tp.cast(int, device_free) / gib:.2f} GiB free on the device")
        if requested == "device":
            need = "an unknown amount" if device is None else f"~{device.describe()}"
            have = "unknown" if device_free is None else f"{device_free / gib:.2f} GiB"
            raise FuseOnError(f"--fuse-on device: needs {need}, more than {MEMORY_HEADROOM:.0%} of the device's free "
                              f"memory ({have}); use --fuse-on host, files or auto")
    if fits(host, host_free):
        why = f"needs ~{host.describe()} of {host_free / gib:.2f} GiB free RAM"
        return "host", (why + ("; the device's memory does not hold it" if accelerator else ""))
    if requested == "host":
        raise FuseOnError(f"--fuse-on host: needs ~{host.describe()}, more than {MEMORY_HEADROOM:.0%} of the "
                          f"{host_free / gib:.2f} GiB free RAM; use --fuse-on files or auto")
    return "files", f"memory holds neither (host needs ~{host.describe()}, {host_free / gib:.2f} GiB free)"


class _Sink:
    """Where the file path's plane loops write a plane file, here: every write adds into the accumulator."""

    def __init__(self, add: tp.Callable[[tuple, np.ndarray], None], shape: tuple, dtype):
        self._add, self.shape, self.dtype = add, shape, np.dtype(dtype)

    def __setitem__(self, key, value) -> None:
        self._add(key, np.asarray(value))


def _add_into(view: np.ndarray, value: np.ndarray) -> None:
    """view += value in place: ``a[key] += b`` also copies the sum back through ``__setitem__`` (20× slower on a
    strided slab, measured)."""
    np.add(view, value, out=view, casting="unsafe")


def _widen(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` as ``dtype`` with the class axis contiguous (a view of it as one wide lane-packed word works)."""
    out = values.astype(dtype, order="K")
    return out if out.strides[-1] == out.itemsize else np.ascontiguousarray(out)


class HostAccumulator:
    """The fused accumulator in RAM (numpy): Σ P_i per class, ballots per class, Σ fold disagreement."""

    def __init__(self, shape: tp.Sequence[int], num_classes: int = NUM_CLASSES, *, ballots: bool, fold: bool):
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.sums = np.zeros(self.shape + (self.num_classes,), np.uint16)
        self.counts = np.zeros(self.shape + (self.num_classes,), np.uint8) if ballots else None
        self.fold = np.zeros(self.shape, np.uint16) if fold else None
        self.planes = 0
        sums, counts, fold_sum = self.sums, self.counts, self.fold
        packed = self.num_classes == 4
        classes = np.arange(self.num_classes, dtype=np.uint8)

        # Closures over the arrays, not bound methods: no reference cycle, so the (large) totals go with the
        # accumulator instead of waiting for the garbage collector.
        def add_probabilities(key: tuple, probs: np.ndarray) -> None:
            key = tuple(key)[:3]
            if packed:  # 4 uint16 lanes in one uint64 (no carry: 9 × 255 < 2^16): one strided add per voxel
                _add_into(sums.view(np.uint64)[..., 0][key], _widen(probs, np.uint16).view(np.uint64)[..., 0])
            else:
                _add_into(sums[key], probs)
            if counts is not None:
                votes = probs.argmax(-1)[..., None] == classes
                if packed:  # 4 uint8 ballots in one uint32 (at most 255 planes)
                    _add_into(counts.view(np.uint32)[..., 0][key], _widen(votes, np.uint8).view(np.uint32)[..., 0])
                else:
                    _add_into(counts[key], votes)

        def add_fold(key: tuple, fraction: np.ndarray) -> None:
            _add_into(tp.cast(np.ndarray, fold_sum)[tuple(key)[:3]], fraction)

        # What model.inference's plane loops write to, as they write a plane file.
        self.probabilities = _Sink(add_probabilities, self.shape + (self.num_classes,), np.uint8)
        self.fold_fraction = _Sink(add_fold, self.shape, np.uint8) if fold else None

    @property
    def has_fold(self) -> bool:
        return self.fold is not None

    def fused_blocks(self, vote: str, *, probabilities: bool, uncertainty: bool
                     ) -> tp.Iterator[tuple[tuple, np.ndarray, tp.Optional[np.ndarray], dict]]:
        """(key, labels, P_avr as float16 or None, maps) per slab of :data:`CHUNK` slices along axis 0."""
        for z0 in range(0, self.shape[0], CHUNK):
            key = (slice(z0, min(z0 + CHUNK, self.shape[0])), slice(0, self.shape[1]))
            yield (key, *fuse_totals(self.sums[key], None if self.counts is None else self.counts[key],
                                     None if self.fold is None else self.fold[key], self.planes, vote,
                                     probabilities=probabilities, uncertainty=uncertainty))


class RotatedPlane:
    """A rotated plane's uint8 probabilities on the rotated grid in RAM, as its rotation back reads them: the rotation
    axis first (a slab is contiguous), the K = 4 classes of a voxel packed in one uint32 (numpy moves one 32-bit
    element per voxel instead of four bytes: 4× faster transposes), an ensemble's fold disagreement beside it.
    model.inference's plane loop writes to :attr:`probabilities` / :attr:`fraction` as it writes a temporary file."""

    def __init__(self, rshape: tp.Sequence[int], axis: int, num_classes: int, fold: bool):
        if num_classes != 4:
            raise ValueError(f"a rotated plane packs 4 classes per voxel, got {num_classes}")
        self.axis, self.num_classes = int(axis), int(num_classes)
        b, c = other_axes(self.axis)
        rshape = tuple(int(s) for s in rshape)
        a = self.axis
        data = self.data = np.empty((rshape[a], rshape[b], rshape[c]), np.uint32)
        fraction = self.fold = np.empty((rshape[a], rshape[b], rshape[c]), np.uint8) if fold else None

        # Closures over the arrays, not bound methods: no reference cycle, so the buffers go when the plane does.
        def set_probabilities(key: tuple, value: np.ndarray) -> None:
            data[key[a], key[b], key[c]] = np.transpose(value.view(np.uint32)[..., 0], (a, b, c))

        def set_fraction(key: tuple, value: np.ndarray) -> None:
            tp.cast(np.ndarray, fraction)[key[a], key[b], key[c]] = np.transpose(value, (a, b, c))

        self.probabilities = _Sink(set_probabilities, rshape + (num_classes,), np.uint8)
        self.fraction = _Sink(set_fraction, rshape, np.uint8) if fold else None

    def slab(self, start: int, stop: int) -> np.ndarray:
        """Slices ``start:stop`` along the rotation axis: (m, h, w, C) uint8, the K − 1 foreground classes (and the
        fold disagreement) — what the rotation back interpolates."""
        fg = self.data[start:stop].view(np.uint8).reshape(self.data[start:stop].shape + (4,))[..., 1:]
        return fg if self.fold is None else np.concatenate([fg, self.fold[start:stop, ..., None]], axis=-1)


def rotate_back_into(plane: RotatedPlane, acc: "HostAccumulator", shape: tp.Sequence[int], rotation, *,
                     overlap: bool, times: PhaseTimes, bars: Progress, desc: str) -> None:
    """The plane's probabilities (and fold disagreement) rotated back onto the original grid, slab by slab along its
    rotation axis (model.rotate.CpuRotation.unrotate_channels: the file path's arithmetic), added into ``acc``."""
    from model.streaming import slabs, stream

    a = plane.axis
    b, c = other_axes(a)
    plane_shape = (int(shape[b]), int(shape[c]))
    with bars.bar(int(shape[a]), desc) as bar:
        def compute(key, block):
            res = rotation.unrotate_channels(block, plane_shape, plane.num_classes - 1)
            bar.update(block.shape[0])
            return res

        def write(key, res):
            probs, extra = res
            acc.probabilities[key + (slice(None),)] = np.moveaxis(probs, 0, a)
            if extra is not None and acc.fold_fraction is not None:
                acc.fold_fraction[key] = np.moveaxis(extra[..., 0], 0, a)

        stream([key for key, _ in slabs(int(shape[a]), a)], lambda key: plane.slab(key[a].start, key[a].stop),
               compute, write, overlap=overlap, times=times, compute_phase="rotate_back")


def rotated_again_later(planes: tp.Sequence[str], index: int) -> bool:
    """Whether a plane after ``planes[index]`` (a rotated one) slices the same rotated volume: then it is kept."""
    axis = PLANES[planes[index]].rotation_axis
    return any(PLANES[q].rotation_axis == axis for q in planes[index + 1:])


def read_volume(ref: VolumeRef, shape: tp.Sequence[int]) -> np.ndarray:
    """The whole input volume as float32 in RAM, read slab by slab (read errors name the file)."""
    out = np.empty(tuple(int(s) for s in shape), np.float32)
    with open_volume(ref) as vol:
        for z0 in range(0, out.shape[0], CHUNK):
            out[z0:z0 + CHUNK] = read_checked(vol, np.s_[z0:z0 + CHUNK], ref=ref, field="image")
    return out


def predict_on_host(ref: VolumeRef, shape: tp.Sequence[int], planes: tp.Sequence[str], predictor, *, vote: str,
                    uncertainty: bool, fold_disagreement: bool = False, num_classes: int = NUM_CLASSES,
                    batch_size: int = 4, rotation=None, workers: int = 1, times: tp.Optional[PhaseTimes] = None,
                    progress: bool = True) -> HostAccumulator:
    """Every plane of ``planes`` predicted into one :class:`HostAccumulator` (paper, multi-axes prediction fusing).

    The plane loops are model.inference's own (the same slices, rotations, quantisation, threads), writing into
    the accumulator and into RAM arrays where the file path writes plane files and temporary memory maps."""
    from model.inference import _predict_along, _rotate_volume
    from model.rotate import CpuRotation

    times = times or NoTimes()
    own_rotation = not isinstance(rotation, CpuRotation)  # numpy here: the device has its own path
    if own_rotation:
        rotation = CpuRotation(workers)
    bars = Progress(progress)
    overlap = workers > 1
    shape = tuple(int(s) for s in shape)
    with times.phase("read"):
        volume = read_volume(ref, shape)
    acc = HostAccumulator(shape, num_classes, ballots=needs_ballots(vote, uncertainty), fold=fold_disagreement)
    rotated: tuple[tp.Optional[int], tp.Optional[np.ndarray]] = (None, None)  # (axis, volume rotated about it)
    for i, name in enumerate(planes):
        p = PLANES[name]
        if not p.rotated:
            _predict_along(volume, p.slice_axis, acc.probabilities, predictor, batch_size=batch_size,
                           desc=f"{name} predict", progress=bars, overlap=overlap, times=times,
                           extra=acc.fold_fraction)
        else:
            a = tp.cast(int, p.rotation_axis)
            rshape = rotated_volume_shape(shape, a)
            if rotated[0] != a:  # the two planes of one rotation axis slice the same rotated volume: rotate it once
                rotated = (None, None)  # the last axis's volume goes before the next one is made
                # float16 as in the file path's temporary file: the same network input, the same labels.
                rotated = (a, np.empty(rshape, np.float16))
                _rotate_volume(volume, a, rotated[1], progress=bars, desc=f"{name} rotate", rotation=rotation,
                               overlap=overlap, times=times)
            rimg = tp.cast(np.ndarray, rotated[1])
            plane = RotatedPlane(rshape, a, num_classes, fold_disagreement)
            _predict_along(rimg, p.slice_axis, plane.probabilities, predictor, batch_size=batch_size,
                           desc=f"{name} predict", progress=bars, overlap=overlap, times=times, extra=plane.fraction)
            del rimg
            if not rotated_again_later(planes, i):
                rotated = (None, None)
            rotate_back_into(plane, acc, shape, rotation, overlap=overlap, times=times, bars=bars,
                             desc=f"{name} rotate back")
            del plane
        acc.planes += 1
    if own_rotation:
        rotation.close()
    return acc


def device_free_bytes() -> tp.Optional[int]:
    """Free memory of the Keras backend's device: a GPU's (JAX: XLA's allocator; TensorFlow: the card's total by
    NVML less what TensorFlow holds), the host's RAM for a CPU device, None where it cannot be read."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        dev = jax.local_devices()[0]
        if dev.platform == "cpu":
            return host_free_bytes()
        stats = dev.memory_stats() or {}
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)) if "bytes_limit" in stats else None
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_logical_devices("GPU"):
            return host_free_bytes()
        try:
            import pynvml

            pynvml.nvmlInit()
            total = int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
            return total - int(tf.config.experimental.get_memory_info("GPU:0")["current"])
        except Exception:  # noqa: BLE001 - no NVML: unknown, so auto does not pick the device
            return None
    return None


#: Batches above these gain nothing measurable: a CPU runs 19–20 slices/s of 256² at 4 and at 16 (c0=32, d=3);
#: a GPU fills its SMs with a few 1200² slices of the paper's models.
MAX_BATCH = {"host": 8, "device": 64, "files": 8}


def auto_batch_size(per_slice: int, free: tp.Optional[int], reserved: int, *, cap: int) -> int:
    """Slices per forward pass that fit in ``free`` × headroom beside ``reserved`` bytes; at most ``cap``, at least 1,
    a multiple of 8 from 8 up (the file path's slabs are 32 slices deep: no ragged batch inside a slab)."""
    if free is None:
        return min(cap, 4)
    b = int((MEMORY_HEADROOM * free - reserved) // max(1, per_slice))
    b = max(1, min(cap, b))
    return b - b % 8 if b >= 8 else b


def slice_shapes(shape: tp.Sequence[int], planes: tp.Sequence[str]) -> list[tuple[int, int]]:
    """The (H, W) of the slices each plane feeds the network (a rotated plane's are larger)."""
    out = []
    for name in planes:
        p = PLANES[name]
        grid = rotated_volume_shape(shape, p.rotation_axis) if p.rotated else tuple(int(s) for s in shape)
        out.append(tuple(int(grid[d]) for d in range(3) if d != p.slice_axis))
    return out


def network_bytes_per_slice(models: tp.Sequence, shapes: tp.Sequence[tuple[int, int]], precision: str) -> int:
    """model.complexity's inference memory of the largest slice, for every model of an ensemble run together."""
    from model.complexity import inference_memory_per_slice
    from model.unet import infer_depth, infer_width

    depth = infer_depth(models[0])
    step = 2 ** depth
    padded = [(-(-h // step) * step, -(-w // step) * step) for h, w in shapes]
    try:
        width = infer_width(models[0])
        one = max(inference_memory_per_slice(width, depth, s, precision) for s in padded)
    except ValueError:  # not a U-net of build_unet: its output and a few copies of the input
        one = max(h * w * (NUM_CLASSES * 12 + 16) for h, w in padded)
    return one * max(1, len(models))


@dataclasses.dataclass
class Plan:
    """Where a whole-volume prediction runs and with what batch, decided before its first slice."""

    fuse_on: str
    why: str
    batch_size: int
    precision: str
    host: MemoryEstimate
    device: tp.Optional[MemoryEstimate]
    host_free: int
    device_free: tp.Optional[int]

    def describe(self) -> str:
        return f"fuse on {self.fuse_on}: {self.why}; batch {self.batch_size}, precision {self.precision}"

    @property
    def estimate(self) -> tp.Optional[MemoryEstimate]:
        """The chosen in-memory path's estimate (None for plane files)."""
        return {"host": self.host, "device": self.device}.get(self.fuse_on)

    def as_dict(self) -> dict:
        est = self.estimate
        return {"fuse_on": self.fuse_on, "why": self.why, "batch_size": self.batch_size, "precision": self.precision,
                "estimate_bytes": est.as_dict() if est is not None else None,
                "host_estimate_bytes": self.host.total,
                "device_estimate_bytes": self.device.total if self.device is not None else None,
                "host_free_bytes": self.host_free, "device_free_bytes": self.device_free}


def plan_prediction(requested: str, shape: tp.Sequence[int], planes: tp.Sequence[str], models: tp.Sequence, *,
                    vote: str, uncertainty: bool, fold_disagreement: bool, batch_size: tp.Optional[int],
                    precision: str, files_only: tp.Optional[str] = None,
                    host_free: tp.Optional[int] = None, device_free: tp.Optional[int] = None) -> Plan:
    """:func:`choose_fuse_on` with the memory estimates of both in-memory paths, each with its batch (``batch_size``
    None: the largest that fits, :func:`auto_batch_size`). ``host_free``/``device_free`` default to what this
    machine has now (tests pass their own)."""
    from model.rotate import device_has_accelerator

    accelerator = device_has_accelerator()
    host_free = host_free_bytes() if host_free is None else int(host_free)
    per_slice = network_bytes_per_slice(models, slice_shapes(shape, planes), precision)
    weights = sum(int(m.count_params()) for m in models) * (6 if precision != "float32" else 4)
    kw = dict(vote=vote, uncertainty=uncertainty, fold_disagreement=fold_disagreement)
    base_host = estimate_memory(shape, planes, where="host", **kw)
    host_batch = batch_size or auto_batch_size(per_slice, host_free, base_host.total + weights, cap=MAX_BATCH["host"])
    host = estimate_memory(shape, planes, where="host", network_bytes=weights + per_slice * host_batch, **kw)
    device = None
    device_cap = MAX_BATCH["device"] if accelerator else MAX_BATCH["host"]  # a CPU "device" batches as the host
    device_batch = batch_size or device_cap
    if requested == "device" or (requested == "auto" and accelerator and not files_only):
        import keras

        if keras.backend.backend() in ("jax", "tensorflow"):
            device_free = device_free_bytes() if device_free is None else int(device_free)
            base = estimate_memory(shape, planes, where="device", **kw)
            device_batch = batch_size or auto_batch_size(per_slice, device_free, base.total + weights, cap=device_cap)
            device = estimate_memory(shape, planes, where="device", network_bytes=weights + per_slice * device_batch,
                                     **kw)
    choice, why = choose_fuse_on(requested, host, device, accelerator=accelerator, device_free=device_free,
                                 host_free=host_free, files_only=files_only)
    if choice == "device":
        batch = device_batch
    elif choice == "host":
        batch = host_batch
    else:  # plane files hold nothing big in memory: the network's batch beside the weights
        batch = batch_size or auto_batch_size(per_slice, host_free, weights, cap=MAX_BATCH["files"])
    return Plan(choice, why, int(batch), precision, host, device, host_free, device_free)


def write_outputs(acc, outputs: tp.Sequence[tuple[tp.Any, bool, tp.Any]], *, vote: str, uncertainty: bool,
                  meta: dict, shape: tp.Sequence[int], num_classes: int = NUM_CLASSES, inputs=(), image=None,
                  voxel_size_um=None, times: tp.Optional[PhaseTimes] = None, progress: bool = True) -> None:
    """Every output of an in-memory prediction from its accumulator (host or device): ``outputs`` holds
    (path, probabilities, tiff path or None); the files are model.fuse's (``fused_output``), written atomically."""
    from model.fuse import fused_output

    times = times or NoTimes()
    names = map_names(uncertainty, acc.has_fold)
    for path, probabilities, tiff in outputs:
        with fused_output(path, tuple(shape) + (num_classes,), meta=meta, probabilities=probabilities,
                          map_names=names, tiff_path=tiff, inputs=inputs, image=image, voxel_size_um=voxel_size_um,
                          times=times, progress=progress, desc=f"fuse {vote} ({acc.planes} planes)") as write:
            blocks = acc.fused_blocks(vote, probabilities=probabilities, uncertainty=uncertainty)
            while True:
                with times.phase("fuse"):
                    item = next(blocks, None)
                if item is None:
                    break
                write(*item)
