"""Volume references (HDF5 dataset or folder of TIFF slices), lazy reading, validation, atomic volume writes.

A volume reference is written ``file.h5:/dataset`` (an HDF5 dataset), ``store.zarr:key`` (a Zarr
array, or the full resolution of an OME-Zarr multiscale image; see :func:`open_zarr_array`) or
``folder/`` (a folder of 2D TIFF slices, one per index of axis 0, read in natural sort order).
Paths are relative to the dataset folder that holds the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import typing as tp
from pathlib import Path

import h5py
import numpy as np

from data.atomic import atomic_dir, atomic_path
from data.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIX = ".zarr"
NUM_CLASSES = 4  # 0 background, 1 bone, 2 degradation layer, 3 residual material
CLASS_NAMES = ("background", "bone", "degradation_layer", "residual_material")


@dataclasses.dataclass(frozen=True)
class VolumeRef:
    """Where a volume lives: ``path`` (HDF5 file or TIFF folder) and, for HDF5, the dataset key."""

    path: Path
    dataset: tp.Optional[str] = None

    @property
    def is_zarr(self) -> bool:
        return Path(self.path).suffix.lower() == ZARR_SUFFIX

    @property
    def is_hdf5(self) -> bool:
        return self.dataset is not None and not self.is_zarr

    def __str__(self) -> str:
        return f"{self.path}:{self.dataset}" if self.dataset is not None else f"{self.path}/"

    def relative_to(self, root: Path) -> str:
        rel = os.path.relpath(self.path, root)
        return f"{rel}:{self.dataset}" if self.dataset is not None else f"{rel}/"


def parse_volume_ref(text: str, root: tp.Union[str, Path], *, source: str, field: str) -> VolumeRef:
    """Parse ``file.h5:/key`` or ``folder/`` relative to ``root``; refuse paths that leave ``root``."""
    root = Path(root).resolve()
    text = str(text).strip()
    if not text:
        raise DataError(source, field, "empty volume reference")
    m = re.match(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|nxs))(?::(?P<key>.*))?$", text)
    z = re.match(r"^(?P<file>.+?\.zarr)/?(?::(?P<key>.*))?$", text, re.IGNORECASE)
    if m:
        file, key = m.group("file"), (m.group("key") or "/image")
        dataset = "/" + key.lstrip("/")
    elif z:
        file, dataset = z.group("file"), (z.group("key") or "image").strip("/")
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
    if p.suffix.lower() == ZARR_SUFFIX:
        return VolumeRef(p, dataset.strip("/"))
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


def _multiscale_level0(group) -> tp.Optional[str]:
    """Path of the full-resolution dataset of an OME-Zarr multiscale image group, or None."""
    attrs = dict(group.attrs)
    ms = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")
    if ms and ms[0].get("datasets"):
        return str(ms[0]["datasets"][0]["path"])
    return None


def open_zarr_array(path: Path, key: str):
    """The array ``key`` of a Zarr store; a multiscale group named ``key`` gives its full resolution,
    and a ``key`` the store lacks gives the full resolution of the store's own OME-Zarr image
    (``seg.zarr`` written by model.predict read with ``--dataset labels`` or ``image``)."""
    import zarr

    path = Path(path)
    if not path.is_dir():
        raise DataError(path, key, "Zarr store does not exist")
    try:
        root = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is not a store
        raise DataError(path, None, f"not a Zarr store ({exc})") from exc
    node = root
    if isinstance(root, zarr.Group):
        key = key.strip("/")
        if key and key in root:
            node = root[key]
        elif _multiscale_level0(root) is not None:
            node = root
        else:
            raise DataError(path, key, f"array key missing (has: {sorted(root.keys())})")
        if isinstance(node, zarr.Group):
            level0 = _multiscale_level0(node)
            if level0 is None or level0 not in node:
                raise DataError(path, key, "is a group without an OME-Zarr multiscale image")
            node = node[level0]
    return node


@contextlib.contextmanager
def open_volume(ref: VolumeRef) -> tp.Iterator[ArrayLike]:
    """Open a volume lazily; errors name the file and the dataset key."""
    if ref.is_zarr:
        arr = open_zarr_array(ref.path, ref.dataset or "")
        if arr.ndim != 3:
            raise DataError(ref.path, ref.dataset, f"expected a 3D volume, got shape {arr.shape}")
        if min(arr.shape) == 0:
            raise DataError(ref.path, ref.dataset, f"empty volume, shape {arr.shape}")
        yield arr
        return
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


def is_zarr_path(path: tp.Union[str, Path]) -> bool:
    return Path(path).suffix.lower() == ZARR_SUFFIX


def atomic_output(final: tp.Union[str, Path], *, inputs: tp.Iterable[Path] = ()):
    """:func:`atomic_dir` for a ``.zarr`` store, else :func:`atomic_path`."""
    return atomic_dir(final, inputs=inputs) if is_zarr_path(final) else atomic_path(final, inputs=inputs)


OME_ZARR_FORMAT = "0.4"  # OME-NGFF 0.4 on Zarr v2: what napari, Fiji (n5-zarr) and neuroglancer all read


def create_zarr_group(path: tp.Union[str, Path]):
    """An empty Zarr v2 group for an OME-NGFF 0.4 store."""
    import zarr

    return zarr.open_group(str(path), mode="w", zarr_format=2)


def create_zarr_array(group, name: str, shape: tp.Sequence[int], dtype, *, chunk: int = 32):
    """A chunked array in ``group``: cubic spatial chunks (any slicing axis reads alike), extra axes whole."""
    shape = tuple(int(s) for s in shape)
    chunks = tuple(max(1, min(s, chunk)) for s in shape[:3]) + shape[3:]
    return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0)


def write_label_pyramid(group, *, name: str = "labels", min_edge: int = 16, max_levels: int = 6,
                        voxel_size_um: tp.Optional[float] = None, slab: int = 64) -> list[str]:
    """Make ``group`` an OME-Zarr multiscale image of the labels in its array ``0``.

    Level k+1 takes every second voxel of level k along each axis (nearest neighbour, as OME-Zarr
    does for label images: no new label values appear), slab by slab; levels stop when an edge
    would drop below ``min_edge``. The metadata is written by ome-zarr's own writer.
    """
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    paths = ["0"]
    prev = group["0"]
    while len(paths) < max_levels and min(prev.shape) // 2 >= min_edge:
        shape = tuple((s + 1) // 2 for s in prev.shape)
        cur = create_zarr_array(group, str(len(paths)), shape, prev.dtype, chunk=prev.chunks[0])
        for z0 in range(0, shape[0], slab):
            z1 = min(z0 + slab, shape[0])
            cur[z0:z1] = prev[2 * z0:2 * z1:2, ::2, ::2]
        paths.append(str(len(paths)))
        prev = cur
    unit = float(voxel_size_um) if voxel_size_um else 1.0
    datasets = [{"path": p, "coordinateTransformations": [{"type": "scale", "scale": [unit * 2 ** i] * 3}]}
                for i, p in enumerate(paths)]
    axes = [{"name": a, "type": "space", **({"unit": "micrometer"} if voxel_size_um else {})} for a in "zyx"]
    write_multiscales_metadata(group, datasets, fmt=FormatV04(), axes=axes, name=name)
    return paths
