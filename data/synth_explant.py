"""One synthetic explant: the degrading implant, its exact and workflow-like labels, and the steps that build it
(geometry, bone, degradation, imaging) from one seed."""

from __future__ import annotations

import dataclasses
import math
import typing as tp

import numpy as np
from scipy import ndimage

from data.synth_bone import bone_around_implant
from data.synth_geometry import Box, ScrewGeometry, ball, place_screw, rasterise_screw, smooth_field
from data.synth_imaging import ALLOYS, BEAMLINES, attenuation, detector, optics

GENERATOR_VERSION = "3"
BACKGROUND, BONE, DL, RM = 0, 1, 2, 3

# Mean degradation depth in units of the screw's major radius after 28/56/84 days (interpolated): fast at first,
# slower once the degradation layer covers the implant (the rate, DR = depth / time, falls with time).
DEGRADATION_BY_DAYS = ((0.0, 0.0), (28.0, 0.10), (56.0, 0.13), (84.0, 0.15), (365.0, 0.3))
# Alloy factor of the depth: Mg-10Gd degrades slower than Mg-5Gd; and the spread between samples.
ALLOY_DEGRADATION = {"Mg-5Gd": 1.1, "Mg-10Gd": 0.9}
DEGRADATION_SPREAD = (0.8, 1.2)
# Cracks run through the DL where a smooth field over it exceeds CRACKED (a quarter of it; v1: two thirds, whose
# faces were half the implant surface at 64³ and kept BIC below 30 %); the DL detaches from the RM (a thin
# interface gap) where another exceeds DETACHED.
CRACKED, DETACHED = 0.7, 0.9
# Grey of the DL between bone's (0) and the RM's (1): mean, spread of a smooth field, lowest value. v3 (was 0.5,
# 0.25, 0.1): no DL as dark as bone, fewer bright patches the WF labels call RM; the demo's DL 59 → 64 IoU.
DL_TONE = (0.55, 0.18, 0.25)
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


def degradation_fraction(days: float) -> float:
    """Mean degradation depth / major screw radius after ``days`` (more degradation for longer times)."""
    d, f = zip(*DEGRADATION_BY_DAYS)
    return float(np.interp(days, d, f))


# -------------------------------------------------------------------------------------------- steps
@dataclasses.dataclass(frozen=True)
class Implant:
    """The degraded implant on the box's voxels: residual material, degradation layer, its cracks and grey tone
    (0 = bone's, 1 = RM's), and how far the DL swells beyond the original surface."""

    rm: np.ndarray
    dl: np.ndarray
    crack: np.ndarray
    dl_tone: np.ndarray
    swell: np.ndarray


def degrade(rng: np.random.Generator, init: np.ndarray, d_in: np.ndarray, sd: np.ndarray, L: float, s: float,
            r_major: float, *, days: float, alloy: str, degradation_scale: float) -> Implant:
    """Residual material (the initial screw eroded by a smooth, pitted depth) and the degradation layer from it
    to about the original surface, fragmented and cracked."""
    bshape = init.shape
    deg = degradation_fraction(days) * ALLOY_DEGRADATION[alloy] * rng.uniform(*DEGRADATION_SPREAD)
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
    crack = dl & (np.abs(g) < max(0.5, 0.5 * s) * grad) & (smooth_field(rng, bshape, 0.2 * L) > CRACKED)
    del g, grad
    touching_rm = ndimage.binary_dilation(rm) & dl  # DL detaching from the RM: thin interface gap
    crack |= touching_rm & (smooth_field(rng, bshape, 0.15 * L) > DETACHED)
    dl &= ~crack
    tone, spread, lowest = DL_TONE
    dl_tone = tone + spread * smooth_field(rng, bshape, 0.12 * L) + 0.06 * smooth_field(rng, bshape, 0.03 * L + 1)
    np.clip(dl_tone, lowest, 1.1, out=dl_tone)  # grey of the DL: 0 = bone's, 1 = RM's
    return Implant(rm, dl, crack, dl_tone, swell)


