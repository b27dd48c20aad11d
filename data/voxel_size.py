"""The voxel size a scan carries in its own metadata: HDF5 attributes, OME-Zarr scale, TIFF resolution tags.

A scan segmented by a model trained at another voxel size must be resampled first (paper, Data: all
scans at 5 µm), so a scan whose voxel size is unknown is refused rather than guessed.
"""

from __future__ import annotations

import json
import math
import typing as tp
from pathlib import Path

import h5py

from data.errors import DataError
from data.volume import VolumeRef

HDF5_ATTRS = ("voxel_size_um", "element_size_um", "voxel_size")  # ours, ilastik/Fiji's per-axis, a common one
UNIT_TO_UM = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "\\u00B5m": 1.0, "nanometer": 1e-3, "nm": 1e-3,
              "millimeter": 1e3, "mm": 1e3}


def _isotropic(values: tp.Sequence[float], ref: VolumeRef, where: str) -> float:
    vals = [float(v) for v in values]
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise DataError(ref.path, ref.dataset, f"{where}: voxel size {vals} is not positive")
    if max(vals) > min(vals) * 1.001:
        raise DataError(ref.path, ref.dataset, f"{where}: anisotropic voxels {vals} µm; resample to isotropic "
                                               "voxels first or give --voxel-size")
    return vals[0]


def _hdf5(ref: VolumeRef) -> tp.Optional[float]:
    with h5py.File(ref.path, "r") as f:
        for holder in (f.get(ref.dataset or "image"), f):
            if holder is None:
                continue
            for name in HDF5_ATTRS:
                if name in holder.attrs:
                    value = holder.attrs[name]
                    values = list(value) if hasattr(value, "__len__") and not isinstance(value, str) else [value]
                    return _isotropic(values, ref, f"attribute {name}")
    return None


def _zarr(ref: VolumeRef) -> tp.Optional[float]:
    for attrs_file in (ref.path / "zarr.json", ref.path / ".zattrs"):
        if not attrs_file.is_file():
            continue
        meta = json.loads(attrs_file.read_text())
        meta = meta.get("attributes", meta)
        multiscales = meta.get("ome", meta).get("multiscales") or []
        if not multiscales:
            continue
        ms = multiscales[0]
        scale = next((t["scale"] for t in ms["datasets"][0].get("coordinateTransformations", [])
                      if t.get("type") == "scale"), None)
        axes = [a for a in ms.get("axes", []) if isinstance(a, dict) and a.get("type") == "space"]
        if scale is None or not axes:
            return None
        units = {a.get("unit") for a in axes}
        if len(units) != 1 or next(iter(units)) not in UNIT_TO_UM:
            return None
        factor = UNIT_TO_UM[tp.cast(str, next(iter(units)))]
        return _isotropic([s * factor for s in scale[-len(axes):]], ref, "OME-Zarr scale")
    return None


def _tiff(ref: VolumeRef) -> tp.Optional[float]:
    import tifffile

    first = next(iter(sorted(p for p in Path(ref.path).iterdir() if p.suffix.lower() in (".tif", ".tiff"))), None)
    if first is None:
        return None
    with tifffile.TiffFile(first) as tif:
        page = tif.pages[0]
        ij = tif.imagej_metadata or {}
        unit = str(ij.get("unit", "")).replace("\\u00B5", "µ")
        tags = page.tags
        if "XResolution" not in tags or unit not in UNIT_TO_UM:
            return None
        num, den = tags["XResolution"].value
        if not num:
            return None
        xy = den / num * UNIT_TO_UM[unit]
        z = float(ij["spacing"]) * UNIT_TO_UM[unit] if "spacing" in ij else xy
        return _isotropic([z, xy], ref, f"{first.name} resolution tags")


def scan_voxel_size_um(ref: VolumeRef) -> tp.Optional[float]:
    """The isotropic voxel edge in µm a scan's own metadata gives, or None when it gives none."""
    if ref.is_zarr:
        return _zarr(ref)
    if ref.is_hdf5:
        return _hdf5(ref)
    return _tiff(ref)
