"""Volumes on real HDF5 and TIFF files: lazy reading and every bad input, each with file and field named."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from data.atomic import atomic_path
from data.errors import DataError
from data.manifest import load_dataset, validate_volumes
from data.volume import VolumeRef, check_image, check_labels, open_volume, parse_volume_ref, write_h5_atomic


def _h5(path: Path, **arrays) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v, chunks=True)
    return path


def test_parse_refs(tmp_path):
    r = parse_volume_ref("a/b.h5:/grp/img", tmp_path, source="m", field="image")
    assert r.path == (tmp_path / "a" / "b.h5").resolve() and r.dataset == "/grp/img"
    assert parse_volume_ref("b.h5", tmp_path, source="m", field="image").dataset == "/image"
    t = parse_volume_ref("slices/", tmp_path, source="m", field="image")
    assert t.dataset is None and t.relative_to(tmp_path.resolve()) == "slices/"


def test_tiff_folder_reads_like_an_array(tmp_path):
    vol = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7)
    (tmp_path / "img").mkdir()
    for i in range(5):  # natural order: slice_10 would sort after slice_9
        tifffile.imwrite(tmp_path / "img" / f"slice_{i}.tif", vol[i])
    ref = VolumeRef(tmp_path / "img")
    with open_volume(ref) as v:
        assert v.shape == (5, 6, 7)
        np.testing.assert_array_equal(v[1:4], vol[1:4])
        np.testing.assert_array_equal(v[:, 2], vol[:, 2])
        np.testing.assert_array_equal(v[3], vol[3])
    assert check_image(ref).max == vol.max()


def test_corrupt_hdf5_is_named(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"this is not an HDF5 file" * 100)
    with pytest.raises(DataError) as err:
        check_image(VolumeRef(bad, "/image"))
    assert str(bad) in str(err.value) and "corrupt or truncated" in str(err.value)


def test_truncated_hdf5_is_named(tmp_path):
    path = tmp_path / "trunc.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.random.default_rng(0).random((32, 32, 32)), chunks=(8, 8, 8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        check_image(VolumeRef(path, "/image"))
    assert str(path) in str(err.value)
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)


def test_missing_key_missing_file_and_empty_volume(tmp_path):
    p = _h5(tmp_path / "a.h5", image=np.zeros((4, 4, 4), np.float32), empty=np.zeros((0, 4, 4), np.float32),
            flat=np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match=r"a\.h5: /label: dataset key missing"):
        check_labels(VolumeRef(p, "/label"))
    with pytest.raises(DataError, match=r"/empty: empty volume"):
        check_image(VolumeRef(p, "/empty"))
    with pytest.raises(DataError, match=r"/flat: expected a 3D volume"):
        check_image(VolumeRef(p, "/flat"))
    with pytest.raises(DataError, match=r"nope\.h5: /image: file does not exist"):
        check_image(VolumeRef(tmp_path / "nope.h5", "/image"))


def test_nan_inf_and_label_range(tmp_path):
    img = np.zeros((6, 5, 4), np.float32)
    img[3, 2, 1] = np.nan
    inf = np.zeros((6, 5, 4), np.float32)
    inf[5, 0, 0] = np.inf
    lab = np.zeros((6, 5, 4), np.uint8)
    lab[2, 2, 2] = 7
    p = _h5(tmp_path / "v.h5", nan=img, inf=inf, lab=lab, neg=np.full((6, 5, 4), -1, np.int16))
    with pytest.raises(DataError, match=r"v\.h5: /nan: NaN or Inf in image at voxel \(3, 2, 1\)"):
        check_image(VolumeRef(p, "/nan"))
    with pytest.raises(DataError, match=r"/inf: NaN or Inf.*\(5, 0, 0\)"):
        check_image(VolumeRef(p, "/inf"))
    with pytest.raises(DataError, match=r"/lab: label values must be in 0\.\.3, found 0\.\.7"):
        check_labels(VolumeRef(p, "/lab"))
    with pytest.raises(DataError, match=r"/neg: label values must be in 0\.\.3, found -1\.\.-1"):
        check_labels(VolumeRef(p, "/neg"))
    with pytest.raises(DataError, match=r"/nan: values outside \[0, 1\]|NaN"):
        check_image(VolumeRef(p, "/nan"), require_unit_range=True)


def test_label_shape_mismatch_in_dataset(raw_dataset):
    with h5py.File(raw_dataset / "s03.h5", "a") as f:
        del f["label"]
        f["label"] = np.zeros((20, 24, 27), np.uint8)
    with pytest.raises(DataError) as err:
        validate_volumes(load_dataset(raw_dataset))
    msg = str(err.value)
    assert "s03.h5" in msg and "/label" in msg and "(20, 24, 27) differs from image shape (20, 24, 28)" in msg


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.h5"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    write_h5_atomic(target, {"a": np.ones((2, 3, 4), np.uint8)})
    with h5py.File(target) as f:
        assert f["a"].shape == (2, 3, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]


def test_atomic_write_refuses_to_overwrite_an_input(tmp_path):
    src = _h5(tmp_path / "in.h5", image=np.zeros((2, 2, 2)))
    before = src.read_bytes()
    with pytest.raises(DataError, match="overwrite an input"):
        with atomic_path(src, inputs=[src]):
            pass
    assert src.read_bytes() == before


def test_a_scan_folders_digest_does_not_depend_on_hash_seeding(tmp_path):
    """Issue 29, item 6: the first and last file were hashed in a set's order, which PYTHONHASHSEED changes."""
    import subprocess
    import sys

    folder = tmp_path / "scan"
    folder.mkdir()
    for i, text in enumerate(("first slice", "middle", "last slice")):
        (folder / f"s{i:03d}.tif").write_text(text * 1000)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from data.fingerprint import scan_digest; "
            "print(scan_digest(sys.argv[2]))")
    repo = str(Path(__file__).resolve().parents[1])
    digests = {subprocess.run([sys.executable, "-c", code, repo, str(folder)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}, check=True).stdout.strip()
               for seed in range(6)}
    assert len(digests) == 1 and len(digests.pop()) == 12
