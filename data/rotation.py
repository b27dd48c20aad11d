"""45° rotations of a volume for 9-plane prediction (paper, multi-axes prediction fusing).

Paper: "rotate the volume by 45° about each of the three axes (bilinear interpolation, constant
fill 0, rotation about the volume centre, NOT cropped, so the rotated volume is larger)".
A rotation about axis ``a`` turns every plane perpendicular to ``a`` in 2D, so it is done slab by
slab along ``a`` and never needs the whole volume in memory. The geometry is exactly that of
``scipy.ndimage.rotate(v, angle, axes=(b, c), reshape=True, order=1, mode="constant")`` with
``b < c`` the two other axes (tests check both the hand-computed voxel position and scipy):
an output position ``o`` of the rotated plane samples the input at
``p = M (o − c_out) + c_in``, ``M = [[cos, sin], [−sin, cos]]``, ``c = (shape − 1) / 2``.
Each plane goes through ``scipy.ndimage.affine_transform`` (order 1, no prefilter).
"""

from __future__ import annotations

import math
import typing as tp

import numpy as np

ANGLE_DEG = 45.0


def other_axes(axis: int) -> tuple[int, int]:
    """The two axes spanning the planes that a rotation about ``axis`` turns, in increasing order."""
    if axis not in (0, 1, 2):
        raise ValueError(f"rotation axis must be 0, 1 or 2, got {axis}")
    b, c = (x for x in range(3) if x != axis)
    return b, c


def _matrix(angle_deg: float) -> np.ndarray:
    from scipy.special import cosdg, sindg  # degree-exact, as scipy.ndimage.rotate uses

    c, s = float(cosdg(angle_deg)), float(sindg(angle_deg))
    return np.array([[c, s], [-s, c]])


def rotated_plane_shape(shape: tp.Sequence[int], angle_deg: float = ANGLE_DEG) -> tuple[int, int]:
    """Shape of a 2D plane after rotation without cropping (the bounding box of the turned plane)."""
    iy, ix = int(shape[0]), int(shape[1])
    bounds = _matrix(angle_deg) @ np.array([[0, 0, iy, iy], [0, ix, 0, ix]], np.float64)
    h, w = (np.ptp(bounds, axis=1) + 0.5).astype(int)
    return int(h), int(w)


def rotated_volume_shape(shape: tp.Sequence[int], axis: int, angle_deg: float = ANGLE_DEG) -> tuple[int, int, int]:
    """Shape of the whole volume after rotating it about ``axis`` (that axis keeps its length)."""
    b, c = other_axes(axis)
    out = list(int(s) for s in shape)
    out[b], out[c] = rotated_plane_shape((shape[b], shape[c]), angle_deg)
    return tuple(out)  # type: ignore[return-value]


