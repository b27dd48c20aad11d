"""``python -m analysis.segment``: a raw scan (any voxel size) to labels, measures, a picture and a report, end to end
with a real Keras model, real HDF5 and TIFF files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from analysis.segment import main
from tests.test_predict import phantom
from tests.test_predict_cli import oracle_model

RAW_SHAPE = (32, 28, 36)  # at 2.5 µm; the model was trained at 5 µm: prepared to 16 × 14 × 18


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A raw uint16 scan (grey value 500 + 1000 × class, the label at half the model's voxel size) and an oracle."""
    d = tmp_path_factory.mktemp("segment")
    lab = phantom(RAW_SHAPE)
    with h5py.File(d / "scan.h5", "w") as f:
        f["image"] = (500 + 1000 * lab.astype(np.uint16)).astype(np.uint16)
        f["image"].attrs["element_size_um"] = [2.5, 2.5, 2.5]
        f["label"] = lab
    with h5py.File(d / "bare.h5", "w") as f:
        f["image"] = (500 + 1000 * lab.astype(np.uint16)).astype(np.uint16)
    oracle_model().save(d / "oracle.keras")
    return d


def run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv] + ["--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_a_raw_scan_becomes_labels_measures_a_picture_and_a_report(raw, tmp_path, capsys):
    out = tmp_path / "scan1"
    rc, text = run(capsys, raw / "scan.h5", "--model", raw / "oracle.keras", "--model-voxel-size", 5, "--out", out,
                   "--roi-um", 20, "--initial-volume-mm3", 1e-4, "--initial-surface-mm2", 1e-2, "--days", 30,
                   "--ome-zarr", "--keep-model-grid")
    assert rc == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["overview.png", "report.json", "report.md", "segmentation.h5",
                                                     "segmentation.zarr", "segmentation_model_grid.h5"]
    report = json.loads((out / "report.json").read_text())
    assert report["scan"]["voxel_size_um"] == 2.5 and report["scan"]["voxel_size_from"] == "scan metadata"
    assert len(report["scan"]["digest"]) == 12 and "keras" in report["environment"]
    assert report["prepared"]["shape"] == [16, 14, 18] and report["prepared"]["voxel_size_um"] == 5.0
    assert (report["prepared"]["clip_low"], report["prepared"]["clip_high"]) == pytest.approx((500, 3500), abs=1)
    with h5py.File(out / "segmentation_model_grid.h5", "r") as f:
        labels = f["labels"][...]
        assert {"disagreement", "plane_classes", "confidence"} <= set(f)
    with h5py.File(out / "segmentation.h5", "r") as f:  # the labels and maps back on the scan's own grid
        assert f.attrs["voxel_size_um"] == 2.5 and f.attrs["grid"] == "scan"
        assert all(f[k].shape == RAW_SHAPE for k in ("labels", "disagreement", "plane_classes", "confidence"))
        assert (f["labels"][...] == phantom(RAW_SHAPE)).mean() > 0.85
    # The prepared grid's voxel centres fall on source voxels 2o + 0.5: the label there (nearest) is the truth.
    truth = phantom(RAW_SHAPE)[1::2, 1::2, 1::2]
    assert labels.shape == truth.shape and (labels == truth).mean() > 0.95
    m = report["measures"]
    assert m["bic_percent"] is not None and 0 < m["bic_percent"] <= 100 and m["dr_mm_per_year"] is not None
    for key in ("dr_mm_per_year", "bic_percent", "bv_tv_percent"):
        lo, hi = report["intervals"][key]
        assert lo <= m[key] <= hi
    assert set(report["seconds"]) == {"check and load", "prepare", "predict", "measures", "picture", "to scan grid",
                                      "total"}
    assert report["segmentation"]["shape"] == list(RAW_SHAPE) and report["measures_grid"]["voxel_size_um"] == 5.0
    # Fused in RAM (this CPU has no accelerator): the plan before the first slice is in the report.
    assert report["prediction"]["fuse_on"] == "host" and report["prediction"]["estimate_bytes"]["total"] > 0
    assert "Fused on host: needs ~" in (out / "report.md").read_text()
    # The OME-Zarr store as a viewer reads it: the prepared scan at the model's voxel size, the labels beside it.
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(out / "segmentation.zarr")))())
    scale = nodes[0].metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == [5.0, 5.0, 5.0]
    seg = next(n for n in nodes if "labels/segmentation " in str(n.zarr))
    np.testing.assert_array_equal(np.asarray(seg.data[0]), labels)
    assert report["seconds"]["total"] >= report["seconds"]["predict"] > 0
    assert report["prediction"]["planes"] == "9" and report["prediction"]["phase_seconds"]["predict"] > 0
    assert "Time for this sample" in (out / "report.md").read_text() and "BIC (%)" in text
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_voxel_size_and_an_existing_folder_are_refused_before_any_work(raw, tmp_path, capsys):
    out = tmp_path / "bare"
    rc, text = run(capsys, raw / "bare.h5", "--model", raw / "oracle.keras", "--model-voxel-size", 5, "--out", out)
    assert rc == 2 and text.count("error:") == 1 and "voxel size is unknown" in text and "--voxel-size" in text
    assert not out.exists() and not list(tmp_path.iterdir())
    rc, text = run(capsys, raw / "bare.h5", "--model", raw / "oracle.keras", "--out", out, "--voxel-size", 2.5)
    assert rc == 2 and "--model-voxel-size" in text and not out.exists()  # a .keras file does not say its voxel size
    out.mkdir()
    (out / "earlier.json").write_text("{}")
    rc, text = run(capsys, raw / "bare.h5", "--model", raw / "oracle.keras", "--model-voxel-size", 5,
                   "--voxel-size", 2.5, "--out", out)
    assert rc == 2 and "--overwrite" in text and [p.name for p in out.iterdir()] == ["earlier.json"]
    rc, text = run(capsys, raw / "bare.h5", "--model", raw / "oracle.keras", "--model-voxel-size", 5,
                   "--voxel-size", -1, "--out", tmp_path / "neg")
    assert rc == 2 and "--voxel-size: must be a positive" in text


