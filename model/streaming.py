"""Streaming chunk-aligned slabs of a volume: slab keys, read → compute → write with overlapped I/O, phase
timings, progress bars, chunked HDF5 datasets and temporary memory maps."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from data.volume import VolumeRef, iter_slabs, read_checked

CHUNK = 32


class Progress:
    """A tqdm bar per phase, or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def bar(self, total: int, desc: str):
        if not self.enabled:
            return contextlib.nullcontext(NoBar())
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="slice", file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10)


class NoBar:
    """The bar of a disabled :class:`Progress`: counts nothing."""

    def update(self, n: int = 1) -> None:
        pass


def slabs(n: int, axis: int) -> tp.Iterator[tuple[tuple, int]]:
    """(index of one chunk-deep slab along ``axis``, its number of slices) over ``n`` slices."""
    for sl in iter_slabs((n,), CHUNK):
        yield tuple(sl if d == axis else slice(None) for d in range(3)), sl.stop - sl.start


def read_slab(source, key: tuple, axis: int, ref: tp.Optional[VolumeRef]) -> np.ndarray:
    """A slab with its slices along axis 0; ``ref`` names the file in read errors of user volumes."""
    if ref is not None:
        block = read_checked(source, key, ref=ref, field="image")
    else:  # a temporary memmap: copy here (numpy drops the GIL), not lazily in the compute threads
        block = np.array(source[key])
    return np.moveaxis(block, axis, 0)


def create_dataset(f: h5py.File, name: str, shape: tp.Sequence[int], dtype, *, compression: tp.Optional[str] = "lzf") -> h5py.Dataset:
    """A dataset of ``shape`` in ``f`` chunked :data:`CHUNK` deep along the 3 spatial axes (classes in one chunk)."""
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


class NoTimes(PhaseTimes):
    """Times nothing (no ``times`` asked for)."""

    @contextlib.contextmanager
    def phase(self, name: str):
        yield


def stream(keys: tp.Sequence, read, compute, write, *, overlap: bool, times: PhaseTimes, compute_phase: str) -> None:
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


@contextlib.contextmanager
def temp_arrays(folder: Path, stem: str) -> tp.Iterator[tp.Callable[..., np.ndarray]]:
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


class ParallelDeflate:
    """Chunk-aligned blocks of a gzip (deflate) HDF5 dataset written with every chunk compressed on a thread (zlib
    releases the GIL) and stored by HDF5's direct chunk write: h5py deflates chunk after chunk under its lock, which
    made the labels and maps of a paper-size scan a serial tail. Other blocks fall back to plain assignment."""

    def __init__(self, ds: h5py.Dataset, pool: ThreadPoolExecutor):
        self.ds, self.pool = ds, pool
        self.chunks = tuple(int(c) for c in (ds.chunks or ()))
        self.level = int(ds.compression_opts if ds.compression_opts is not None else 4)
        self.direct = ds.compression == "gzip" and not ds.shuffle and not ds.fletcher32 and bool(self.chunks)

    def __setitem__(self, key, value) -> None:
        import zlib

        key = tuple(key) + (slice(None),) * (self.ds.ndim - len(tuple(key)))
        value = np.asarray(value, self.ds.dtype)
        starts = [k.start or 0 for k in key]
        if not self.direct or value.ndim != self.ds.ndim or any(s % c for s, c in zip(starts, self.chunks)):
            self.ds[key] = value
            return
        jobs = []
        for index in np.ndindex(*[-(-n // c) for n, c in zip(value.shape, self.chunks)]):
            lo = [i * c for i, c in zip(index, self.chunks)]
            part = value[tuple(slice(a, a + c) for a, c in zip(lo, self.chunks))]
            if part.shape != self.chunks:  # an edge chunk is stored whole: pad it
                full = np.zeros(self.chunks, self.ds.dtype)
                full[tuple(slice(0, n) for n in part.shape)] = part
                part = full
            jobs.append((tuple(s + a for s, a in zip(starts, lo)),
                         self.pool.submit(zlib.compress, np.ascontiguousarray(part).tobytes(), self.level)))
        for offset, job in jobs:
            self.ds.id.write_direct_chunk(offset, job.result())