def _centres(plane_shape: tp.Sequence[int], angle_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rot = rotated_plane_shape(plane_shape, angle_deg)
    return (np.asarray(plane_shape, np.float64) - 1) / 2, (np.asarray(rot, np.float64) - 1) / 2, np.asarray(rot)


def rotate_planes(planes: np.ndarray, angle_deg: float = ANGLE_DEG, *, out: tp.Optional[np.ndarray] = None) -> np.ndarray:
    """Rotate a stack of 2D planes (k, H, W) about their centres: bilinear, zero fill, not cropped.

    Paper: 45° rotation with bilinear interpolation and constant fill 0, about the volume centre.
    """
    from scipy.ndimage import affine_transform

    planes = np.asarray(planes)
    m = _matrix(angle_deg)
    c_in, c_out, rot = _centres(planes.shape[1:], angle_deg)
    offset = c_in - m @ c_out
    if out is None:
        out = np.empty((planes.shape[0],) + tuple(int(v) for v in rot), np.float32)
    for k in range(planes.shape[0]):
        affine_transform(planes[k].astype(np.float32, copy=False), m, offset, output_shape=out.shape[1:],
                         output=out[k], order=1, mode="constant", cval=0.0, prefilter=False)
    return out


def unrotate_planes(planes: np.ndarray, original_shape: tp.Sequence[int], angle_deg: float = ANGLE_DEG, *,
                    out: tp.Optional[np.ndarray] = None) -> np.ndarray:
    """Inverse of :func:`rotate_planes`: sample rotated planes (k, h, w) back on the (H, W) grid.

    Original voxel ``p`` sits at ``o = Mᵀ (p − c_in) + c_out``. Every original voxel lies inside the
    rotated plane; ``mode="nearest"`` only covers the half-voxel rounding of the rotated shape at the corners.
    """
    from scipy.ndimage import affine_transform

    planes = np.asarray(planes)
    original_shape = tuple(int(v) for v in original_shape)
    m = _matrix(angle_deg)
    c_in, c_out, rot = _centres(original_shape, angle_deg)
    if tuple(planes.shape[1:]) != tuple(int(v) for v in rot):
        raise ValueError(f"rotated planes have shape {planes.shape[1:]}, expected {tuple(rot)} for {original_shape}")
    offset = c_out - m.T @ c_in
    if out is None:
        out = np.empty((planes.shape[0],) + original_shape, np.float32)
    for k in range(planes.shape[0]):
        affine_transform(planes[k].astype(np.float32, copy=False), m.T, offset, output_shape=original_shape,
                         output=out[k], order=1, mode="nearest", prefilter=False)
    return out


def position_after_rotation(point: tp.Sequence[float], shape: tp.Sequence[int], axis: int,
                            angle_deg: float = ANGLE_DEG) -> tuple[float, float, float]:
    """Where voxel ``point`` of a volume of ``shape`` lands in the volume rotated about ``axis``."""
    b, c = other_axes(axis)
    m = _matrix(angle_deg)
    plane = (shape[b], shape[c])
    rot = rotated_plane_shape(plane, angle_deg)
    c_in = (np.asarray(plane, np.float64) - 1) / 2
    c_out = (np.asarray(rot, np.float64) - 1) / 2
    o = m.T @ (np.array([point[b], point[c]], np.float64) - c_in) + c_out
    out = [float(v) for v in point]
    out[b], out[c] = float(o[0]), float(o[1])
    return tuple(out)  # type: ignore[return-value]


def bilinear_table(in_shape: tp.Sequence[int], out_shape: tp.Sequence[int], matrix: np.ndarray, offset: np.ndarray, *,
                   mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The bilinear sampling of ``affine_transform(order=1, prefilter=False)`` as 4 flat indices and weights.

    Output pixel ``o`` of ``out_shape`` samples ``p = matrix o + offset`` of a plane of ``in_shape``;
    returns int32 indices into the flattened plane and float32 weights, both (4, out_h · out_w), so
    that any backend can rotate by a gather and a weighted sum. ``mode`` as scipy's: ``constant``
    gives 0 for a ``p`` outside [0, n − 1] (scipy interpolates nothing beyond the edge), ``nearest``
    clamps ``p`` into the plane.
    """
    if mode not in ("constant", "nearest"):
        raise ValueError(f"mode must be 'constant' or 'nearest', got {mode!r}")
    h, w = (int(v) for v in in_shape)
    o = np.indices(tuple(int(v) for v in out_shape), dtype=np.float64).reshape(2, -1)
    p = np.asarray(matrix, np.float64) @ o + np.asarray(offset, np.float64)[:, None]
    if mode == "constant":
        valid = (p[0] >= 0) & (p[0] <= h - 1) & (p[1] >= 0) & (p[1] <= w - 1)
    else:
        p = np.stack([np.clip(p[0], 0, h - 1), np.clip(p[1], 0, w - 1)])
        valid = np.ones(p.shape[1], bool)
    i0 = np.clip(np.floor(p[0]), 0, h - 1).astype(np.int64)
    j0 = np.clip(np.floor(p[1]), 0, w - 1).astype(np.int64)
    fy = np.where(valid, p[0] - i0, 0.0)
    fx = np.where(valid, p[1] - j0, 0.0)
    i1, j1 = np.minimum(i0 + 1, h - 1), np.minimum(j0 + 1, w - 1)
    idx = np.stack([i0 * w + j0, i0 * w + j1, i1 * w + j0, i1 * w + j1]).astype(np.int32)
    wts = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx]) * valid
    return idx, wts.astype(np.float32)


def rotation_table(plane_shape: tp.Sequence[int], angle_deg: float = ANGLE_DEG) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rotate_planes` of one (H, W) plane as a :func:`bilinear_table` (zero fill, not cropped)."""
    m = _matrix(angle_deg)
    c_in, c_out, rot = _centres(plane_shape, angle_deg)
    return bilinear_table(plane_shape, rot, m, c_in - m @ c_out, mode="constant")


def unrotation_table(plane_shape: tp.Sequence[int], angle_deg: float = ANGLE_DEG) -> tuple[np.ndarray, np.ndarray]:
    """:func:`unrotate_planes` back onto an (H, W) plane as a :func:`bilinear_table` (edges clamped)."""
    m = _matrix(angle_deg)
    c_in, c_out, rot = _centres(plane_shape, angle_deg)
    return bilinear_table(rot, plane_shape, m.T, c_out - m.T @ c_in, mode="nearest")
