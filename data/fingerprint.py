"""A cheap, stable digest of a prepared dataset, for MLflow's dataset inputs (what a run trained on).

Hashing every voxel of a paper-scale dataset (17 volumes of ~1.4 G voxels) would cost minutes per run: the
digest covers the manifest's bytes and, per volume file, its path relative to the dataset, its size and its
first and last MiB. A re-prepared dataset (other clipping, other voxel size) changes sizes or header bytes;
a copy to another file system keeps the digest.
"""

from __future__ import annotations

import hashlib
import typing as tp
from pathlib import Path

from data.manifest import Dataset, Sample

EDGE_BYTES = 1 << 20


def _file_part(h: "hashlib._Hash", path: Path, root: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.relative_to(root) if path.is_relative_to(root) else path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        if size > 2 * EDGE_BYTES:
            f.seek(size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))


def dataset_digest(dataset: Dataset) -> str:
    """12-hex digest of the manifest and every image and label file it names (see the module docstring)."""
    h = hashlib.sha256(Path(dataset.manifest).read_bytes())
    files: set[Path] = set()
    for s in dataset.samples:
        for ref in (s.image, s.label, s.wf_label):
            if ref is not None and Path(ref.path).is_file():
                files.add(Path(ref.path))
    for path in sorted(files):
        _file_part(h, path, Path(dataset.root))
    return h.hexdigest()[:12]


def samples_digest(digest: str, samples: tp.Sequence[Sample]) -> str:
    """The digest of a subset (a fold's training or validation samples) of a dataset with ``digest``."""
    return hashlib.sha256((digest + ":" + ",".join(sorted(s.id for s in samples))).encode()).hexdigest()[:12]


def scan_digest(path: tp.Union[str, Path]) -> str:
    """12-hex digest of one scan: a file as :func:`dataset_digest` hashes a volume file; a folder (TIFF slices, a
    Zarr store) by every file's relative name and size plus the first and last MiB of its first and last file."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        _file_part(h, path, path.parent)
        return h.hexdigest()[:12]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(f"{p.relative_to(path)}:{p.stat().st_size}\n".encode())
    for p in dict.fromkeys((files[0], files[-1])) if files else ():  # ordered: a set's order follows hash seeding
        _file_part(h, p, path)
    return h.hexdigest()[:12]
