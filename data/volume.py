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


def _ngff_attrs(group) -> dict:
    """A group's OME attributes, wherever its Zarr version keeps them (v3 under ``ome``)."""
    attrs = dict(group.attrs)
    return {**attrs, **attrs.get("ome", {})}


def _multiscale_level0(group) -> tp.Optional[str]:
    """Path of the full-resolution dataset of an OME-Zarr multiscale image group, or None."""
    ms = _ngff_attrs(group).get("multiscales")
    if ms and ms[0].get("datasets"):
        return str(ms[0]["datasets"][0]["path"])
    return None


ZARR_SEARCH = ("labels", "uncertainty")  # where model.predict's store keeps its named images (a bare name finds them)


def _zarr_node(root, key: str):
    """The node ``key`` names: a path in the store, else a name under ``labels/`` or ``uncertainty/``; an NGFF
    ``labels/`` group stands for its first label image (so ``labels`` gives ``labels/segmentation``)."""
    import zarr

    hits = [p for p in (key, *(f"{d}/{key}" for d in ZARR_SEARCH)) if key and p in root]
    if not hits:
        return None
    node = root[hits[0]]
    names = _ngff_attrs(node).get("labels") if isinstance(node, zarr.Group) else None
    if names and names[0] in node:
        node = node[names[0]]
    return node


def open_zarr_array(path: Path, key: str):
    """The array ``key`` of a Zarr store; a multiscale group gives its full resolution. In a store of
    model.predict ``labels`` is ``labels/segmentation``, ``confidence`` is ``uncertainty/confidence`` (see
    :func:`_zarr_node`), and ``image`` (or the old stores' ``labels``: the root image's name) the root image."""
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
        node = _zarr_node(root, key)
        own = (_ngff_attrs(root).get("multiscales") or [{}])[0].get("name")
        if node is None and _multiscale_level0(root) is not None and key in ("", "image", own):
            node = root  # the store's own image: an OME-Zarr scan read with the default key
        if node is None:
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


OME_ZARR_FORMAT = "0.4"  # OME-NGFF 0.4 on Zarr v2: what napari, Fiji (n5-zarr), MoBIE and neuroglancer all read
PYRAMID_MIN_EDGE = 16  # no level with an edge below this: smaller ones add nothing a viewer needs
PYRAMID_MAX_LEVELS = 6
# Label colours (RGBA 0-255) as data/show.py draws them; background fully transparent so the scan shows through.
CLASS_RGBA = ((0, 0, 0, 0), (38, 140, 255, 255), (26, 230, 51, 255), (255, 38, 26, 255))


def _ngff_format():
    """ome-zarr's writer for :data:`OME_ZARR_FORMAT` (one place, so every group is written alike)."""
    from ome_zarr.format import FormatV04

    return FormatV04()


def create_zarr_group(path: tp.Union[str, Path]):
    """An empty Zarr v2 group for an OME-NGFF 0.4 store."""
    import zarr

    return zarr.open_group(str(path), mode="w", zarr_format=2)


def create_zarr_array(group, name: str, shape: tp.Sequence[int], dtype, *, chunk: int = 32):
    """A chunked array in ``group``: cubic chunks over the last three (spatial) axes, so any slicing axis reads
    alike, and one index per chunk along leading axes (a viewer reads one channel without the others)."""
    shape = tuple(int(s) for s in shape)
    chunks = (1,) * (len(shape) - 3) + tuple(max(1, min(s, chunk)) for s in shape[-3:])
    return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0)


