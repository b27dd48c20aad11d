"""Synthetic SRμCT explants: a degrading threaded Mg-xGd screw in bone, with exact ground truth.

The 17 real scans of Baltruschat et al. 2021 (Sci. Rep. 11:24237, "Data") are available on request
only, so this module builds look-alikes that are hard to segment in the same ways the paper lists:
the degradation layer (DL) is fragmented and cracked and its grey values range from the residual
material's (RM) down towards bone's; phase-contrast edge fringes, ring artefacts, noise and low
contrast (two beamline styles, P05 and I13-2, 16- and 12-bit).

Each sample has an exact high-quality label (``label_hq``) and a label imitating the paper's
semi-automatic workflow (``label_wf``: most cracks missed, small gaps closed, bright DL taken for RM).
As in the paper, the 14 training samples carry WF labels and the 3 test samples HQ labels.

Axis 0 is the screw (and tomographic rotation) axis. All geometry is defined relative to the grid
size, so 64³, 128³ and 512³ volumes show the same scene at different resolutions.

    python -m data.synth --out DIR [--n-train 14] [--n-test 3] [--size 128 | --shape Z Y X]
                         [--seed 0] [--voxel-size-um 5.0] [--degradation-scale 1.0] [--overwrite]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import typing as tp
from pathlib import Path

import numpy as np
from scipy import ndimage

from data.errors import DataError
from data.manifest import MANIFEST_NAMES, Sample, write_manifest
from data.volume import VolumeRef, write_h5_atomic

GENERATOR_VERSION = "1"
BACKGROUND, BONE, DL, RM = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class BeamlineStyle:
    """Imaging model of one beamline; attenuation values are in arbitrary units (soft tissue ≈ 0.2)."""

    name: str
    bits: int            # stored bit depth (paper: 12- or 16-bit)
    offset: float        # grey value of zero attenuation, in counts
    gain: float          # counts per attenuation unit
    blur_sigma: float    # detector / reconstruction blur, voxels
    fringe_k: float      # phase-contrast edge enhancement strength
    fringe_sigma: float  # width of the edge fringes, voxels
    ring_amp: float      # ring artefact amplitude, attenuation units
    noise: float         # noise std, attenuation units
    bone: float          # attenuation of bone
    rm_contrast: float   # scales (RM - bone); lower = less contrast at higher photon energy


BEAMLINES: dict[str, BeamlineStyle] = {
    # P05 (PETRA III): sharper, less noisy, 16-bit.
    "P05": BeamlineStyle("P05", 16, 6000.0, 60000.0, 0.7, 0.45, 0.8, 0.035, 0.030, 0.46, 1.0),
    # I13-2 (Diamond): blurrier, stronger fringes and rings, noisier, lower contrast, 12-bit.
    "I13": BeamlineStyle("I13", 12, 700.0, 3400.0, 0.95, 0.9, 1.0, 0.06, 0.055, 0.44, 0.8),
}

# Residual material attenuation per alloy (Gd absorbs strongly, so Mg-10Gd is brighter).
ALLOYS: dict[str, float] = {"Mg-5Gd": 0.74, "Mg-10Gd": 0.88}

# Mean degradation depth in units of the screw's major radius after 28/56/84 days (interpolated).
DEGRADATION_BY_DAYS = ((0.0, 0.0), (28.0, 0.08), (56.0, 0.12), (84.0, 0.16), (365.0, 0.4))
# Cortical bone plate across the screw near its head, as fractions of the volume's axis-0 length.
CORTEX_Z = (0.60, 0.80)


# ----------------------------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class ScrewGeometry:
    """The initial (undegraded) screw in its own frame, in voxel units.

    The surface is r(θ, z) for z in [z_bottom, z_top]: a core cylinder with a helical trapezoidal
    thread, cut by a cone at the tip (blunt end of radius ``tip_radius``) and flat at the top.
    """

    z_bottom: float
    z_top: float
    r_core: float
    thread_depth: float
    pitch: float
    thread_phase: float  # in turns
    tip_length: float
    tip_radius: float

    @property
    def r_major(self) -> float:
        return self.r_core + self.thread_depth

    @staticmethod
    def _profile(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Trapezoidal thread profile P(u) in [0, 1] over one pitch, and dP/du."""
        u = u - np.floor(u)
        tri = 1.0 - np.abs(2.0 * u - 1.0)
        p = (tri - 0.15) / 0.6  # flat root below 0.15, flat crest above 0.75
        ramp = (p > 0) & (p < 1)
        dp = np.where(ramp, np.where(u < 0.5, 2.0, -2.0) / 0.6, 0.0)
        return np.clip(p, 0.0, 1.0), dp

    def radius(self, theta: np.ndarray, z: np.ndarray, *, with_grad: bool = False):
        """r(θ, z); with ``with_grad`` also ∂r/∂θ and ∂r/∂z (exact, piecewise)."""
        u = (z - self.z_bottom) / self.pitch - theta / (2.0 * np.pi) + self.thread_phase
        prof, dprof = self._profile(u)
        r_thread = self.r_core + self.thread_depth * prof
        slope = (self.r_major - self.tip_radius) / self.tip_length
        r_cone = self.tip_radius + (z - self.z_bottom) * slope
        cone = r_cone < r_thread
        r = np.where(cone, r_cone, r_thread)
        if not with_grad:
            return r
        dr_dz = np.where(cone, slope, self.thread_depth * dprof / self.pitch)
        dr_dt = np.where(cone, 0.0, -self.thread_depth * dprof / (2.0 * np.pi))
        return r, dr_dt, dr_dz

    def volume_and_surface(self, n_theta: int = 256, n_z: int = 8192) -> tuple[float, float]:
        """Analytic volume and surface area in voxel units (midpoint rule on a fine (θ, z) grid).

        V = ∫∫ ½ r² dθ dz;  A = ∫∫ sqrt(r² (1 + r_z²) + r_θ²) dθ dz + top and bottom caps ∫ ½ r² dθ.
        """
        dt = 2.0 * np.pi / n_theta
        dz = (self.z_top - self.z_bottom) / n_z
        theta = (np.arange(n_theta) + 0.5) * dt
        z = self.z_bottom + (np.arange(n_z) + 0.5) * dz
        r, r_t, r_z = self.radius(theta[:, None], z[None, :], with_grad=True)
        volume = float(np.sum(0.5 * r * r) * dt * dz)
        lateral = float(np.sum(np.sqrt(r * r * (1.0 + r_z * r_z) + r_t * r_t)) * dt * dz)
        caps = sum(float(np.sum(0.5 * self.radius(theta, np.full_like(theta, zc)) ** 2) * dt)
                   for zc in (self.z_bottom, self.z_top))
        return volume, lateral + caps


