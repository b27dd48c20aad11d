"""Implant measures of the paper: degradation rate (Eq. 1), bone-to-implant contact (Eq. 2), BV/TV (Eq. 3).

``python -m analysis.measures LABELS.h5 --dataset labels --voxel-size-um S [--roi-um R]
[--initial-volume-mm3 V --initial-surface-mm2 A --days T] [--json] [--slab N]`` (:mod:`analysis.measures_cli`;
the measure intervals from plane disagreement are in :mod:`analysis.intervals`)

Label volumes are 3D (z, y, x) integer arrays, classes 0 background (incl. soft tissue), 1 bone,
2 degradation layer (DL), 3 residual material (RM); the implant is DL ∪ RM. A volume is read in
slabs of ``slab`` slices along axis 0 plus a halo wide enough for every neighbourhood and distance
operation, so the numbers do not depend on the slab size (up to float summation order) and a
volume larger than RAM can be measured.

How the quantities are measured, and why:

* Volumes: voxel counts × voxel volume (converges for any shape).
* Implant surface: weighted voxel-face count. Every face between an implant and a non-implant
  voxel counts ``1 / ‖n‖₁`` (``n`` the unit surface normal there), because a surface element with
  normal ``n`` produces ``|n_z| + |n_y| + |n_x| = ‖n‖₁`` faces per unit area. Plain face counting
  does not converge (the staircase: a sphere's face area tends to 1.5× its true area); with the
  weight it does. ``n`` is the gradient of the implant indicator smoothed by a Gaussian of
  σ = 1 voxel: across the face the plain difference of the smoothed values, along it the mean of
  the central differences of the two voxels. Measured errors (see ``docs/measures.md``): planes at
  any angle within 0.6 %, spheres within 1 % (σ fixed in voxels leaves this orientation floor);
  sharp edges (a cylinder's rims) are rounded over ~σ, an error that vanishes linearly with the
  voxel size.
* Contact: a face of the implant surface is in contact with bone when the voxel across it is bone
  (face adjacency, 6-connectivity, zero gap at the scan's resolution), and contributes the same
  weight as above. A face-wise definition keeps contact ⊂ surface, so BIC ≤ 100 % by construction,
  and the weight removes the orientation bias of counting faces (a 120° sector is a third of the
  lateral surface, not a direction-dependent share of the faces). Any wider tolerance would count
  soft tissue between bone and implant as contact and add a parameter the paper does not have.
* ROI of BV/TV: non-implant voxels within R of the implant: the Euclidean distance from the voxel
  centre to the nearest implant voxel centre is at most R (what scipy's distance_transform_edt
  gives; at a surface along the grid axes the ROI is then exactly R thick when R is a multiple of
  the voxel size, on oblique and curved surfaces ~0.3 voxel thinner, an error that vanishes with
  the voxel size). Computed exactly slab-wise: a 2D distance transform per slice and the minimum
  over the slices within R (squared distances are integers in voxel units, so slab-wise and
  whole-volume agree exactly). The degradation layer is part of the implant, hence not in the ROI.
* The volume border is not a surface: an implant cut by the field of view gets no surface (and
  no contact) on the cut, the smoothing replicates the border voxels, and the ROI ends at the border.
"""

from __future__ import annotations

import dataclasses
import math
import runpy
import typing as tp

import h5py
import numpy as np
from scipy import ndimage

from data.errors import DataError
from data.volume import NUM_CLASSES, TiffStack

BONE, DL, RM = 1, 2, 3
DAYS_PER_YEAR = 365.25
SIGMA_VOX = 1.0  # smoothing of the implant indicator for the normals: less makes the staircase show through
TRUNCATE = 4.0  # scipy's default; Gaussian kernel radius = 4 voxels
SURFACE_HALO = int(TRUNCATE * SIGMA_VOX + 0.5) + 2  # kernel radius + central difference + the face's far voxel

ArrayLike = tp.Any  # numpy array, h5py.Dataset, data.volume.TiffStack: anything 3D with .shape/.dtype and [a:b]


# ----------------------------------------------------------------------------------------------- equations


def degradation_rate(initial_volume_mm3: float, residual_volume_mm3: float, initial_surface_mm2: float,
                     days: float) -> float:
    """Eq. 1, degradation rate: DR = (v_i − v_r) / (a_i · t) in mm/year.

    v_i initial screw volume (mm³), v_r residual-material volume (mm³), a_i initial screw surface
    (mm²), t implantation time in years (t = days / 365.25)."""
    check_positive("initial_volume_mm3", initial_volume_mm3)
    check_positive("initial_surface_mm2", initial_surface_mm2)
    check_positive("days", days)
    return (initial_volume_mm3 - residual_volume_mm3) / (initial_surface_mm2 * (days / DAYS_PER_YEAR))


