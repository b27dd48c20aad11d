"""Geometry of the synthetic explants: the threaded screw, its placement and rasterisation, and the smooth random
fields every structure is cut from."""

from __future__ import annotations

import dataclasses
import math
import typing as tp

import numpy as np
from scipy import ndimage


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


def ball(radius: float) -> np.ndarray:
    """Boolean ball of ``radius`` voxels (a structuring element)."""
    r = int(math.ceil(radius))
    g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (g ** 2).sum(0) <= radius * radius + 1e-6


def rotation(tilt: float, azimuth: float) -> np.ndarray:
    """Rotation by ``tilt`` about the horizontal axis (0, cos a, sin a) in (z, y, x) coordinates."""
    n = np.array([0.0, math.cos(azimuth), math.sin(azimuth)])
    k = np.array([[0, -n[2], n[1]], [n[2], 0, -n[0]], [-n[1], n[0], 0]])
    return np.eye(3) + math.sin(tilt) * k + (1 - math.cos(tilt)) * (k @ k)


# ------------------------------------------------------------------------------------------- placement
@dataclasses.dataclass(frozen=True)
class ScrewPlacement:
    """The initial screw and where it sits in the volume: tilted by ``tilt`` (radians) by ``rot``, centred at ``centre``."""

    geometry: ScrewGeometry
    r_major: float  # as drawn: geometry.r_major (core + thread depth) may differ from it in the last bit
    tilt: float
    rot: np.ndarray
    centre: np.ndarray


def place_screw(rng: np.random.Generator, shape: tuple[int, int, int], L: float) -> ScrewPlacement:
    """The initial screw: core + helical thread, conical tip, flat top (proportions jittered), tilted and off-centre."""
    Z, Y, X = shape
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
    rot = rotation(tilt, rng.uniform(0, 2 * math.pi))
    centre = np.array([(Z - 1) / 2 + rng.uniform(-0.02, 0.02) * Z,
                       (Y - 1) / 2 + rng.uniform(-0.04, 0.04) * L,
                       (X - 1) / 2 + rng.uniform(-0.04, 0.04) * L])
    return ScrewPlacement(geom, r_major, tilt, rot, centre)


@dataclasses.dataclass(frozen=True)
class Box:
    """The screw's bounding box in the volume (plus a margin for DL swelling and bone contact/gaps)."""

    lo: np.ndarray
    hi: np.ndarray

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(b - a) for a, b in zip(self.lo, self.hi))


def rasterise_screw(screw: ScrewPlacement, shape: tuple[int, int, int], L: float
                    ) -> tuple[Box, np.ndarray, np.ndarray, np.ndarray]:
    """(box, initial screw mask, depth inside it, signed distance to its surface) on the box's voxels."""
    geom, rot, centre, r_major = screw.geometry, screw.rot, screw.centre, screw.r_major
    corners = np.array([[zc, yc, xc] for zc in (geom.z_bottom, geom.z_top)
                        for yc in (-r_major, r_major) for xc in (-r_major, r_major)])
    ext = corners @ rot.T + centre
    margin = 0.12 * L + 3
    lo = np.maximum(np.floor(ext.min(0) - margin), 0).astype(int)
    hi = np.minimum(np.ceil(ext.max(0) + margin) + 1, shape).astype(int)
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
    return Box(lo, hi), init, d_in, sd