# ------------------------------------------------------------------------------------------ result
@dataclasses.dataclass
class SyntheticExplant:
    """One synthetic sample, in memory. Volumes are (Z, Y, X), axis 0 the screw/rotation axis."""

    image: np.ndarray          # uint16 raw grey values (12-bit data for I13)
    label_hq: np.ndarray       # uint8 exact labels: 0 background, 1 bone, 2 DL, 3 RM
    label_wf: np.ndarray       # uint8 labels imitating the semi-automatic workflow
    initial_mask: np.ndarray   # bool, the rasterised initial (undegraded) screw
    crack_mask: np.ndarray     # bool, crack / interface-gap voxels inside the DL (background in HQ)
    initial_volume_mm3: float  # analytic, of the initial screw
    initial_surface_mm2: float  # analytic, of the initial screw
    initial_volume_vox: float
    initial_surface_vox: float
    beamline: str
    alloy: str
    implantation_days: float
    voxel_size_um: float
    bits: int
    geometry: ScrewGeometry
    tilt_deg: float
    centre: tuple[float, float, float]

    def attrs(self) -> dict[str, tp.Any]:
        return {
            "beamline": self.beamline, "alloy": self.alloy, "implantation_days": self.implantation_days,
            "voxel_size_um": self.voxel_size_um, "bit_depth": self.bits, "tilt_deg": self.tilt_deg,
            "initial_volume_mm3": self.initial_volume_mm3, "initial_surface_mm2": self.initial_surface_mm2,
            "screw_axis_centre_zyx": np.asarray(self.centre), "generator": f"data.synth v{GENERATOR_VERSION}",
        }


