"""Dataset manifests: which samples a dataset folder holds and what is known about each.

A dataset is a folder with ``manifest.yaml`` (or ``manifest.csv``) and the volumes it names.
YAML form::

    samples:
      - id: s01                      # unique
        image: s01.h5:/image         # HDF5 file + dataset, or a TIFF folder "s01_img/"
        label: s01.h5:/label         # optional (inference-only samples have none)
        voxel_size_um: 5.0           # > 0
        alloy: Mg-5Gd
        beamline: P05
        implantation_days: 28
        label_quality: WF            # WF (semi-automatic workflow) or HQ (manually corrected)
        split: train                 # train or test
        initial_volume_mm3: 1.23     # optional, for the degradation rate (Eq. 1)
        initial_surface_mm2: 4.56    # optional, for the degradation rate (Eq. 1)
        wf_label: s01.h5:/label_wf   # optional: the WF segmentation of an HQ sample (Table 3)

The CSV form has one row per sample and the same keys as columns (empty cell = absent).
Paths are relative to the folder; a path that leaves it is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import typing as tp
from pathlib import Path

import yaml

from data.atomic import atomic_path
from data.errors import DataError
from data.volume import VolumeRef, check_image, check_labels, parse_volume_ref

MANIFEST_NAMES = ("manifest.yaml", "manifest.yml", "manifest.csv")
LABEL_QUALITIES = ("WF", "HQ")
SPLITS = ("train", "test")
FIELDS = ("id", "image", "label", "voxel_size_um", "alloy", "beamline", "implantation_days",
          "label_quality", "split", "initial_volume_mm3", "initial_surface_mm2", "wf_label")
REQUIRED = ("id", "image", "voxel_size_um", "alloy", "beamline", "implantation_days", "label_quality", "split")


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    image: VolumeRef
    voxel_size_um: float
    alloy: str
    beamline: str
    implantation_days: float
    label_quality: str
    split: str
    label: tp.Optional[VolumeRef] = None
    initial_volume_mm3: tp.Optional[float] = None
    initial_surface_mm2: tp.Optional[float] = None
    wf_label: tp.Optional[VolumeRef] = None

    def to_record(self, root: Path) -> dict:
        rec: dict = {}
        for name in FIELDS:
            v = getattr(self, name)
            if v is None:
                continue
            rec[name] = v.relative_to(root) if isinstance(v, VolumeRef) else v
        return rec


@dataclasses.dataclass(frozen=True)
class Dataset:
    root: Path
    manifest: Path
    samples: tuple[Sample, ...]

    @property
    def train(self) -> tuple[Sample, ...]:
        return tuple(s for s in self.samples if s.split == "train")

    @property
    def test(self) -> tuple[Sample, ...]:
        return tuple(s for s in self.samples if s.split == "test")

    def by_id(self, sample_id: str) -> Sample:
        for s in self.samples:
            if s.id == sample_id:
                return s
        raise KeyError(sample_id)


def find_manifest(path: tp.Union[str, Path]) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(path, None, "dataset folder or manifest does not exist")
    for name in MANIFEST_NAMES:
        if (path / name).is_file():
            return path / name
    raise DataError(path, None, f"no manifest in folder (looked for {', '.join(MANIFEST_NAMES)})")


def _read_records(manifest: Path) -> list[dict]:
    text = manifest.read_text(encoding="utf-8")
    if manifest.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        return [{k.strip(): v.strip() for k, v in r.items() if k and v is not None and v.strip() != ""} for r in rows]
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(manifest, None, f"invalid YAML ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("samples"), list):
        raise DataError(manifest, "samples", "expected a top-level 'samples:' list")
    for i, rec in enumerate(doc["samples"]):
        if not isinstance(rec, dict):
            raise DataError(manifest, f"samples[{i}]", "expected a mapping")
    return doc["samples"]


def _number(rec: dict, key: str, where: str, manifest: Path, *, positive: bool, optional: bool = False) -> tp.Optional[float]:
    if rec.get(key) in (None, ""):
        if optional:
            return None
        raise DataError(manifest, f"{where}.{key}", "missing")
    try:
        v = float(rec[key])
    except (TypeError, ValueError):
        raise DataError(manifest, f"{where}.{key}", f"not a number: {rec[key]!r}") from None
    if not math.isfinite(v) or (positive and v <= 0):
        raise DataError(manifest, f"{where}.{key}", f"must be a positive number, got {rec[key]!r}")
    return v


def _sample(rec: dict, i: int, root: Path, manifest: Path) -> Sample:
    sid = str(rec.get("id", "")).strip()
    where = f"samples[{i}]" + (f"(id={sid})" if sid else "")
    unknown = sorted(set(rec) - set(FIELDS))
    if unknown:
        raise DataError(manifest, f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(FIELDS)})")
    for key in REQUIRED:
        if rec.get(key) in (None, ""):
            raise DataError(manifest, f"{where}.{key}", "missing")
    quality = str(rec["label_quality"]).upper()
    if quality not in LABEL_QUALITIES:
        raise DataError(manifest, f"{where}.label_quality", f"must be one of {LABEL_QUALITIES}, got {rec['label_quality']!r}")
    split = str(rec["split"]).lower()
    if split not in SPLITS:
        raise DataError(manifest, f"{where}.split", f"must be one of {SPLITS}, got {rec['split']!r}")

    def ref(key: str) -> tp.Optional[VolumeRef]:
        if rec.get(key) in (None, ""):
            return None
        return parse_volume_ref(rec[key], root, source=str(manifest), field=f"{where}.{key}")

    label = ref("label")
    if split == "train" and label is None:
        raise DataError(manifest, f"{where}.label", "training samples need a label volume")
    return Sample(
        id=sid, image=ref("image"), label=label, wf_label=ref("wf_label"),
        voxel_size_um=_number(rec, "voxel_size_um", where, manifest, positive=True),
        alloy=str(rec["alloy"]), beamline=str(rec["beamline"]),
        implantation_days=_number(rec, "implantation_days", where, manifest, positive=True),
        label_quality=quality, split=split,
        initial_volume_mm3=_number(rec, "initial_volume_mm3", where, manifest, positive=True, optional=True),
        initial_surface_mm2=_number(rec, "initial_surface_mm2", where, manifest, positive=True, optional=True),
    )


def load_dataset(path: tp.Union[str, Path]) -> Dataset:
    """Read and check a manifest (fields, enums, unique ids, paths inside the folder). No volume is opened."""
    manifest = find_manifest(path).resolve()
    root = manifest.parent
    records = _read_records(manifest)
    if not records:
        raise DataError(manifest, "samples", "manifest lists no samples")
    samples = tuple(_sample(rec, i, root, manifest) for i, rec in enumerate(records))
    seen: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.id in seen:
            raise DataError(manifest, f"samples[{i}].id", f"duplicate sample id {s.id!r} (also samples[{seen[s.id]}])")
        seen[s.id] = i
    return Dataset(root=root, manifest=manifest, samples=samples)


def validate_volumes(dataset: Dataset, *, prepared: bool = False) -> dict[str, tuple[int, ...]]:
    """Open and scan every volume: readable, 3D, non-empty, finite, labels in 0..3 and shaped like the image.

    ``prepared=True`` also requires image values in [0, 1]. Returns the image shape of each sample.
    """
    shapes = {}
    for s in dataset.samples:
        shape = check_image(s.image, require_unit_range=prepared).shape
        for name in ("label", "wf_label"):
            ref = getattr(s, name)
            if ref is not None:
                check_labels(ref, field=name, expected_shape=shape)
        shapes[s.id] = shape
    return shapes


def write_manifest(root: tp.Union[str, Path], samples: tp.Sequence[Sample], *, name: str = "manifest.yaml",
                   header: str = "") -> Path:
    """Write a manifest atomically (YAML or CSV by the file name)."""
    root = Path(root).resolve()
    records = [s.to_record(root) for s in samples]
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise DataError(root / name, "id", "duplicate sample ids")
    target = root / name
    with atomic_path(target) as tmp:
        if name.endswith(".csv"):
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=list(FIELDS))
                w.writeheader()
                w.writerows(records)
        else:
            body = yaml.safe_dump({"samples": records}, sort_keys=False, allow_unicode=True)
            tmp.write_text((header + "\n" if header else "") + body, encoding="utf-8")
    return target
