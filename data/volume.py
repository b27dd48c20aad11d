"""Volume references (HDF5 dataset or folder of TIFF slices), lazy reading, validation, atomic writes.

A volume reference is written ``file.h5:/dataset`` (an HDF5 dataset) or ``folder/`` (a folder of
2D TIFF slices, one per index of axis 0, read in natural sort order). Paths are relative to the
dataset folder that holds the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import typing as tp
from pathlib import Path

import h5py
import numpy as np

from data.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff")
NUM_CLASSES = 4  # 0 background, 1 bone, 2 degradation layer, 3 residual material
CLASS_NAMES = ("background", "bone", "degradation_layer", "residual_material")


@dataclasses.dataclass(frozen=True)
class VolumeRef:
    """Where a volume lives: ``path`` (HDF5 file or TIFF folder) and, for HDF5, the dataset key."""

    path: Path
    dataset: tp.Optional[str] = None

    @property
    def is_hdf5(self) -> bool:
        return self.dataset is not None

    def __str__(self) -> str:
        return f"{self.path}:{self.dataset}" if self.is_hdf5 else f"{self.path}/"

    def relative_to(self, root: Path) -> str:
        rel = os.path.relpath(self.path, root)
        return f"{rel}:{self.dataset}" if self.is_hdf5 else f"{rel}/"


def parse_volume_ref(text: str, root: tp.Union[str, Path], *, source: str, field: str) -> VolumeRef:
    """Parse ``file.h5:/key`` or ``folder/`` relative to ``root``; refuse paths that leave ``root``."""
    root = Path(root).resolve()
    text = str(text).strip()
    if not text:
        raise DataError(source, field, "empty volume reference")
    m = re.match(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|nxs))(?::(?P<key>.*))?$", text)
    if m:
        file, key = m.group("file"), (m.group("key") or "/image")
        dataset = "/" + key.lstrip("/")
    else:
        file, dataset = text.rstrip("/"), None
    if os.path.isabs(file):
        raise DataError(source, field, f"absolute path {file!r} not allowed; give it relative to the dataset folder")
    full = (root / file).resolve()
    if full != root and root not in full.parents:
        raise DataError(source, field, f"path {file!r} leaves the dataset folder {root}")
    return VolumeRef(full, dataset)


def volume_ref(path: tp.Union[str, Path], dataset: str = "image") -> VolumeRef:
    """A volume named on a command line: ``file.h5`` with its ``dataset``, or a folder of TIFF slices."""
    p = Path(path)
    if p.is_dir():
        return VolumeRef(p)
    return VolumeRef(p, "/" + dataset.lstrip("/"))


def _tiff_files(folder: Path) -> list[Path]:
    def natural(p: Path) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]

    return sorted((p for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES), key=natural)


class TiffStack:
    """A folder of 2D TIFF slices seen as a lazy 3D array (axis 0 = file index)."""

    def __init__(self, folder: Path):
        import tifffile

        self.folder = folder
        self.files = _tiff_files(folder)
        if not self.files:
            raise DataError(folder, None, "no .tif/.tiff slices in folder")
        try:
            first = tifffile.imread(self.files[0])
        except Exception as exc:  # tifffile raises several types for broken files
            raise DataError(self.files[0], None, f"unreadable TIFF ({exc})") from exc
        if first.ndim != 2:
            raise DataError(self.files[0], None, f"expected a 2D slice, got shape {first.shape}")
        self.shape = (len(self.files),) + tuple(first.shape)
        self.dtype = first.dtype
        self.ndim = 3

    def _read(self, i: int) -> np.ndarray:
        import tifffile

        try:
            img = tifffile.imread(self.files[i])
        except Exception as exc:
            raise DataError(self.files[i], None, f"unreadable TIFF ({exc})") from exc
        if img.shape != self.shape[1:]:
            raise DataError(self.files[i], None, f"slice shape {img.shape} differs from {self.shape[1:]}")
        return img

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        k0 = key[0]
        if isinstance(k0, (int, np.integer)):
            return self._read(int(k0))[key[1:]]
        idx = range(self.shape[0])[k0]
        out = np.empty((len(idx),) + self.shape[1:], self.dtype)
        for j, i in enumerate(idx):
            out[j] = self._read(i)
        return out[(slice(None),) + key[1:]]


ArrayLike = tp.Union[h5py.Dataset, TiffStack, np.ndarray]


@contextlib.contextmanager
def open_volume(ref: VolumeRef) -> tp.Iterator[ArrayLike]:
    """Open a volume lazily; errors name the file and the dataset key."""
    if not ref.is_hdf5:
        if not ref.path.is_dir():
            raise DataError(ref.path, None, "TIFF folder does not exist")
        yield TiffStack(ref.path)
        return
    if not ref.path.is_file():
        raise DataError(ref.path, ref.dataset, "file does not exist")
    try:
        f = h5py.File(ref.path, "r")
    except OSError as exc:
        raise DataError(ref.path, None, f"corrupt or truncated HDF5 file ({exc})") from exc
    with f:
        if ref.dataset not in f:
            raise DataError(ref.path, ref.dataset, f"dataset key missing (has: {sorted(f.keys())})")
        ds = f[ref.dataset]
        if not isinstance(ds, h5py.Dataset):
            raise DataError(ref.path, ref.dataset, "is a group, not a dataset")
        if ds.ndim != 3:
            raise DataError(ref.path, ref.dataset, f"expected a 3D volume, got shape {ds.shape}")
        if min(ds.shape) == 0:
            raise DataError(ref.path, ref.dataset, f"empty volume, shape {ds.shape}")
        yield ds


def iter_slabs(shape: tp.Sequence[int], slab: int) -> tp.Iterator[slice]:
    """Slices of at most ``slab`` indices along axis 0."""
    for z0 in range(0, shape[0], slab):
        yield slice(z0, min(z0 + slab, shape[0]))


def slab_depth(shape: tp.Sequence[int], itemsize: int, budget_bytes: int = 256 << 20) -> int:
    """Slab depth along axis 0 so that one slab stays within ``budget_bytes``."""
    per_slice = max(1, int(np.prod(shape[1:])) * itemsize)
    return max(1, min(int(shape[0]), budget_bytes // per_slice))


def read_checked(vol: ArrayLike, key, *, ref: VolumeRef, field: str) -> np.ndarray:
    """Read a region, turning low-level HDF5 read errors (truncated data) into DataError."""
    try:
        return np.asarray(vol[key])
    except (OSError, RuntimeError, KeyError) as exc:
        raise DataError(ref.path, ref.dataset or field, f"cannot read data, file truncated or corrupt ({exc})") from exc


@dataclasses.dataclass(frozen=True)
class ImageStats:
    shape: tuple[int, ...]
    dtype: np.dtype
    min: float
    max: float


def check_image(ref: VolumeRef, *, field: str = "image", require_unit_range: bool = False) -> ImageStats:
    """Scan an image volume slab by slab: finite values (and [0, 1] if asked). Returns shape and range."""
    vmin, vmax = np.inf, -np.inf
    with open_volume(ref) as vol:
        shape = tuple(vol.shape)
        if not (np.issubdtype(vol.dtype, np.integer) or np.issubdtype(vol.dtype, np.floating)):
            raise DataError(ref.path, ref.dataset or field, f"unsupported dtype {vol.dtype}")
        depth = slab_depth(shape, np.dtype(vol.dtype).itemsize)
        for sl in iter_slabs(shape, depth):
            a = read_checked(vol, sl, ref=ref, field=field)
            if a.dtype.kind == "f":
                bad = ~np.isfinite(a)
                if bad.any():
                    z, y, x = np.argwhere(bad)[0]
                    raise DataError(ref.path, ref.dataset or field,
                                    f"NaN or Inf in image at voxel ({z + sl.start}, {y}, {x})")
            vmin, vmax = min(vmin, float(a.min())), max(vmax, float(a.max()))
        if require_unit_range and (vmin < 0 or vmax > 1):
            raise DataError(ref.path, ref.dataset or field, f"values outside [0, 1] (min {vmin:.4g}, max {vmax:.4g})")
        return ImageStats(shape, np.dtype(vol.dtype), vmin, vmax)


def check_labels(ref: VolumeRef, *, field: str = "label", expected_shape: tp.Optional[tp.Sequence[int]] = None) -> tuple[int, ...]:
    """Scan a label volume slab by slab: integer dtype, values in 0..3, shape equal to the image's."""
    with open_volume(ref) as vol:
        shape = tuple(vol.shape)
        if expected_shape is not None and shape != tuple(expected_shape):
            raise DataError(ref.path, ref.dataset or field,
                            f"label shape {shape} differs from image shape {tuple(expected_shape)}")
        if not np.issubdtype(vol.dtype, np.integer):
            raise DataError(ref.path, ref.dataset or field, f"labels must be integers, got dtype {vol.dtype}")
        depth = slab_depth(shape, np.dtype(vol.dtype).itemsize)
        for sl in iter_slabs(shape, depth):
            a = read_checked(vol, sl, ref=ref, field=field)
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= NUM_CLASSES:
                raise DataError(ref.path, ref.dataset or field,
                                f"label values must be in 0..{NUM_CLASSES - 1}, found {lo}..{hi}")
    return shape


@contextlib.contextmanager
def atomic_path(final: tp.Union[str, Path], *, inputs: tp.Iterable[Path] = ()) -> tp.Iterator[Path]:
    """Yield a temp path beside ``final``; rename it onto ``final`` only if the block succeeds.

    Refuses to write over any of ``inputs`` so an output can never replace its own source.
    """
    final = Path(final).resolve()
    for src in inputs:
        if Path(src).resolve() == final:
            raise DataError(final, None, "output would overwrite an input file")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results should be as readable as any new file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def default_chunks(shape: tp.Sequence[int], edge: int = 32) -> tuple[int, ...]:
    """Cubic chunks, so slices along any of the three axes read about the same number of chunks."""
    return tuple(max(1, min(int(s), edge)) for s in shape)


def write_h5_atomic(path: tp.Union[str, Path], arrays: tp.Mapping[str, np.ndarray], *,
                    attrs: tp.Optional[tp.Mapping[str, tp.Any]] = None, compression: tp.Optional[str] = "lzf") -> Path:
    """Write several in-memory 3D arrays as chunked datasets of one HDF5 file, atomically."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, arr in arrays.items():
                f.create_dataset(name, data=arr, chunks=default_chunks(arr.shape), compression=compression)
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
    return Path(path)
