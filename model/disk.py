"""Disk use of a prediction (upper bounds, a free-space check) and a cheap identity of a model file."""

from __future__ import annotations

import hashlib
import shutil
import typing as tp
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.rotation import rotated_volume_shape
from data.volume import NUM_CLASSES
from model.planes import PLANES


def estimate_disk_bytes(shape: tp.Sequence[int], planes: tp.Sequence[str], *, num_classes: int = NUM_CLASSES,
                        probabilities: bool = False, tiff: bool = False, uncertainty: bool = False) -> dict[str, int]:
    """Upper bounds (uncompressed) of what a prediction writes: final outputs and plane/temporary files."""
    n = int(np.prod(shape))
    out = n + (2 * n * num_classes if probabilities else 0) + (n if tiff else 0) + (3 * n if uncertainty else 0)
    planes_b = n * num_classes * len(planes)
    rot = 0
    for p in planes:
        a = PLANES[p].rotation_axis
        if a is not None:
            nr = int(np.prod(rotated_volume_shape(shape, a)))
            rot = max(rot, nr * (2 + num_classes))  # float16 image + uint8 probabilities, one plane at a time
    return {"output": out, "planes": planes_b, "temporary": rot}


def check_disk(folder: Path, need_bytes: int, what: str) -> None:
    """Refuse to start when ``folder``'s file system has less free space than ``need_bytes``."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise DataError(folder, None, f"too little disk for {what}: needs up to {need_bytes / 2**30:.2f} GiB, "
                        f"{free / 2**30:.2f} GiB free")


def file_digest(path: Path, limit: int = 1 << 20) -> str:
    """A cheap identity of a model file: size, mtime and a hash of its first MiB."""
    st = Path(path).stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(limit)).hexdigest()[:16]
    return f"{Path(path).name}:{st.st_size}:{head}"