def labels(shape: tuple[int, int, int], box: Box, bone: np.ndarray, implant: Implant, s: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """(exact labels, labels imitating the semi-automatic workflow: cracks missed and small gaps closed, bright DL
    thresholded as RM)."""
    dl, rm, crack, dl_tone = implant.dl, implant.rm, implant.crack, implant.dl_tone
    label_hq = np.zeros(shape, np.uint8)
    label_hq[bone] = BONE
    lb = label_hq[box.slices]
    lb[dl] = DL
    lb[rm] = RM
    label_wf = label_hq.copy()
    wb = label_wf[box.slices]
    rc = max(1.0, 1.5 * s)
    closed = ndimage.binary_closing(lb >= DL, structure=ball(rc))
    wb[(closed | crack) & (lb == BACKGROUND)] = DL
    wb[(lb == DL) & (dl_tone > 0.92)] = RM
    return label_hq, label_wf


def check_shape(shape: tp.Union[int, tp.Sequence[int]]) -> tuple[int, int, int]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),) * 3
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 32:
        raise ValueError(f"shape must be 3 sizes of at least 32 voxels, got {shape}")
    return shape


# -------------------------------------------------------------------------------------- generator
def generate_explant(shape: tp.Union[int, tp.Sequence[int]] = 128, seed: tp.Union[int, tp.Sequence[int]] = 0, *,
                     beamline: str = "P05", alloy: str = "Mg-5Gd", days: float = 56.0,
                     voxel_size_um: float = 5.0, degradation_scale: float = 1.0) -> SyntheticExplant:
    """Build one synthetic explant in memory; same (shape, seed, options) gives identical arrays.

    ``seed`` may be an int or a sequence of ints, e.g. (dataset seed, sample index).
    ``degradation_scale`` multiplies the degradation depth (and so the degradation layer's thickness):
    at small grids (64³–128³) the default layer is 1–4 voxels thick; a scale of 2 keeps it learnable.
    """
    shape = check_shape(shape)
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

    # The draws from ``rng`` happen in this order; reordering the steps changes every sample of a seed.
    screw = place_screw(rng, shape, L)
    vol_vox, area_vox = screw.geometry.volume_and_surface()
    box, init, d_in, sd = rasterise_screw(screw, shape, L)
    implant = degrade(rng, init, d_in, sd, L, s, screw.r_major, days=days, alloy=alloy,
                      degradation_scale=degradation_scale)
    bone, bubbles = bone_around_implant(rng, shape, L, box, init, sd, implant.swell, screw,
                                         implant.rm | implant.dl | implant.crack)
    del d_in, sd
    label_hq, label_wf = labels(shape, box, bone, implant, s)
    mu = attenuation(rng, style, alloy, shape, L, s, box.slices, bone, bubbles, implant.crack, implant.dl,
                     implant.dl_tone, implant.rm)
    crack = implant.crack
    del implant
    img = optics(style, mu)
    del mu
    counts = detector(rng, style, img, L)
    del img

    vox_mm = voxel_size_um * 1e-3
    initial = np.zeros(shape, bool)
    initial[box.slices] = init
    crack_full = np.zeros(shape, bool)
    crack_full[box.slices] = crack
    return SyntheticExplant(
        image=counts, label_hq=label_hq, label_wf=label_wf, initial_mask=initial, crack_mask=crack_full,
        initial_volume_mm3=vol_vox * vox_mm ** 3, initial_surface_mm2=area_vox * vox_mm ** 2,
        initial_volume_vox=vol_vox, initial_surface_vox=area_vox, beamline=beamline, alloy=alloy,
        implantation_days=float(days), voxel_size_um=float(voxel_size_um), bits=style.bits, geometry=screw.geometry,
        tilt_deg=math.degrees(screw.tilt), centre=tuple(float(c) for c in screw.centre))