# ----------------------------------------------------------------------------------- random fields
def _upsample(low: np.ndarray, shape: tp.Sequence[int], spacing: float, order: int) -> np.ndarray:
    """Separable Catmull-Rom (order 3) or linear (order 1) upsampling of a low-res grid, float32."""
    out = low.astype(np.float32)
    for axis, n in enumerate(shape):
        t = np.arange(n, dtype=np.float64) / spacing + 1.0
        i = np.floor(t).astype(np.intp)
        f = (t - i).astype(np.float32)
        bshape = [1] * out.ndim
        bshape[axis] = n
        if order == 1:
            taps = ((i, 1.0 - f), (i + 1, f))
        else:  # Catmull-Rom: C1-smooth and interpolating, 4 taps
            f2, f3 = f * f, f * f * f
            taps = ((i - 1, -0.5 * f3 + f2 - 0.5 * f), (i, 1.5 * f3 - 2.5 * f2 + 1.0),
                    (i + 1, -1.5 * f3 + 2.0 * f2 + 0.5 * f), (i + 2, 0.5 * f3 - 0.5 * f2))
        acc = None
        for idx, w in taps:
            term = np.take(out, idx, axis=axis) * w.reshape(bshape)
            acc = term if acc is None else acc + term
        out = acc
    return out


def smooth_field(rng: np.random.Generator, shape: tp.Sequence[int], scale: float, order: int = 1) -> np.ndarray:
    """Zero-mean, roughly unit-variance random field with features ``scale`` voxels across.

    Drawn on a coarse grid and upsampled, which is far cheaper than filtering full-res noise.
    """
    spacing = max(scale / 2.5, 0.75)
    low_shape = tuple(int(math.floor((n - 1) / spacing)) + 5 for n in shape)
    low = ndimage.gaussian_filter(rng.standard_normal(low_shape, dtype=np.float32), 1.0, mode="wrap")
    low = (low - low.mean()) / max(float(low.std()), 1e-6)
    return _upsample(low, shape, spacing, order)


def _ball(radius: float) -> np.ndarray:
    r = int(math.ceil(radius))
    g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (g ** 2).sum(0) <= radius * radius + 1e-6


def _rotation(tilt: float, azimuth: float) -> np.ndarray:
    """Rotation by ``tilt`` about the horizontal axis (0, cos a, sin a) in (z, y, x) coordinates."""
    n = np.array([0.0, math.cos(azimuth), math.sin(azimuth)])
    k = np.array([[0, -n[2], n[1]], [n[2], 0, -n[0]], [-n[1], n[0], 0]])
    return np.eye(3) + math.sin(tilt) * k + (1 - math.cos(tilt)) * (k @ k)


def degradation_fraction(days: float) -> float:
    """Mean degradation depth / major screw radius after ``days`` (more degradation for longer times)."""
    d, f = zip(*DEGRADATION_BY_DAYS)
    return float(np.interp(days, d, f))


