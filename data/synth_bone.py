"""Bone of the synthetic explants: trabecular plates and rods under a porous cortical plate, cut back around the
implant (soft-tissue gaps, osseointegrated contact, hydrogen gas pockets)."""

from __future__ import annotations

import numpy as np

from data.synth_geometry import Box, ScrewPlacement, smooth_field

# Cortical bone plate across the screw near its head, as fractions of the volume's axis-0 length.
CORTEX_Z = (0.60, 0.80)
# Peri-implant bone: within PERI_REACH × L of the screw's major radius the trabeculae thicken and fill in
# (new bone formed around the implant during healing), the most at the implant.
PERI_REACH = 0.35
PERI_THICKEN = 2.6    # × the trabecular thickness at the implant
PERI_DENSITY = 2.8    # lowers the density threshold at the implant (fewer bone-free regions)
# Bone-to-implant contact: a smooth field over the implant surface; bone grows onto the implant (osseointegrated)
# where it is above CONTACT_BONE, soft tissue keeps bone off where it is below CONTACT_GAP.
CONTACT_BONE, CONTACT_GAP = -0.9, -1.3


def bone_around_implant(rng: np.random.Generator, shape: tuple[int, int, int], L: float, box: Box, init: np.ndarray,
                        sd: np.ndarray, swell: np.ndarray, screw: ScrewPlacement, implant: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(bone mask of the volume, gas-bubble mask of the box): bone outside the swollen implant, denser near it,
    touching it over most of its surface and kept from it by soft tissue in places. ``implant``: RM, DL and cracks
    on the box."""
    Z = shape[0]
    bshape, lo, hi = box.shape, box.lo, box.hi
    bone = trabecular_bone(rng, shape, L, Z, near=peri_implant(shape, L, screw))
    contact = smooth_field(rng, bshape, 0.16 * L)
    gap_w = 0.035 * L * np.clip(1 + 0.5 * smooth_field(rng, bshape, 0.2 * L), 0.3, None) + 1.0
    outside = sd > swell
    bb = bone[box.slices]
    bb &= outside
    bb &= ~((contact < CONTACT_GAP) & (sd <= swell + gap_w))  # soft-tissue gap: no bone next to the implant
    under_top = (np.arange(lo[0], hi[0]) < CORTEX_Z[1] * Z)[:, None, None]  # no bone in the tissue above
    # osseointegrated bone: on the DL's surface, and down to the RM where DL fragments fell off (``implant``: RM, DL
    # and its cracks on the box; the rest of the swollen envelope is where fragments are missing)
    bb |= (contact > CONTACT_BONE) & ~implant & (sd <= swell + 0.02 * L + 1.0) & under_top
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


def peri_implant(shape: tuple[int, int, int], L: float, screw: ScrewPlacement) -> np.ndarray:
    """1 at the screw's major radius (and inside), falling linearly to 0 at PERI_REACH × L beyond it (float32); the
    distance is to the screw's axis segment, so the zone also wraps the tip and the head."""
    g = screw.geometry
    axis = screw.rot[:, 0].astype(np.float32)  # the local z axis in (z, y, x)
    p = [np.arange(n, dtype=np.float32).reshape([-1 if i == a else 1 for i in range(3)]) - np.float32(c)
         for a, (n, c) in enumerate(zip(shape, screw.centre))]
    t = p[0] * axis[0] + p[1] * axis[1] + p[2] * axis[2]
    along = np.clip(t, g.z_bottom, g.z_top)
    dist = np.sqrt(sum(np.square(p[a] - along * axis[a]) for a in range(3)))
    return np.clip(1.0 - (dist - np.float32(screw.r_major)) / np.float32(PERI_REACH * L), 0.0, 1.0)


def trabecular_bone(rng: np.random.Generator, shape: tuple[int, int, int], L: float, Z: int,
                    near: np.ndarray | float = 0.0) -> np.ndarray:
    """Bone mask: plates (band around a level set) and rods (two bands crossing) below a porous cortex; ``near``
    (0..1, see :func:`peri_implant`) thickens the trabeculae and fills in the sparse regions next to the implant."""
    spacing = 0.14 * L  # trabecular spacing
    thick = 0.2 * np.clip(1 + 0.35 * smooth_field(rng, shape, 0.3 * L), 0.5, None)  # trabecular thickness varies
    thick *= 1.0 + (PERI_THICKEN - 1.0) * near
    plates = np.abs(smooth_field(rng, shape, spacing, order=3)) < thick
    rods = (np.abs(smooth_field(rng, shape, spacing, order=3)) < 1.7 * thick) & \
           (np.abs(smooth_field(rng, shape, spacing, order=3)) < 1.7 * thick)
    del thick
    density = smooth_field(rng, shape, 0.35 * L)
    zz = np.arange(shape[0], dtype=np.float32)[:, None, None] / Z
    # sparser far from the cortex, denser next to the implant
    bone = (plates | rods) & (density > -0.4 + 1.2 * np.clip(0.6 - zz, 0, 1) - PERI_DENSITY * near)
    del near
    # cortical plate across the screw near its head, with wavy faces and vascular pores
    wave = smooth_field(rng, (1,) + shape[1:], 0.4 * L)[0] * 0.025
    z0, z1 = CORTEX_Z[0] + wave, CORTEX_Z[1] + 0.6 * wave
    cortex = (zz >= z0[None]) & (zz <= z1[None])
    pores = smooth_field(rng, shape, 0.035 * L + 1.5, order=3) > 1.9
    bone = np.where(zz > z1[None], False, bone)  # soft tissue above the bone
    return (bone | cortex) & ~pores
