"""Manifest parsing and the bad inputs it must reject with the file and field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from data.errors import DataError
from data.manifest import load_dataset, validate_volumes
from tests.conftest import write_raw_dataset


def _edit(root: Path, index: int, **changes) -> Path:
    path = root / "manifest.yaml"
    doc = yaml.safe_load(path.read_text())
    for k, v in changes.items():
        if v is None:
            doc["samples"][index].pop(k, None)
        else:
            doc["samples"][index][k] = v
    path.write_text(yaml.safe_dump(doc))
    return path


def test_yaml_and_csv_manifests_load_the_same(tmp_path):
    write_raw_dataset(tmp_path / "y", fmt="manifest.yaml")
    write_raw_dataset(tmp_path / "c", fmt="manifest.csv")
    y, c = load_dataset(tmp_path / "y"), load_dataset(tmp_path / "c")
    assert len(y.samples) == len(c.samples) == 10
    assert len(y.train) == 8 and len(y.test) == 2
    for a, b in zip(y.samples, c.samples):
        assert a.to_record(y.root) == b.to_record(c.root)
    s = y.by_id("s09")
    assert s.split == "test" and s.label_quality == "HQ" and s.initial_volume_mm3 == 1.5
    assert s.image.path == (tmp_path / "y" / "s09.h5").resolve() and s.image.dataset == "/image"


def test_valid_dataset_passes_the_deep_check(raw_dataset):
    shapes = validate_volumes(load_dataset(raw_dataset))
    assert set(shapes.values()) == {(20, 24, 28)}


@pytest.mark.parametrize("change, field, words", [
    ({"voxel_size_um": None}, "samples[1](id=s01).voxel_size_um", "missing"),
    ({"voxel_size_um": 0}, "samples[1](id=s01).voxel_size_um", "positive"),
    ({"voxel_size_um": -2.4}, "samples[1](id=s01).voxel_size_um", "positive"),
    ({"voxel_size_um": "abc"}, "samples[1](id=s01).voxel_size_um", "not a number"),
    ({"id": "s00"}, "samples[1].id", "duplicate sample id 's00'"),
    ({"image": "../elsewhere.h5:/image"}, "samples[1](id=s01).image", "leaves the dataset folder"),
    ({"label": "/etc/passwd.h5:/label"}, "samples[1](id=s01).label", "absolute path"),
    ({"split": "validation"}, "samples[1](id=s01).split", "must be one of"),
    ({"label_quality": "great"}, "samples[1](id=s01).label_quality", "must be one of"),
    ({"label": None}, "samples[1](id=s01).label", "training samples need a label"),
    ({"colour": "red"}, "samples[1](id=s01).colour", "unknown field"),
    ({"initial_surface_mm2": 0}, "samples[1](id=s01).initial_surface_mm2", "positive"),
])
def test_bad_manifest_fields_name_file_and_field(raw_dataset, change, field, words):
    manifest = _edit(raw_dataset, 1, **change)
    with pytest.raises(DataError) as err:
        load_dataset(raw_dataset)
    msg = str(err.value)
    assert str(manifest.resolve()) in msg and field in msg and words in msg, msg


def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(DataError, match="no manifest in folder"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.yaml").write_text("samples: []\n")
    with pytest.raises(DataError, match="lists no samples"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.yaml").write_text("samples: [unclosed\n")
    with pytest.raises(DataError, match="invalid YAML"):
        load_dataset(tmp_path)


def test_test_sample_may_have_no_label(raw_dataset):
    _edit(raw_dataset, 9, label=None)
    ds = load_dataset(raw_dataset)
    assert ds.by_id("s09").label is None
    validate_volumes(ds)
