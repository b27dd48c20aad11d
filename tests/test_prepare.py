"""Preprocessing on real files: resampling, percentile clipping, scaling, slab-bounded work, bad input."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import yaml

from data.errors import DataError
from data.manifest import Sample, load_dataset, validate_volumes, write_manifest
from data.prepare import (area_weights, axis_map, output_shape, percentiles_from_histogram, prepare_dataset,
                          resample_linear)
from data.volume import VolumeRef
from tests.conftest import tree_snapshot, write_raw_dataset


def _one_sample(root: Path, image: np.ndarray, label: np.ndarray, voxel: float, *, tiff: bool = False) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if tiff:
        for name, vol in (("img", image), ("lab", label)):
            (root / name).mkdir()
            for i, sl in enumerate(vol):
                tifffile.imwrite(root / name / f"{i:04d}.tif", sl)
        img_ref, lab_ref = VolumeRef(root / "img"), VolumeRef(root / "lab")
    else:
        with h5py.File(root / "v.h5", "w") as f:
            f["image"], f["label"] = image, label
        img_ref, lab_ref = VolumeRef(root / "v.h5", "/image"), VolumeRef(root / "v.h5", "/label")
    write_manifest(root, [Sample(id="a", image=img_ref, label=lab_ref, voxel_size_um=voxel, alloy="Mg-5Gd",
                                 beamline="P05", implantation_days=28, label_quality="WF", split="train")])


def test_linear_ramp_is_resampled_exactly(tmp_path):
    # A volume linear in each axis stays linear under trilinear resampling: check against the formula.
    z, y, x = np.meshgrid(np.arange(30), np.arange(20), np.arange(25), indexing="ij")
    image = (10 * z + 3 * y + x + 100).astype(np.float32)
    _one_sample(tmp_path / "raw", image, np.zeros(image.shape, np.uint8), voxel=2.6)
    (p,) = prepare_dataset(tmp_path / "raw", tmp_path / "out", voxel_size_um=5.0, clip_percentiles=(0, 100))
    assert p.shape_out == output_shape(image.shape, 2.6, 5.0) == (16, 10, 13)
    coords = [np.clip((np.arange(n) + 0.5) * 5.0 / 2.6 - 0.5, 0, m - 1) for n, m in zip(p.shape_out, image.shape)]
    zz, yy, xx = np.meshgrid(*coords, indexing="ij")
    expected = 10 * zz + 3 * yy + xx + 100
    bin_width = (image.max() - image.min()) / 65536
    assert abs(p.clip_low - expected.min()) <= bin_width and abs(p.clip_high - expected.max()) <= bin_width
    expected = (expected - p.clip_low) / (p.clip_high - p.clip_low)
    with h5py.File(tmp_path / "out" / "a.h5") as f:
        got = f["image"][...]
        assert f["image"].dtype == np.float32 and f["image"].chunks is not None
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_labels_are_nearest_and_keep_their_values(tmp_path):
    rng = np.random.default_rng(1)
    label = rng.integers(0, 4, (16, 16, 16)).astype(np.uint8)
    _one_sample(tmp_path / "raw", rng.random(label.shape).astype(np.float32), label, voxel=10.0)
    prepare_dataset(tmp_path / "raw", tmp_path / "out", voxel_size_um=5.0)
    with h5py.File(tmp_path / "out" / "a.h5") as f:
        up = f["label"][...]
    assert up.shape == (32, 32, 32) and up.dtype == np.uint8
    # Upsampling ×2 by nearest neighbour repeats each voxel in a 2×2×2 block.
    np.testing.assert_array_equal(up[::2, ::2, ::2], label)
    np.testing.assert_array_equal(up[1::2, 1::2, 1::2], label)


def test_percentile_clip_and_scale_match_numpy(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.gamma(2.0, 1000.0, (24, 24, 24)).astype(np.uint16)
    _one_sample(tmp_path / "raw", image, np.zeros(image.shape, np.uint8), voxel=5.0)
    (p,) = prepare_dataset(tmp_path / "raw", tmp_path / "out")
    # Percentile definitions differ between order statistics; ours must lie between the neighbouring ones.
    v = np.sort(image.ravel()).astype(np.float64)
    bin_width = (v[-1] - v[0]) / 65536
    for q, got in ((0.005, p.clip_low), (0.999, p.clip_high)):
        k = q * v.size
        assert v[int(k) - 1] - bin_width <= got <= v[int(k) + 1] + bin_width, (q, got)
    with h5py.File(tmp_path / "out" / "a.h5") as f:
        out = f["image"][...]
        assert f.attrs["clip_low"] == pytest.approx(p.clip_low)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, np.clip((image - p.clip_low) / (p.clip_high - p.clip_low), 0, 1), atol=1e-6)
    assert (out == 0).mean() == pytest.approx(0.005, abs=0.002) and (out == 1).mean() == pytest.approx(0.001, abs=0.001)


def test_histogram_percentiles_interpolate_within_a_bin():
    counts = np.array([0, 10, 0, 10])
    edges = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert percentiles_from_histogram(counts, edges, [25, 50, 75]) == pytest.approx([1.5, 2.0, 3.5])


def test_small_slabs_give_the_same_result_as_one_slab(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.random((40, 30, 20)).astype(np.float32) * 4000
    _one_sample(tmp_path / "raw", image, rng.integers(0, 4, image.shape).astype(np.uint8), voxel=3.3)
    prepare_dataset(tmp_path / "raw", tmp_path / "big", slab_mb=512)
    prepare_dataset(tmp_path / "raw", tmp_path / "tiny", slab_mb=0.001)  # forces one output slice per slab
    with h5py.File(tmp_path / "big" / "a.h5") as a, h5py.File(tmp_path / "tiny" / "a.h5") as b:
        np.testing.assert_array_equal(a["image"][...], b["image"][...])
        np.testing.assert_array_equal(a["label"][...], b["label"][...])


def test_tiff_input_gives_the_same_output_as_hdf5(tmp_path):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 4096, (12, 16, 20)).astype(np.uint16)
    label = rng.integers(0, 4, image.shape).astype(np.uint8)
    _one_sample(tmp_path / "h5", image, label, voxel=2.4)
    _one_sample(tmp_path / "tif", image, label, voxel=2.4, tiff=True)
    prepare_dataset(tmp_path / "h5", tmp_path / "o1")
    prepare_dataset(tmp_path / "tif", tmp_path / "o2")
    with h5py.File(tmp_path / "o1" / "a.h5") as a, h5py.File(tmp_path / "o2" / "a.h5") as b:
        np.testing.assert_array_equal(a["image"][...], b["image"][...])
        np.testing.assert_array_equal(a["label"][...], b["label"][...])


def test_prepared_dataset_has_a_valid_manifest(prepared_dataset):
    ds = load_dataset(prepared_dataset)
    assert len(ds.samples) == 10 and {s.voxel_size_um for s in ds.samples} == {5.0}
    assert ds.by_id("s09").split == "test" and ds.by_id("s09").initial_surface_mm2 == 7.0
    assert all(s.image.path.parent == prepared_dataset.resolve() for s in ds.samples)
    validate_volumes(ds, prepared=True)


@pytest.mark.parametrize("damage", ["nan", "label_range", "shape", "missing_key", "corrupt"])
def test_bad_input_writes_nothing(tmp_path, damage):
    raw = tmp_path / "raw"
    write_raw_dataset(raw, n_train=4, n_test=1)
    target = raw / "s03.h5"  # a late sample, so the early ones would be written if the check came late
    if damage == "corrupt":
        target.write_bytes(b"\x89HDF garbage" * 50)
    else:
        with h5py.File(target, "a") as f:
            if damage == "nan":
                img = f["image"][...].astype(np.float32)
                img[1, 1, 1] = np.nan
                del f["image"]
                f["image"] = img
            elif damage == "label_range":
                f["label"][0, 0, 0] = 9
            elif damage == "shape":
                del f["label"]
                f["label"] = np.zeros((3, 3, 3), np.uint8)
            elif damage == "missing_key":
                del f["label"]
    before = tree_snapshot(raw)
    with pytest.raises(DataError) as err:
        prepare_dataset(raw, tmp_path / "out")
    assert "s03.h5" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert tree_snapshot(raw) == before


def test_refuses_nonempty_output_and_the_input_folder(tmp_path, raw_dataset):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        prepare_dataset(raw_dataset, out)
    assert (out / "results.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="input dataset folder"):
        prepare_dataset(raw_dataset, raw_dataset, overwrite=True)


def test_cli_reports_errors_in_one_line(tmp_path, raw_dataset, capsys):
    from data.prepare import main

    doc = yaml.safe_load((raw_dataset / "manifest.yaml").read_text())
    doc["samples"][0]["voxel_size_um"] = -1
    (raw_dataset / "manifest.yaml").write_text(yaml.safe_dump(doc))
    assert main([str(raw_dataset), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "manifest.yaml" in err and "voxel_size_um" in err


def test_axis_map_aligns_voxel_centres():
    m = axis_map(10, 5, 1.0, 2.0)  # 2× downsampling: output centre o sits between inputs 2o and 2o+1
    np.testing.assert_array_equal(m.taps, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]])
    np.testing.assert_allclose(m.weights, 0.5)
    # at exactly 2 the area rule (used above 2) gives the same weights: no seam between the two rules
    taps, weights = area_weights(10, 5, 2.0)
    dense = np.zeros((5, 10))
    np.add.at(dense, (np.arange(5)[:, None], taps), weights)
    np.testing.assert_allclose(dense, np.kron(np.eye(5), [0.5, 0.5]), atol=1e-7)


@pytest.mark.parametrize("factor", [3, 4, 5])
def test_downsampling_by_more_than_two_averages_every_voxel_it_covers(factor):
    """Issue 29: at factor 4 linear interpolation averaged 2 of 4 source voxels per axis, so a structure one voxel
    thin vanished or doubled depending on where it lay (aliasing); every source voxel now counts by its overlap."""
    n_out = 6
    n_in = n_out * factor
    line = np.zeros(n_in, np.float32)
    line[::factor] = 1.0  # one bright voxel per output voxel, where linear interpolation never reads
    vol = line[None, None, :] * np.ones((n_in, n_in, 1), np.float32)
    maps = [axis_map(n_in, n_out, 1.0, float(factor)) for _ in range(3)]
    out = resample_linear(vol, maps, 0)
    assert out.shape == (n_out, n_out, n_out)
    np.testing.assert_allclose(out, 1.0 / factor, rtol=1e-5)  # the mean is kept, wherever the voxel lies
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(n_in, n_in, n_in)).astype(np.float32)
    # averaging factor³ voxels: the noise falls by factor^1.5 (linear read 8 voxels: only by 2^1.5)
    assert resample_linear(noise, maps, 0).std() < 1.3 / factor ** 1.5
    # a ramp stays a ramp: each inner output voxel holds the value at its centre, (o + 0.5)·factor − 0.5
    ramp = np.arange(n_in, dtype=np.float32)[None, None, :] * np.ones((n_in, n_in, 1), np.float32)
    inner = resample_linear(ramp, maps, 0)[0, 0, 1:-1]
    np.testing.assert_allclose(inner, (np.arange(1, n_out - 1) + 0.5) * factor - 0.5, rtol=1e-5)