def test_the_voxel_size_is_read_from_tiff_hdf5_and_ome_zarr_metadata(tmp_path):
    import tifffile
    import zarr

    from data.errors import DataError
    from data.volume import VolumeRef
    from data.voxel_size import scan_voxel_size_um

    img = (np.arange(4 * 6 * 8) % 7).reshape(4, 6, 8).astype(np.uint16)
    tiffs = tmp_path / "tiffs"
    tiffs.mkdir()
    for i, page in enumerate(img):  # as Fiji saves a stack as an image sequence: ImageJ unit, spacing, resolution
        tifffile.imwrite(tiffs / f"s{i:03d}.tif", page, imagej=True, resolution=(1 / 0.65, 1 / 0.65),
                         metadata={"unit": "um", "spacing": 0.65})
    assert scan_voxel_size_um(VolumeRef(tiffs)) == pytest.approx(0.65)
    bare = tmp_path / "bare_tiffs"
    bare.mkdir()
    tifffile.imwrite(bare / "s000.tif", img[0])
    assert scan_voxel_size_um(VolumeRef(bare)) is None
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["image"] = img
        f.attrs["voxel_size_um"] = 3.0
        f["aniso"] = img
        f["aniso"].attrs["element_size_um"] = [5.0, 2.5, 2.5]
    assert scan_voxel_size_um(VolumeRef(tmp_path / "a.h5", "/image")) == 3.0
    with pytest.raises(DataError, match="anisotropic"):
        scan_voxel_size_um(VolumeRef(tmp_path / "a.h5", "/aniso"))
    for unit, scale, want in (("nanometer", 1300.0, 1.3), (None, 1.3, None)):  # NGFF 0.4; no unit: unknown
        store = tmp_path / f"scan-{unit}.zarr"
        root = zarr.open_group(str(store), mode="w", zarr_format=2)
        root.create_array("0", shape=img.shape, dtype=img.dtype)[...] = img
        axes = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in "zyx"]
        root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [scale] * 3}]}]}]
        got = scan_voxel_size_um(VolumeRef(store, "0"))
        assert got == (None if want is None else pytest.approx(want))


def test_a_scan_at_4_um_comes_back_at_4_um_in_its_own_shape(tmp_path, raw, capsys):
    """Issue 32: an 80³-like scan at 4 µm was segmented into a 5 µm label volume of another shape, which overlays
    nothing in a viewer; now segmentation.h5 has the scan's shape and voxel size and overlaps its exact labels."""
    shape = (40, 35, 45)  # at 4 µm: 32 × 28 × 36 at the model's 5 µm
    lab = phantom(shape)
    with h5py.File(tmp_path / "scan4.h5", "w") as f:
        f["image"] = (500 + 1000 * lab.astype(np.uint16)).astype(np.uint16)
        f["image"].attrs["voxel_size_um"] = 4.0
    out = tmp_path / "seg4"
    rc, text = run(capsys, tmp_path / "scan4.h5", "--model", raw / "oracle.keras", "--model-voxel-size", 5,
                   "--out", out, "--planes", "3")
    assert rc == 0, text
    assert not (out / "segmentation_model_grid.h5").exists()  # kept only on request
    with h5py.File(out / "segmentation.h5", "r") as f:
        assert f["labels"].shape == shape and f.attrs["voxel_size_um"] == 4.0
        labels = f["labels"][...]
    agree = (labels == lab).mean()
    assert agree > 0.85, agree  # the phantom's edges move by up to half a model voxel (2.5 µm) through 5 µm
    report = json.loads((out / "report.json").read_text())
    assert report["prepared"]["shape"] == [32, 28, 36] and report["segmentation"]["voxel_size_um"] == 4.0
    assert "Labels on the scan's grid: [40, 35, 45] at 4.0 µm" in (out / "report.md").read_text()