# -------------------------------------------------------------------------------------- generator
def generate_explant(shape: tp.Union[int, tp.Sequence[int]] = 128, seed: tp.Union[int, tp.Sequence[int]] = 0, *,
                     beamline: str = "P05", alloy: str = "Mg-5Gd", days: float = 56.0,
                     voxel_size_um: float = 5.0, degradation_scale: float = 1.0) -> SyntheticExplant:
    """Build one synthetic explant in memory; same (shape, seed, options) gives identical arrays.

    ``seed`` may be an int or a sequence of ints, e.g. (dataset seed, sample index).
    ``degradation_scale`` multiplies the degradation depth (and so the degradation layer's thickness):
    at small grids (64³–128³) the default layer is 1–4 voxels thick; a scale of 2 keeps it learnable.
    """
    shape = _check_shape(shape)
    if beamline not in BEAMLINES:
        raise ValueError(f"beamline must be one of {sorted(BEAMLINES)}, got {beamline!r}")
    if alloy not in ALLOYS:
        raise ValueError(f"alloy must be one of {sorted(ALLOYS)}, got {alloy!r}")
    if not (days > 0 and voxel_size_um > 0):
        raise ValueError("days and voxel_size_um must be positive")
    if not 0 < degradation_scale <= 3:
        raise ValueError(f"degradation_scale must be in (0, 3], got {degradation_scale}")
    style, rng = BEAMLINES[beamline], np.random.default_rng(seed)
    Z, Y, X = shape
    L = float(min(Y, X))  # lateral length scale: all lateral geometry is a fraction of it
    s = L / 128.0         # for the few sizes that are naturally voxel-scale at 128³

    # --- the initial screw: core + helical thread, conical tip, flat top (proportions jittered)
    r_major = L * rng.uniform(0.19, 0.21)
    depth_frac = rng.uniform(0.22, 0.27)
    length = Z * rng.uniform(0.70, 0.74)
    geom = ScrewGeometry(
        z_bottom=-length / 2, z_top=length / 2,
        r_core=r_major * (1 - depth_frac), thread_depth=r_major * depth_frac,
        pitch=r_major * depth_frac * rng.uniform(1.9, 2.2),  # ~60° flanks, like a metric thread
        thread_phase=rng.uniform(0, 1), tip_length=length * rng.uniform(0.13, 0.17),
        tip_radius=r_major * rng.uniform(0.25, 0.35))
    tilt = math.radians(rng.uniform(0.0, 8.0))
    rot = _rotation(tilt, rng.uniform(0, 2 * math.pi))
    centre = np.array([(Z - 1) / 2 + rng.uniform(-0.02, 0.02) * Z,
                       (Y - 1) / 2 + rng.uniform(-0.04, 0.04) * L,
                       (X - 1) / 2 + rng.uniform(-0.04, 0.04) * L])
    vol_vox, area_vox = geom.volume_and_surface()

    # --- work on the screw's bounding box (plus a margin for DL swelling and bone contact/gaps)
    corners = np.array([[zc, yc, xc] for zc in (geom.z_bottom, geom.z_top)
                        for yc in (-r_major, r_major) for xc in (-r_major, r_major)])
    ext = corners @ rot.T + centre
    margin = 0.12 * L + 3
    lo = np.maximum(np.floor(ext.min(0) - margin), 0).astype(int)
    hi = np.minimum(np.ceil(ext.max(0) + margin) + 1, shape).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    bshape = tuple(int(b - a) for a, b in zip(lo, hi))
    gz, gy, gx = (np.arange(a, b, dtype=np.float32) - np.float32(c) for a, b, c in zip(lo, hi, centre))
    gz, gy, gx = gz[:, None, None], gy[None, :, None], gx[None, None, :]
    rt = rot.astype(np.float32)  # local = R^T (p - c); columns of R are the local axes
    zl = gz * rt[0, 0] + gy * rt[1, 0] + gx * rt[2, 0]
    yl = gz * rt[0, 1] + gy * rt[1, 1] + gx * rt[2, 1]
    xl = gz * rt[0, 2] + gy * rt[1, 2] + gx * rt[2, 2]
    rho = np.hypot(yl, xl)
    theta = np.arctan2(xl, yl)
    del yl, xl
    init = (zl >= geom.z_bottom) & (zl <= geom.z_top) & (rho <= geom.radius(theta, zl))
    del theta, rho

    d_in = ndimage.distance_transform_edt(init).astype(np.float32)
    sd = np.where(init, 0.5 - d_in, ndimage.distance_transform_edt(~init).astype(np.float32) - 0.5)

    # --- residual material: initial screw eroded by a smooth, pitted degradation depth
    deg = degradation_fraction(days) * (1.1 if alloy == "Mg-10Gd" else 1.0) * rng.uniform(0.85, 1.15)
    deg *= degradation_scale
    mean_depth = max(deg * r_major, 1.0)
    depth = 1.0 + 0.4 * smooth_field(rng, bshape, 0.30 * L) + 0.15 * smooth_field(rng, bshape, 0.08 * L)
    depth = mean_depth * np.clip(depth, 0.25, None)  # a rough corrosion front
    pits = np.clip((smooth_field(rng, bshape, 0.07 * L, order=3) - 1.6) / 0.6, 0.0, 1.0)
    depth += pits * (0.12 * r_major + 1.0)  # pits: localised, deeper attack
    rm = init & (d_in > depth)

    # --- degradation layer: from RM to about the original surface (swelling a little beyond it)
    swell = depth * np.clip(0.1 + 0.3 * smooth_field(rng, bshape, 0.25 * L), -0.4, 0.6)
    dl = (sd <= swell) & ~rm
    missing = smooth_field(rng, bshape, 0.10 * L, order=3) > 1.25  # fragments that fell off
    dl &= ~missing
    g = smooth_field(rng, bshape, 0.09 * L, order=3)  # cracks: thin sheets around g = 0
    grad = np.sqrt(sum(np.square(np.gradient(g, axis=a)) for a in range(3)))
    crack = dl & (np.abs(g) < max(0.5, 0.5 * s) * grad) & (smooth_field(rng, bshape, 0.2 * L) > -0.5)
    del g, grad
    touching_rm = ndimage.binary_dilation(rm) & dl  # DL detaching from the RM: thin interface gap
    crack |= touching_rm & (smooth_field(rng, bshape, 0.15 * L) > 0.6)
    dl &= ~crack
    dl_tone = 0.5 + 0.25 * smooth_field(rng, bshape, 0.12 * L) + 0.06 * smooth_field(rng, bshape, 0.03 * L + 1)
    np.clip(dl_tone, 0.1, 1.1, out=dl_tone)  # grey of the DL: 0 = bone's, 1 = RM's

    # --- bone: trabecular plates and rods, a porous cortical plate, contact and gaps at the implant
    bone = _trabecular_bone(rng, shape, L, Z)
    contact = smooth_field(rng, bshape, 0.16 * L)
    gap_w = 0.035 * L * np.clip(1 + 0.5 * smooth_field(rng, bshape, 0.2 * L), 0.3, None) + 1.0
    outside = sd > swell
    bb = bone[box]
    bb &= outside
    bb &= ~((contact < -0.5) & (sd <= swell + gap_w))  # soft-tissue gap: no bone next to the implant
    under_top = (np.arange(lo[0], hi[0]) < CORTEX_Z[1] * Z)[:, None, None]  # no bone in the tissue above
    bb |= (contact > 0.3) & outside & (sd <= swell + 0.02 * L + 1.0) & under_top  # osseointegrated bone
    # hydrogen gas pockets from the corrosion: dark voids in the soft tissue next to the implant
    bubbles = np.zeros(bshape, bool)
    for _ in range(int(rng.integers(0, 4))):
        cand = np.flatnonzero(((sd > swell + 2).ravel()) & (sd.ravel() < 0.06 * L + 3))
        if cand.size == 0:
            break
        c = np.unravel_index(cand[rng.integers(cand.size)], bshape)
        rad = L * rng.uniform(0.015, 0.04) + 1.0
        sl = tuple(slice(max(int(ci - rad - 1), 0), min(int(ci + rad + 2), n)) for ci, n in zip(c, bshape))
        sub = np.ogrid[sl]
        sphere = sum((o - ci) ** 2 for o, ci in zip(sub, c)) <= rad * rad
        bubbles[sl] |= sphere & ~init[sl]
    bb &= ~bubbles

    # --- exact labels
    label_hq = np.zeros(shape, np.uint8)
    label_hq[bone] = BONE
    lb = label_hq[box]
    lb[dl] = DL
    lb[rm] = RM

    # --- workflow-like labels: cracks missed and small gaps closed; bright DL thresholded as RM
    label_wf = label_hq.copy()
    wb = label_wf[box]
    rc = max(1.0, 1.5 * s)
    closed = ndimage.binary_closing(lb >= DL, structure=_ball(rc))
    wb[(closed | crack) & (lb == BACKGROUND)] = DL
    wb[(lb == DL) & (dl_tone > 0.92)] = RM

    # --- attenuation phantom
    mu_bg = 0.20
    mu_rm = style.bone + (ALLOYS[alloy] - style.bone) * style.rm_contrast
    mu = (mu_bg * (1 + 0.07 * smooth_field(rng, shape, 0.15 * L))).astype(np.float32)
    mu += mu_bg * 0.03 * smooth_field(rng, shape, 0.025 * L + 1)  # fine soft-tissue texture
    mineral = style.bone * (1 + 0.05 * smooth_field(rng, shape, 0.1 * L))
    mu[bone] = mineral[bone]
    del mineral
    mb = mu[box]
    mb[bubbles] = 0.03
    mb[crack] = mu_bg * 0.95
    mb[dl] = (style.bone + (mu_rm - style.bone) * dl_tone)[dl]
    speck = ndimage.gaussian_filter(rng.standard_normal(bshape, dtype=np.float32), 0.7 * s + 0.3)
    speck_frac = 0.015 if alloy == "Mg-10Gd" else 0.007  # Gd-rich precipitates in the Mg matrix
    specks = rm & (speck > np.quantile(speck[::2, ::2, ::2], 1 - speck_frac))
    mb[rm] = mu_rm
    mb[specks] = mu_rm + 0.15
    del speck, specks, sd, d_in, depth, swell, dl_tone, contact, gap_w

    # --- imaging: blur, phase-contrast fringes, rings about the rotation axis, noise, quantisation
    img = ndimage.gaussian_filter(mu, style.blur_sigma)
    img -= style.fringe_k * ndimage.gaussian_laplace(mu, style.fringe_sigma)
    del mu
    img += _rings(rng, (Y, X), L, style.ring_amp)[None]
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.6)
    noise *= np.float32(style.noise / max(float(noise.std()), 1e-6))
    img += noise
    del noise
    maxval = float(2 ** style.bits - 1)
    counts = np.clip(np.rint(style.offset + style.gain * img), 0, maxval).astype(np.uint16)

    vox_mm = voxel_size_um * 1e-3
    initial = np.zeros(shape, bool)
    initial[box] = init
    crack_full = np.zeros(shape, bool)
    crack_full[box] = crack
    return SyntheticExplant(
        image=counts, label_hq=label_hq, label_wf=label_wf, initial_mask=initial, crack_mask=crack_full,
        initial_volume_mm3=vol_vox * vox_mm ** 3, initial_surface_mm2=area_vox * vox_mm ** 2,
        initial_volume_vox=vol_vox, initial_surface_vox=area_vox, beamline=beamline, alloy=alloy,
        implantation_days=float(days), voxel_size_um=float(voxel_size_um), bits=style.bits, geometry=geom,
        tilt_deg=math.degrees(tilt), centre=tuple(float(c) for c in centre))