def bone_implant_contact(contact_surface_mm2: float, implant_surface_mm2: float) -> float:
    """Eq. 2, bone-to-implant contact: BIC = b / a · 100 %, b implant surface in contact with bone,
    a implant (DL ∪ RM) surface. NaN when there is no implant surface."""
    return math.nan if implant_surface_mm2 <= 0 else 100.0 * contact_surface_mm2 / implant_surface_mm2


def bone_volume_fraction(bone_volume_mm3: float, roi_volume_mm3: float) -> float:
    """Eq. 3, bone volume fraction: BV/TV = bone volume / ROI volume · 100 %, the ROI being all
    non-implant voxels within R of the implant (the degradation layer excluded). NaN for an empty ROI."""
    return math.nan if roi_volume_mm3 <= 0 else 100.0 * bone_volume_mm3 / roi_volume_mm3


# ----------------------------------------------------------------------------------------------- input checks


def check_positive(name: str, value: tp.Optional[float]) -> None:
    """Refuse a missing, non-finite or non-positive ``value`` of the option or argument ``name``."""
    if value is None or not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
        raise DataError(None, name, f"must be a positive number, got {value!r}")


def volume_source(labels: ArrayLike) -> tuple[tp.Optional[str], str]:
    """(file, field) naming the input in error messages."""
    if isinstance(labels, h5py.Dataset):
        return labels.file.filename, labels.name
    if isinstance(labels, TiffStack):
        return str(labels.folder), "labels"
    return None, "labels"


def _check_shape(labels: ArrayLike) -> tuple[int, int, int]:
    path, field = volume_source(labels)
    shape = tuple(int(s) for s in getattr(labels, "shape", ()))
    if len(shape) != 3:
        raise DataError(path, field, f"expected a 3D label volume (z, y, x), got shape {shape}")
    if min(shape) == 0:
        raise DataError(path, field, f"empty volume, shape {shape}")
    dtype = np.dtype(labels.dtype)
    if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        raise DataError(path, field, f"labels must be integers 0..{NUM_CLASSES - 1}, got dtype {dtype}")
    return shape  # type: ignore[return-value]


def _read(labels: ArrayLike, a: int, b: int) -> np.ndarray:
    """Slices [a, b) as uint8, refusing values outside 0..3 (a class map, not an image)."""
    path, field = volume_source(labels)
    try:
        arr = np.asarray(labels[a:b])
    except (OSError, RuntimeError, KeyError) as exc:
        raise DataError(path, field, f"cannot read slices {a}..{b - 1}, file truncated or corrupt ({exc})") from exc
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= NUM_CLASSES:
            raise DataError(path, field, f"label values must be in 0..{NUM_CLASSES - 1}, found {lo}..{hi} "
                                         f"in slices {a}..{b - 1}")
    return arr.astype(np.uint8, copy=False)


class _SlabReader:
    """Reads overlapping slice ranges in increasing order, each slice from storage once."""

    def __init__(self, labels: ArrayLike, nz: int):
        self.labels, self.nz = labels, nz
        self.lo, self.buf = 0, np.empty((0,) + tuple(labels.shape[1:]), np.uint8)

    def get(self, a: int, b: int) -> np.ndarray:
        a, b = max(0, a), min(self.nz, b)
        hi = self.lo + len(self.buf)
        if self.lo <= a <= hi <= b:
            new = _read(self.labels, hi, b) if hi < b else self.buf[:0]
            self.buf = np.concatenate([self.buf[a - self.lo:], new])
        else:
            self.buf = _read(self.labels, a, b)
        self.lo = a
        return self.buf

# ----------------------------------------------------------------------------------------------- per slab


def _bbox_yx(mask: np.ndarray, margin: int) -> tp.Optional[tuple[slice, slice]]:
    """(y, x) bounding box of ``mask`` (3D) grown by ``margin``, clipped to the array; None if empty."""
    out = []
    for axis in (1, 2):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in (0, 1, 2) if a != axis)))
        if hit.size == 0:
            return None
        out.append(slice(max(0, int(hit[0]) - margin), min(mask.shape[axis], int(hit[-1]) + 1 + margin)))
    return out[0], out[1]


