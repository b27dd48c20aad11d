"""The slicing planes of multi-axes prediction (paper, Fig. 2): 3 axis planes and 6 rotated ones, their sets, Table 2's methods."""

from __future__ import annotations

import dataclasses
import typing as tp

from data.rotation import other_axes

AXIS_PLANES = ("rc", "cp", "pr")  # plane set whose slices are indexed by axis 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Plane:
    """One slicing plane: slices along ``slice_axis`` of the volume rotated 45° about ``rotation_axis``."""

    name: str
    slice_axis: int
    rotation_axis: tp.Optional[int] = None

    @property
    def rotated(self) -> bool:
        return self.rotation_axis is not None


def _all_planes() -> dict[str, Plane]:
    planes = {name: Plane(name, axis) for axis, name in enumerate(AXIS_PLANES)}
    for a in range(3):
        # Slicing the rotated volume along the rotation axis gives S_rc/S_cp/S_pr turned in-plane:
        # the paper drops those 3 redundant sets, which leaves 2 new sets per rotation axis.
        for s in other_axes(a):
            name = f"{AXIS_PLANES[s]}_r{a}"
            planes[name] = Plane(name, s, a)
    return planes


PLANES = _all_planes()
PLANE_SETS: dict[str, tuple[str, ...]] = {
    "rc": ("rc",), "cp": ("cp",), "pr": ("pr",),
    "3": AXIS_PLANES,
    "9": AXIS_PLANES + ("cp_r0", "pr_r0", "rc_r1", "pr_r1", "rc_r2", "cp_r2"),
}
# Table 2 of the paper: method → (plane set, vote).
TABLE2_METHODS: dict[str, tuple[str, str]] = {
    "baseline_rc": ("rc", "soft"), "baseline_cp": ("cp", "soft"), "baseline_pr": ("pr", "soft"),
    "avr_3": ("3", "soft"), "mv_3": ("3", "majority"), "avr_9": ("9", "soft"), "mv_9": ("9", "majority"),
}

def plane_set(name: str) -> tuple[str, ...]:
    """A named set (``rc``, ``3``, ``9``, ...) or a single plane (``cp_r0``)."""
    if str(name) in PLANE_SETS:
        return PLANE_SETS[str(name)]
    if str(name) in PLANES:
        return (str(name),)
    raise ValueError(f"planes must be one of {list(PLANE_SETS)} or a plane {list(PLANES)}, got {name!r}")