def _trabecular_bone(rng: np.random.Generator, shape: tuple[int, int, int], L: float, Z: int) -> np.ndarray:
    """Bone mask: plates (band around a level set) and rods (two bands crossing) below a porous cortex."""
    spacing = 0.14 * L  # trabecular spacing
    thick = 0.2 * np.clip(1 + 0.35 * smooth_field(rng, shape, 0.3 * L), 0.5, None)  # trabecular thickness varies
    plates = np.abs(smooth_field(rng, shape, spacing, order=3)) < thick
    rods = (np.abs(smooth_field(rng, shape, spacing, order=3)) < 1.7 * thick) & \
           (np.abs(smooth_field(rng, shape, spacing, order=3)) < 1.7 * thick)
    del thick
    density = smooth_field(rng, shape, 0.35 * L)
    zz = np.arange(shape[0], dtype=np.float32)[:, None, None] / Z
    bone = (plates | rods) & (density > -0.4 + 1.2 * np.clip(0.6 - zz, 0, 1))  # sparser far from cortex
    # cortical plate across the screw near its head, with wavy faces and vascular pores
    wave = smooth_field(rng, (1,) + shape[1:], 0.4 * L)[0] * 0.025
    z0, z1 = CORTEX_Z[0] + wave, CORTEX_Z[1] + 0.6 * wave
    cortex = (zz >= z0[None]) & (zz <= z1[None])
    pores = smooth_field(rng, shape, 0.035 * L + 1.5, order=3) > 1.9
    bone = np.where(zz > z1[None], False, bone)  # soft tissue above the bone
    return (bone | cortex) & ~pores