def _face_weight(normal: list[np.ndarray]) -> np.ndarray:
    """1/‖n‖₁ of the unit normal (= ‖g‖₂/‖g‖₁ of any gradient g along it): area of one face of that orientation."""
    g = [c.astype(np.float64) for c in normal]
    l1 = np.abs(g[0]) + np.abs(g[1]) + np.abs(g[2])
    l2 = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)
    # a face whose smoothed gradient vanishes (symmetric thin structure) is an axis-aligned face
    return np.where(l1 > 0, l2 / np.where(l1 > 0, l1, 1.0), 1.0)


def _surface_sums(ext: np.ndarray, core: slice) -> tuple[float, float]:
    """(implant surface, contact surface) in voxel-face units for the faces owned by the core slices.

    ``ext``: labels of the core slices with SURFACE_HALO slices on both sides, edge-replicated
    beyond the volume (so the border has no faces); a face belongs to the voxel on its lower side."""
    imp = ext >= DL
    crop = _bbox_yx(imp, SURFACE_HALO)
    if crop is None:
        return 0.0, 0.0
    lab, imp = ext[:, crop[0], crop[1]], imp[:, crop[0], crop[1]]
    u = ndimage.gaussian_filter(imp.astype(np.float32), SIGMA_VOX, mode="nearest", truncate=TRUNCATE)
    grad = np.gradient(u)
    area = contact = 0.0
    for axis in range(3):
        p: list[slice] = [core, slice(None), slice(None)]
        q: list[slice] = [slice(core.start + 1, core.stop + 1), slice(None), slice(None)]
        if axis > 0:
            p[axis], q[axis] = slice(0, -1), slice(1, None)
            q[0] = core
        pi, qi = tuple(p), tuple(q)
        idx = np.nonzero(imp[pi] != imp[qi])
        if not idx[0].size:
            continue
        normal = [(grad[c][pi][idx] + grad[c][qi][idx]) / 2 for c in range(3)]
        normal[axis] = u[qi][idx] - u[pi][idx]  # across the face the plain difference is the sharpest estimate
        w = _face_weight(normal)
        other = np.where(imp[pi][idx], lab[qi][idx], lab[pi][idx])
        area += float(w.sum())
        contact += float(w[other == BONE].sum())
    return area, contact


def _roi_counts(ext: np.ndarray, core: slice, r2: float, hz: int) -> tuple[int, int]:
    """(ROI voxels, bone voxels in the ROI) of the core slices; ``ext`` holds up to ``hz`` real slices
    on each side. ROI: non-implant voxels whose squared centre distance to an implant voxel (voxel
    units) is ≤ r2."""
    imp = ext >= DL
    reach = int(math.floor(math.sqrt(r2)))
    crop = _bbox_yx(imp, reach + 1)
    if crop is None:
        return 0, 0
    lab, imp = ext[:, crop[0], crop[1]], imp[:, crop[0], crop[1]]
    d2 = np.full(imp.shape, np.inf, np.float32)
    for z in range(len(imp)):
        if imp[z].any():
            d = ndimage.distance_transform_edt(~imp[z])
            d2[z] = np.rint(d * d)  # exact integers: slab-wise and whole-volume compare identically
    best = d2[core].copy()
    for k in range(1, hz + 1):
        if k * k > r2:
            break
        for s in (-k, k):
            lo, hi = max(core.start, -s), min(core.stop, len(d2) - s)
            if lo < hi:
                np.minimum(best[lo - core.start:hi - core.start], d2[lo + s:hi + s] + np.float32(k * k),
                           out=best[lo - core.start:hi - core.start])
    roi = (best <= r2) & ~imp[core]
    return int(np.count_nonzero(roi)), int(np.count_nonzero(roi & (lab[core] == BONE)))


# ----------------------------------------------------------------------------------------------- whole volume


@dataclasses.dataclass
class _Totals:
    rm: int = 0
    dl: int = 0
    roi: int = 0
    roi_bone: int = 0
    surface: float = 0.0
    contact: float = 0.0


