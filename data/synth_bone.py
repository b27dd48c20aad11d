"""Bone of the synthetic explants: trabecular plates and rods under a porous cortical plate, cut back around the
implant (soft-tissue gaps, osseointegrated contact, hydrogen gas pockets)."""

from __future__ import annotations

import numpy as np

from data.synth_geometry import Box, smooth_field

# Cortical bone plate across the screw near its head, as fractions of the volume's axis-0 length.
CORTEX_Z = (0.60, 0.80)


def bone_around_implant(rng: np.random.Generator, shape: tuple[int, int, int], L: float, box: Box, init: np.ndarray,
                        sd: np.ndarray, swell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bone mask of the volume, gas-bubble mask of the box): bone outside the swollen implant, touching it in
    places and kept from it by soft tissue in others."""
    Z = shape[0]
    bshape, lo, hi = box.shape, box.lo, box.hi
    bone = trabecular_bone(rng, shape, L, Z)
    contact = smooth_field(rng, bshape, 0.16 * L)
    gap_w = 0.035 * L * np.clip(1 + 0.5 * smooth_field(rng, bshape, 0.2 * L), 0.3, None) + 1.0
    outside = sd > swell
    bb = bone[box.slices]
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
    return bone, bubbles


def trabecular_bone(rng: np.random.Generator, shape: tuple[int, int, int], L: float, Z: int) -> np.ndarray:
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