def _rings(rng: np.random.Generator, yx: tuple[int, int], L: float, amp: float) -> np.ndarray:
    """Concentric rings about the rotation axis (volume centre), identical in every axial slice."""
    y, x = np.ogrid[:yx[0], :yx[1]]
    r = np.hypot(y - (yx[0] - 1) / 2, x - (yx[1] - 1) / 2).astype(np.float32)
    n_r = int(r.max()) + 3
    profile = 0.25 * rng.standard_normal(n_r)  # faint ring on every radius (pixel gain noise)
    for _ in range(int(rng.integers(6, 14))):  # a few strong rings (defective detector pixels)
        profile[int(rng.integers(1, n_r - 1))] += rng.normal(0, 2.5)
    profile = ndimage.gaussian_filter1d(profile, 0.6)
    return (amp * np.interp(r, np.arange(n_r), profile)).astype(np.float32)


def _check_shape(shape: tp.Union[int, tp.Sequence[int]]) -> tuple[int, int, int]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),) * 3
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 32:
        raise ValueError(f"shape must be 3 sizes of at least 32 voxels, got {shape}")
    return shape


# ---------------------------------------------------------------------------------------- dataset
# (alloy, beamline) cycle: every group of 4 consecutive training samples holds all four combinations,
# so a 4-fold cross-validation can be balanced by alloy and beamline.
_COMBOS = (("Mg-5Gd", "P05"), ("Mg-10Gd", "I13"), ("Mg-10Gd", "P05"), ("Mg-5Gd", "I13"))
_DAYS = (28.0, 56.0, 84.0)