def _measure_voxels(labels: ArrayLike, r2: float, slab: int) -> _Totals:
    """Voxel counts and surface sums (voxel units) over the whole volume, slab by slab."""
    nz = _check_shape(labels)[0]
    hz = int(math.floor(math.sqrt(r2))) + 1
    halo = max(hz, SURFACE_HALO)
    reader, tot = _SlabReader(labels, nz), _Totals()
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        ext = reader.get(z0 - halo, z1 + halo)
        e0 = max(0, z0 - halo)
        core = ext[z0 - e0:z1 - e0]
        tot.rm += int(np.count_nonzero(core == RM))  # not bincount: it would copy the slab as int64
        tot.dl += int(np.count_nonzero(core == DL))
        # the surface works on an edge-replicated halo: the smoothing then treats the border like scipy's mode="nearest"
        s0, s1 = z0 - SURFACE_HALO, z1 + SURFACE_HALO
        surf = ext[max(0, s0) - e0:min(nz, s1) - e0]
        surf = np.pad(surf, ((max(0, -s0), max(0, s1 - nz)), (0, 0), (0, 0)), mode="edge")
        a, c = _surface_sums(surf, slice(SURFACE_HALO, SURFACE_HALO + z1 - z0))
        tot.surface += a
        tot.contact += c
        r0 = max(0, z0 - hz)
        roi, bone = _roi_counts(ext[r0 - e0:min(nz, z1 + hz) - e0], slice(z0 - r0, z1 - r0), r2, hz)
        tot.roi += roi
        tot.roi_bone += bone
    return tot


def implant_measures(labels, *, voxel_size_um: float, roi_um: float, initial_volume_mm3: float | None = None,
                     initial_surface_mm2: float | None = None, days: float | None = None,
                     slab: int = 64) -> dict[str, float]:
    """DR (Eq. 1), BIC (Eq. 2) and BV/TV (Eq. 3) of one label volume, with the volumes and surfaces behind them.

    labels: a 3D array-like (numpy array, h5py.Dataset, TIFF stack) read slab-wise, ``slab``
    slices at a time plus a halo of max(6, ⌊R/voxel⌋ + 1) slices on each side; memory grows
    with slab × slice area, not with the volume. Classes 0 background, 1 bone, 2 DL, 3 RM.
    voxel_size_um: isotropic voxel edge; roi_um: R, the BV/TV region's reach from the implant
    (voxel-centre Euclidean distance). DR is NaN unless initial_volume_mm3, initial_surface_mm2 and days are all given.
    BIC is NaN without implant surface, BV/TV NaN with an empty ROI. Bad input raises
    data.errors.DataError (a ValueError) naming the input and the field.

    Surfaces are normal-weighted voxel-face counts, contact the faces shared with bone voxels,
    the ROI a Euclidean distance threshold; see the module docstring for why.
    """
    check_positive("voxel_size_um", voxel_size_um)
    check_positive("roi_um", roi_um)
    if not isinstance(slab, (int, np.integer)) or isinstance(slab, bool) or slab < 1:
        raise DataError(None, "slab", f"must be a positive integer, got {slab!r}")
    for name, value in (("initial_volume_mm3", initial_volume_mm3), ("initial_surface_mm2", initial_surface_mm2),
                        ("days", days)):
        if value is not None:
            check_positive(name, value)
    r_vox = roi_um / voxel_size_um
    tot = _measure_voxels(labels, r_vox * r_vox, int(slab))
    mm = voxel_size_um * 1e-3
    voxel_mm3, face_mm2 = mm ** 3, mm ** 2
    out = {
        "residual_volume_mm3": tot.rm * voxel_mm3,
        "degradation_layer_volume_mm3": tot.dl * voxel_mm3,
        "implant_volume_mm3": (tot.rm + tot.dl) * voxel_mm3,
        "implant_surface_mm2": tot.surface * face_mm2,
        "contact_surface_mm2": tot.contact * face_mm2,
        "bone_volume_mm3": tot.roi_bone * voxel_mm3,
        "roi_volume_mm3": tot.roi * voxel_mm3,
    }
    given = None not in (initial_volume_mm3, initial_surface_mm2, days)
    out["dr_mm_per_year"] = (degradation_rate(initial_volume_mm3, out["residual_volume_mm3"], initial_surface_mm2, days)
                             if given else math.nan)
    out["bic_percent"] = bone_implant_contact(out["contact_surface_mm2"], out["implant_surface_mm2"])
    out["bv_tv_percent"] = bone_volume_fraction(out["bone_volume_mm3"], out["roi_volume_mm3"])
    out.update(voxel_size_um=float(voxel_size_um), roi_um=float(roi_um),
               initial_volume_mm3=math.nan if initial_volume_mm3 is None else float(initial_volume_mm3),
               initial_surface_mm2=math.nan if initial_surface_mm2 is None else float(initial_surface_mm2),
               days=math.nan if days is None else float(days))
    return out


if __name__ == "__main__":  # `python -m analysis.measures`: run the command line, which imports this module, not vice versa
    runpy.run_module("analysis.measures_cli", run_name="__main__")
