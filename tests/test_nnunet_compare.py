"""benchmarks/nnunet_compare.py, stage 1 only: a prepared dataset in nnU-Net v2's raw format, on real files.

Runs in the project's venv, without torch or nnunetv2 (the script imports them only after the conversion). The NIfTI
files are read back with a header parser written here from the NIfTI-1 layout, not with the script's writer.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
import typing as tp
from pathlib import Path

import h5py
import numpy as np
import pytest

from data.errors import DataError
from data.folds import split_fold
from data.manifest import load_dataset
from tests.conftest import tree_snapshot, write_raw_dataset

REPO = Path(__file__).resolve().parents[1]
NIFTI_DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32}


def _load_script() -> tp.Any:
    spec = importlib.util.spec_from_file_location("nnunet_compare", REPO / "benchmarks" / "nnunet_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(volume as (z, y, x), spacing (z, y, x)) of a single-file NIfTI-1 (.nii.gz) with x the fastest axis."""
    raw = gzip.decompress(path.read_bytes())
    assert struct.unpack_from("<i", raw, 0)[0] == 348 and raw[344:348] == b"n+1\x00"
    dim = struct.unpack_from("<8h", raw, 40)
    datatype = struct.unpack_from("<h", raw, 70)[0]
    pixdim = struct.unpack_from("<8f", raw, 76)
    offset = int(struct.unpack_from("<f", raw, 108)[0])
    assert dim[0] == 3 and struct.unpack_from("<f", raw, 112)[0] in (0.0, 1.0)  # 3D, values not scaled
    nx, ny, nz = dim[1:4]
    vol = np.frombuffer(raw, NIFTI_DTYPES[datatype], nx * ny * nz, offset).reshape(nz, ny, nx)
    return vol, (pixdim[3], pixdim[2], pixdim[1])


def _h5(path: Path, key: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[key][...]


@pytest.fixture
def converted(tmp_path: Path) -> tuple[tp.Any, Path, Path, dict]:
    from data.prepare import prepare_dataset

    raw = tmp_path / "raw"
    write_raw_dataset(raw, n_train=8, n_test=2, shape=(20, 24, 28))  # not cubic: any axis mix-up shows
    prepared = tmp_path / "prepared"
    prepare_dataset(raw, prepared)
    script = _load_script()
    work = tmp_path / "work"
    record = script.convert_dataset(prepared, work, dataset_id=501, log=lambda msg: None)
    return script, prepared, work, record


def test_conversion_files_labels_and_folds(converted) -> None:
    script, prepared, work, record = converted
    ds = load_dataset(prepared)
    train_ids = sorted(s.id for s in ds.train)
    test_ids = sorted(s.id for s in ds.test)
    raw = work / "nnUNet_raw" / "Dataset501_ScalingUNet"

    # Case ids: training samples in imagesTr/labelsTr, test scans only in imagesTs.
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == [f"{i}_0000.nii.gz" for i in train_ids]
    assert sorted(p.name for p in (raw / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in train_ids]
    assert sorted(p.name for p in (raw / "imagesTs").iterdir()) == [f"{i}_0000.nii.gz" for i in test_ids]
    assert not set(test_ids) & {p.name.split("_0000")[0] for p in (raw / "imagesTr").iterdir()}
    assert record["train_ids"] == train_ids and record["test_ids"] == test_ids
    assert record["train_label"] == "label (WF)" and record["test_reference"] == "label (HQ)"

    # Images and labels read back: shape, voxel spacing in mm, the prepared volumes' values exactly.
    for s in ds.samples:
        image, spacing = read_nifti(raw / ("imagesTr" if s.split == "train" else "imagesTs") / f"{s.id}_0000.nii.gz")
        source = _h5(s.image.path, s.image.dataset)
        assert image.shape == source.shape == (20, 24, 28)
        assert image.dtype == np.float32 and np.array_equal(image, source)
        assert spacing == pytest.approx((s.voxel_size_um / 1000.0,) * 3)
        if s.split == "train":
            label, lspacing = read_nifti(raw / "labelsTr" / f"{s.id}.nii.gz")
            assert label.dtype == np.uint8 and lspacing == spacing
            assert np.array_equal(label, _h5(s.label.path, s.label.dataset))
            assert set(np.unique(label)) <= {0, 1, 2, 3}

    doc = json.loads((raw / "dataset.json").read_text())
    assert doc["labels"] == {"background": 0, "bone": 1, "degradation_layer": 2, "residual_material": 3}
    assert doc["numTraining"] == len(train_ids) and doc["file_ending"] == ".nii.gz"
    assert doc["channel_names"] == {"0": "SRmuCT"}  # not "CT": nnU-Net z-scores each image

    # splits_final.json: nnU-Net's fold k is the project's fold k (data.folds.split_fold), raw and preprocessed.
    expected = []
    for fold in range(4):
        tr, val = split_fold(ds, fold)
        expected.append({"train": sorted(s.id for s in tr), "val": sorted(s.id for s in val)})
    for folder in (raw, work / "nnUNet_preprocessed" / "Dataset501_ScalingUNet"):
        splits = json.loads((folder / "splits_final.json").read_text())
        assert splits == expected
    assert sorted(i for s in expected for i in s["val"]) == train_ids  # every training case validated once


def test_conversion_resumes_and_refuses_another_dataset(converted, tmp_path: Path) -> None:
    script, prepared, work, record = converted
    before = tree_snapshot(work)
    messages: list[str] = []
    again = script.convert_dataset(prepared, work, dataset_id=501, log=messages.append)
    assert again == record and tree_snapshot(work) == before  # nothing rewritten
    assert messages and "done before" in messages[0]

    other = tmp_path / "other"
    write_raw_dataset(other, n_train=6, n_test=1, shape=(20, 24, 28), seed=3)
    with pytest.raises(DataError, match="another dataset"):
        script.convert_dataset(other, work, dataset_id=501, log=lambda msg: None)


def test_convert_only_command_needs_no_torch(converted, tmp_path: Path) -> None:
    """The command line's --convert-only in this venv (no torch, no nnunetv2 imported)."""
    script, prepared, work, _ = converted
    assert script.main(["--prepared", str(prepared), "--work", str(work), "--out", str(tmp_path / "r.json"),
                        "--budget-s", "1", "--convert-only"]) == 0
    assert "nnunetv2" not in sys.modules
    assert not (tmp_path / "r.json").exists()