def sample_plan(n_train: int = 14, n_test: int = 3) -> list[dict]:
    """Sample metadata: training samples first, then test samples (each a different combination)."""
    plan = []
    for i in range(n_train + n_test):
        test = i >= n_train
        j = i - n_train if test else i
        alloy, beamline = _COMBOS[(j + 1) % 4 if test else j % 4]
        days = _DAYS[(j + j // 4) % 3] if not test else _DAYS[(j + 1) % 3]
        plan.append(dict(index=i, split="test" if test else "train", alloy=alloy, beamline=beamline, days=days,
                         label_quality="HQ" if test else "WF"))
    return plan


def _timed_explant(args: tuple) -> tuple[SyntheticExplant, float]:
    shape, seed, p, options = args
    t0 = time.perf_counter()
    ex = generate_explant(shape, seed, beamline=p["beamline"], alloy=p["alloy"], days=p["days"], **options)
    return ex, time.perf_counter() - t0


def _explants(plan: list[dict], shape: tuple[int, int, int], seed: int, options: dict,
              workers: tp.Optional[int]) -> tp.Iterator[tuple[SyntheticExplant, float]]:
    """(explant, seconds) of every planned sample, in plan order; in worker processes when it pays (numpy and
    scipy.ndimage hold the GIL for much of a sample: threads do not help)."""
    jobs = [(shape, (seed, p["index"]), p, options) for p in plan]
    if workers is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        # Not for tiny samples (process start-up costs more) nor huge ones (finished samples wait in memory).
        workers = cores if len(jobs) >= 4 and 48 ** 3 <= math.prod(shape) <= 256 ** 3 else 1
    workers = max(1, min(int(workers), len(jobs)))
    if workers == 1:
        yield from map(_timed_explant, jobs)
        return
    import concurrent.futures as cf
    import multiprocessing

    # spawn: the caller may hold TensorFlow/MLflow threads, after which fork is unsafe
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_timed_explant, jobs)


def write_dataset(out: tp.Union[str, Path], *, n_train: int = 14, n_test: int = 3,
                  shape: tp.Union[int, tp.Sequence[int]] = 128, seed: int = 0, voxel_size_um: float = 5.0,
                  degradation_scale: float = 1.0, overwrite: bool = False, log: tp.Optional[tp.Callable[[str], None]] = None,
                  workers: tp.Optional[int] = None) -> list[Sample]:
    """Generate a dataset folder: one HDF5 file per sample and ``manifest.yaml`` (written last).

    ``workers`` processes generate the samples (default: the cores, for 4+ samples of 48³ or more); each
    sample has its own seed, so the files are the same for any number of workers.
    """
    out = Path(out)
    shape = _check_shape(shape)
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise DataError(out, None, "need at least one sample (n_train, n_test >= 0)")
    if out.exists() and not out.is_dir():
        raise DataError(out, None, "output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(out, None, "output folder is not empty; pass --overwrite to replace its samples")
        for name in MANIFEST_NAMES:  # no stale manifest may point at a half-replaced dataset
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    width = max(2, len(str(n_train + n_test)))
    samples: list[Sample] = []
    written: list[Path] = []
    plan = sample_plan(n_train, n_test)
    options = {"voxel_size_um": voxel_size_um, "degradation_scale": degradation_scale}
    try:
        for p, (ex, seconds) in zip(plan, _explants(plan, shape, seed, options, workers)):
            sid = f"synth{p['index'] + 1:0{width}d}"
            label = ex.label_hq if p["label_quality"] == "HQ" else ex.label_wf
            path = root / f"{sid}.h5"
            arrays = {"image": ex.image, "label": label, "label_hq": ex.label_hq, "label_wf": ex.label_wf}
            attrs = {**ex.attrs(), "seed": seed, "sample_index": p["index"], "id": sid, "split": p["split"],
                     "label_quality": p["label_quality"]}
            write_h5_atomic(path, arrays, attrs=attrs)
            samples.append(Sample(
                id=sid, image=VolumeRef(path, "/image"), label=VolumeRef(path, "/label"),
                wf_label=VolumeRef(path, "/label_wf") if p["split"] == "test" else None,
                voxel_size_um=float(voxel_size_um), alloy=p["alloy"], beamline=p["beamline"],
                implantation_days=p["days"], label_quality=p["label_quality"], split=p["split"],
                initial_volume_mm3=float(f"{ex.initial_volume_mm3:.10g}"),
                initial_surface_mm2=float(f"{ex.initial_surface_mm2:.10g}")))
            if log:
                log(f"{sid}: {p['split']} {p['alloy']} {p['beamline']} {p['days']:g} d  {seconds:.2f} s")
            written.append(path)
        write_manifest(root, samples, header=f"# synthetic explants: data.synth v{GENERATOR_VERSION}, "
                                             f"seed {seed}, shape {'x'.join(map(str, shape))}, "
                                             f"degradation scale {degradation_scale:g}")
    except BaseException:
        for path in written:  # no manifest was written: leave no orphaned samples either
            path.unlink(missing_ok=True)
        raise
    return samples


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="dataset folder to create (must be empty)")
    ap.add_argument("--n-train", type=int, default=14, help="training samples, WF labels (default 14)")
    ap.add_argument("--n-test", type=int, default=3, help="test samples, HQ labels (default 3)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, default=128, help="cubic volume edge in voxels (default 128)")
    size.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="volume shape, axis 0 = screw axis")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--voxel-size-um", type=float, default=5.0, help="voxel size written to the manifest (default 5)")
    ap.add_argument("--degradation-scale", type=float, default=1.0,
                    help="multiplies the degradation depth, i.e. the degradation layer's thickness (default 1)")
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    args = ap.parse_args(argv)
    shape = tuple(args.shape) if args.shape else (args.size,) * 3
    if min(shape) < 32:
        ap.error("volume sizes must be at least 32")
    if args.voxel_size_um <= 0:
        ap.error("--voxel-size-um must be positive")
    if not 0 < args.degradation_scale <= 3:
        ap.error("--degradation-scale must be in (0, 3]")
    t0 = time.perf_counter()
    try:
        samples = write_dataset(args.out, n_train=args.n_train, n_test=args.n_test, shape=shape, seed=args.seed,
                                voxel_size_um=args.voxel_size_um, degradation_scale=args.degradation_scale,
                                overwrite=args.overwrite, log=print)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(samples)} samples of {'x'.join(map(str, shape))} voxels to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