def pyramid_shapes(shape: tp.Sequence[int], *, min_edge: int = PYRAMID_MIN_EDGE,
                   max_levels: int = PYRAMID_MAX_LEVELS) -> list[tuple[int, ...]]:
    """Spatial shapes of the levels, each halving every axis (rounding up): one rule, so every image of a
    store has the same levels and scales."""
    shapes = [tuple(int(s) for s in shape)]
    while len(shapes) < max_levels and min(shapes[-1]) // 2 >= min_edge:
        shapes.append(tuple((s + 1) // 2 for s in shapes[-1]))
    return shapes


def downsample(block: np.ndarray, how: str) -> np.ndarray:
    """Halve the last three axes: ``nearest`` takes every second voxel (labels keep their values), ``mean``
    averages 2×2×2 voxels (grey values and fractions lose noise, not level; an odd edge repeats its last voxel)."""
    if how == "nearest":
        return block[..., ::2, ::2, ::2]
    if how != "mean":
        raise ValueError(f"downsample: how must be 'nearest' or 'mean', got {how!r}")
    lead = block.shape[:-3]
    pad = [(0, 0)] * len(lead) + [(0, s % 2) for s in block.shape[-3:]]
    a = np.pad(block.astype(np.float32), pad, mode="edge")
    z, y, x = a.shape[-3:]
    a = a.reshape(lead + (z // 2, 2, y // 2, 2, x // 2, 2)).mean(axis=(-5, -3, -1))
    return (np.rint(a) if np.issubdtype(block.dtype, np.integer) else a).astype(block.dtype)


def write_pyramid(group, how: str, *, min_edge: int = PYRAMID_MIN_EDGE, max_levels: int = PYRAMID_MAX_LEVELS,
                  budget_bytes: int = 64 << 20) -> list[str]:
    """Levels ``1``, ``2``, … of ``group``'s array ``0`` by :func:`downsample`, slab by slab along z, so memory
    stays within ``budget_bytes`` whatever the volume. Returns the level paths."""
    prev = group["0"]
    lead = tuple(prev.shape[:-3])
    paths = ["0"]
    for shape in pyramid_shapes(prev.shape[-3:], min_edge=min_edge, max_levels=max_levels)[1:]:
        cur = create_zarr_array(group, str(len(paths)), lead + shape, prev.dtype, chunk=prev.chunks[-1])
        per_out_slice = 2 * 4 * int(np.prod(prev.shape)) // prev.shape[-3]  # two float32 input slices
        depth = max(1, budget_bytes // max(1, per_out_slice))
        for z0 in range(0, shape[0], depth):
            z1 = min(z0 + depth, shape[0])
            src = (slice(None),) * len(lead) + (slice(2 * z0, 2 * z1),)
            cur[(slice(None),) * len(lead) + (slice(z0, z1),)] = downsample(np.asarray(prev[src]), how)
        paths.append(str(len(paths)))
        prev = cur
    return paths


def ngff_datasets(paths: tp.Sequence[str], voxel_size_um: float, how: str, channels: bool = False) -> list[dict]:
    """Each level's coordinate transformations: scale voxel × 2^k; an averaged level also moves by
    (2^k − 1)/2 voxels, where the centres of the voxels it averaged lie (a strided level needs no shift)."""
    lead = [1.0] if channels else []
    out = []
    for k, path in enumerate(paths):
        ct: list[dict] = [{"type": "scale", "scale": lead + [float(voxel_size_um) * 2 ** k] * 3}]
        if how == "mean" and k:
            shift = float(voxel_size_um) * (2 ** k - 1) / 2
            ct.append({"type": "translation", "translation": [0.0] * len(lead) + [shift] * 3})
        out.append({"path": path, "coordinateTransformations": ct})
    return out


def ngff_axes(channels: bool = False) -> list[dict]:
    """Axes z, y, x in micrometres, after a channel axis ``c`` where the image has one (NGFF orders c first)."""
    return ([{"name": "c", "type": "channel"}] if channels else []) + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]


def write_multiscale_image(group, *, name: str, voxel_size_um: float, how: str, channels: bool = False,
                           omero: tp.Optional[dict] = None, **pyramid: tp.Any) -> list[str]:
    """Make ``group`` (its array ``0`` written) an OME-Zarr multiscale image: the levels streamed by
    :func:`write_pyramid`, the metadata by ome-zarr's own writer (validated as viewers expect it)."""
    from ome_zarr.writer import write_multiscales_metadata

    if not (voxel_size_um and np.isfinite(voxel_size_um) and voxel_size_um > 0):
        raise ValueError(f"voxel_size_um: an OME-Zarr image needs a positive voxel size, got {voxel_size_um!r}")
    paths = write_pyramid(group, how, **pyramid)
    extra = {"metadata": {"omero": omero}} if omero else {}
    write_multiscales_metadata(group, ngff_datasets(paths, voxel_size_um, how, channels), fmt=_ngff_format(),
                               axes=ngff_axes(channels), name=name, **extra)
    return paths


def class_label_metadata() -> tuple[list[dict], list[dict]]:
    """``image-label`` colours and properties of the four classes, so a viewer names and colours them."""
    colors = [{"label-value": i, "rgba": list(c)} for i, c in enumerate(CLASS_RGBA)]
    properties = [{"label-value": i, "name": n} for i, n in enumerate(CLASS_NAMES)]
    return colors, properties


def class_set_label_metadata() -> tuple[list[dict], list[dict]]:
    """``image-label`` of a class bit mask (bit c: some plane says class c): each of the 16 sets named
    (``bone+degradation_layer``) and coloured by the mean of its foreground classes' colours."""
    colors, properties = [], []
    for v in range(1 << NUM_CLASSES):
        members = [c for c in range(NUM_CLASSES) if v >> c & 1]
        fg = [CLASS_RGBA[c][:3] for c in members if c]
        rgb = [int(round(sum(ch) / len(fg))) for ch in zip(*fg)] if fg else [0, 0, 0]
        colors.append({"label-value": v, "rgba": rgb + [255 if fg else 0]})
        properties.append({"label-value": v, "name": "+".join(CLASS_NAMES[c] for c in members) or "none"})
    return colors, properties


def write_label_image(labels_group, name: str, *, voxel_size_um: float, colors: tp.Sequence[dict],
                      properties: tp.Sequence[dict], **pyramid: tp.Any) -> list[str]:
    """Make ``labels/<name>`` (its array ``0`` written) an NGFF label image: nearest-neighbour levels, the
    ``image-label`` colours and properties, its source image two groups up, and ``name`` listed in ``labels/``."""
    from ome_zarr.writer import write_label_metadata

    paths = write_multiscale_image(labels_group[name], name=name, voxel_size_um=voxel_size_um, how="nearest",
                                   **pyramid)
    write_label_metadata(labels_group, name, colors=list(colors), properties=list(properties), fmt=_ngff_format(),
                         source={"image": "../../"})
    return paths


def copy_volume(ref: VolumeRef, dst, *, budget_bytes: int = 64 << 20) -> tuple[float, float]:
    """Copy the volume ``ref`` into the array ``dst`` slab by slab (never the whole volume in memory);
    returns its (min, max) for a viewer's contrast window."""
    vmin, vmax = np.inf, -np.inf
    with open_volume(ref) as vol:
        if tuple(vol.shape) != tuple(dst.shape):
            raise DataError(ref.path, ref.dataset,
                            f"shape {tuple(vol.shape)} differs from the output's {tuple(dst.shape)}")
        depth = slab_depth(vol.shape, np.dtype(vol.dtype).itemsize, budget_bytes)
        chunk = dst.chunks[0]
        depth = depth - depth % chunk if depth >= chunk else depth  # whole chunks: no chunk written twice
        for sl in iter_slabs(vol.shape, depth):
            a = read_checked(vol, sl, ref=ref, field="image")
            dst[sl] = a
            vmin, vmax = min(vmin, float(a.min())), max(vmax, float(a.max()))
    return vmin, vmax


def grey_omero(vmin: float, vmax: float, name: str = "grey value") -> dict:
    """``omero`` rendering settings of a one-channel grey image, so napari opens it with its full range."""
    hi = vmax if vmax > vmin else vmin + 1
    return {"channels": [{"label": name, "color": "FFFFFF", "active": True,
                          "window": {"min": vmin, "max": hi, "start": vmin, "end": hi}}],
            "rdefs": {"model": "greyscale"}}


def class_omero() -> dict:
    """``omero`` rendering settings of the class probabilities: one channel per class, named and coloured."""
    return {"channels": [{"label": n, "color": "%02X%02X%02X" % tuple(c[:3]) if c[3] else "FFFFFF", "active": bool(i),
                          "window": {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}}
                         for i, (n, c) in enumerate(zip(CLASS_NAMES, CLASS_RGBA))],
            "rdefs": {"model": "color"}}
