"""Uncertainty maps, their measure intervals, OME-Zarr in and out, and the --max-disk override."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from analysis.intervals import IntervalLabels, measure_intervals
from analysis.measures import implant_measures
from data.errors import DataError
from data.volume import CLASS_NAMES, VolumeRef, open_volume
from model.fusion import soft_vote, uncertainty_maps
from model.fuse import fuse_planes
from model.planes import PLANE_SETS
from model.predict import main
from tests.test_predict import plane_files, volume  # noqa: F401 (module fixtures)
from tests.test_predict_cli import SHAPE as CLI_SHAPE
from tests.test_predict_cli import files, run  # noqa: F401


def test_uncertainty_maps_by_hand():
    # 3 planes, 2 voxels. Voxel 0: planes say bone, bone, DL. Voxel 1: all three say RM.
    p = np.array([[[0.1, 0.6, 0.3, 0.0], [0.0, 0.0, 0.1, 0.9]],
                  [[0.1, 0.5, 0.4, 0.0], [0.0, 0.1, 0.1, 0.8]],
                  [[0.1, 0.3, 0.6, 0.0], [0.1, 0.0, 0.2, 0.7]]], np.float32)
    lab = soft_vote(p)
    assert lab.tolist() == [1, 3]
    m = uncertainty_maps(p, lab)
    assert m["confidence"].tolist() == [round(255 * 1.4 / 3), round(255 * 2.4 / 3)]
    assert m["disagreement"].tolist() == [85, 0]  # 1 of 3 planes differs → 255/3
    assert m["plane_classes"].tolist() == [0b0110, 0b1000]


def _read_ngff(path) -> list:
    """The nodes ome-zarr's own Reader (what napari-ome-zarr uses) finds at ``path``."""
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return list(Reader(parse_url(str(path), fmt=FormatV04()))())


def _scales(node) -> list[list[float]]:
    """The ``scale`` of each level of a Reader node."""
    return [next(t["scale"] for t in ct if t["type"] == "scale") for ct in node.metadata["coordinateTransformations"]]


def test_fuse_writes_an_ome_zarr_image_with_labels_and_maps(volume, plane_files, tmp_path):  # noqa: F811
    from ome_zarr.reader import Label

    from data.volume import downsample

    paths = [plane_files[p] for p in PLANE_SETS["9"]]
    image = VolumeRef(volume, "/image")
    fuse_planes(paths, tmp_path / "seg.h5", method="soft", uncertainty=True, probabilities=True, progress=False,
                voxel_size_um=2.5)
    fuse_planes(paths, tmp_path / "seg.zarr", method="soft", uncertainty=True, probabilities=True, progress=False,
                image=image, voxel_size_um=2.5)
    with h5py.File(tmp_path / "seg.h5") as f, h5py.File(volume) as g:
        labels, probs, grey = f["labels"][...], f["probabilities"][...], g["image"][...]
        maps = {k: f[k][...] for k in ("confidence", "disagreement", "plane_classes")}
        assert f.attrs["voxel_size_um"] == 2.5
    assert maps["disagreement"].mean() < 0.05 * 255 and maps["disagreement"].max() > 0  # the oracle mostly agrees
    assert np.all(maps["confidence"][maps["disagreement"] == 0] > 128)
    # The root is the scan: z, y, x in micrometres, level k scaled by voxel × 2^k, levels averaged.
    nodes = _read_ngff(tmp_path / "seg.zarr")
    root = nodes[0]
    assert [(a["name"], a.get("unit")) for a in root.metadata["axes"]] == [(a, "micrometer") for a in "zyx"]
    assert _scales(root) == [[2.5] * 3, [5.0] * 3]
    np.testing.assert_array_equal(np.asarray(root.data[0]), grey)
    np.testing.assert_allclose(np.asarray(root.data[1]), downsample(grey, "mean"), atol=1e-6)
    # The labels are found through labels/: colours and names of the 4 classes, level 0 = the HDF5 labels.
    found = {n.metadata["name"]: n for n in nodes if any(isinstance(s, Label) for s in n.specs)}
    assert sorted(found) == ["plane_classes", "segmentation"]
    seg = found["segmentation"]
    assert seg.metadata["properties"] == {i: {"name": n} for i, n in enumerate(CLASS_NAMES)}
    colours = seg.metadata["color"]
    assert sorted(colours) == [0, 1, 2, 3] and colours[0][3] == 0 and all(colours[i][3] == 1 for i in (1, 2, 3))
    assert len({tuple(c) for c in colours.values()}) == 4
    assert _scales(seg) == _scales(root)
    np.testing.assert_array_equal(np.asarray(seg.data[0]), labels)
    np.testing.assert_array_equal(np.asarray(seg.data[1]), labels[::2, ::2, ::2])  # nearest: no new label values
    assert found["plane_classes"].metadata["properties"][0b0110] == {"name": "bone+degradation_layer"}
    np.testing.assert_array_equal(np.asarray(found["plane_classes"].data[0]), maps["plane_classes"])
    # Probabilities (classes on a c axis first) and the fraction maps: images of their own, same scales.
    (pr,) = _read_ngff(tmp_path / "seg.zarr" / "probabilities")
    assert [a["name"] for a in pr.metadata["axes"]] == ["c", "z", "y", "x"]
    assert _scales(pr) == [[1.0] + s for s in _scales(root)]
    np.testing.assert_array_equal(np.asarray(pr.data[0]), np.moveaxis(probs, -1, 0))
    for name in ("confidence", "disagreement"):
        (node,) = _read_ngff(tmp_path / "seg.zarr" / "uncertainty" / name)
        assert _scales(node) == _scales(root)
        np.testing.assert_array_equal(np.asarray(node.data[0]), maps[name])
    # Read back as volumes: the names of the HDF5 output still find them.
    with open_volume(VolumeRef(tmp_path / "seg.zarr", "labels")) as z:
        np.testing.assert_array_equal(z[...], labels)
    with open_volume(VolumeRef(tmp_path / "seg.zarr", "image")) as z:
        np.testing.assert_array_equal(z[...], grey)
    for k, v in maps.items():
        with open_volume(VolumeRef(tmp_path / "seg.zarr", k)) as z:
            np.testing.assert_array_equal(z[...], v)
    with pytest.raises(DataError, match="array key missing"):  # a typo is refused, not the scan returned
        with open_volume(VolumeRef(tmp_path / "seg.zarr", "disagrement")):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.h5", "seg.zarr"]  # no temporary left
    with pytest.raises(ValueError, match="--voxel-size"):
        fuse_planes(paths, tmp_path / "other.zarr", method="soft", progress=False, image=image)
    assert not (tmp_path / "other.zarr").exists()


def test_an_ensembles_fold_disagreement_is_an_uncertainty_image(volume, plane_files, tmp_path):  # noqa: F811
    import shutil

    from model.fusion import FOLD_DISAGREEMENT

    paths = []
    for plane in PLANE_SETS["3"]:  # plane files as an ensemble writes them: with the fold disagreement
        paths.append(Path(shutil.copy(plane_files[plane], tmp_path / f"{plane}.h5")))
        with h5py.File(paths[-1], "a") as f:
            f[FOLD_DISAGREEMENT] = np.full(f["probabilities"].shape[:3], 51, np.uint8)
    fuse_planes(paths, tmp_path / "seg.zarr", method="soft", uncertainty=True, progress=False,
                image=VolumeRef(volume, "/image"), voxel_size_um=5.0)
    (node,) = _read_ngff(tmp_path / "seg.zarr" / "uncertainty" / FOLD_DISAGREEMENT)
    assert _scales(node) == [[5.0] * 3, [10.0] * 3]
    assert np.all(np.asarray(node.data[0]) == 51)


def test_pyramids_and_the_copied_scan_stream_in_slabs(tmp_path):
    # One z slice per slab (budget of 1 byte) gives the same levels as one slab for all: the slab seams are exact.
    import zarr

    from data.volume import copy_volume, create_zarr_array, downsample, write_pyramid

    rng = np.random.default_rng(1)
    grey = rng.random((24, 28, 32), dtype=np.float32)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["image"] = grey
    for budget in (1, 64 << 20):
        g = zarr.open_group(str(tmp_path / f"{budget}.zarr"), mode="w", zarr_format=2)
        level0 = create_zarr_array(g, "0", grey.shape, grey.dtype, chunk=8)
        rng_ = copy_volume(VolumeRef(tmp_path / "v.h5", "/image"), level0, budget_bytes=budget)
        assert rng_ == (float(grey.min()), float(grey.max()))
        assert write_pyramid(g, "mean", min_edge=6, budget_bytes=budget) == ["0", "1", "2"]
        np.testing.assert_array_equal(g["0"][...], grey)
        np.testing.assert_allclose(g["2"][...], downsample(downsample(grey, "mean"), "mean"), atol=1e-6)
        assert g["2"].shape == (6, 7, 8)
        probs = create_zarr_array(g.require_group("p"), "0", (4,) + grey.shape, np.float16, chunk=8)
        probs[...] = np.stack([grey] * 4)
        write_pyramid(g["p"], "nearest", min_edge=6, budget_bytes=budget)
        np.testing.assert_array_equal(g["p/2"][...], np.stack([grey] * 4).astype(np.float16)[:, ::4, ::4, ::4])


def test_old_stores_with_the_labels_as_root_image_still_read(tmp_path):
    # Stores written before the labels moved to labels/segmentation: labels = the root image, maps beside it.
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    lab = np.random.default_rng(0).integers(0, 4, (6, 7, 8)).astype(np.uint8)
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=2)
    g.create_array("0", data=lab, chunks=(4, 4, 4))
    g.create_array("disagreement", data=lab * 10, chunks=(4, 4, 4))
    write_multiscales_metadata(g, [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1] * 3}]}],
                               fmt=FormatV04(), axes=["z", "y", "x"], name="labels")
    with open_volume(VolumeRef(tmp_path / "old.zarr", "labels")) as z:
        np.testing.assert_array_equal(z[...], lab)
    with open_volume(VolumeRef(tmp_path / "old.zarr", "disagreement")) as z:
        np.testing.assert_array_equal(z[...], lab * 10)


def _implant(shape=(24, 24, 24)):
    z, y, x = np.indices(shape)
    r = np.hypot(y - 11.5, x - 11.5)
    lab = np.zeros(shape, np.uint8)
    lab[r < 10] = 1
    lab[r < 6] = 2
    lab[r < 4] = 3
    return lab, r


def test_measure_interval_holds_the_fused_value_and_moves_with_disagreement():
    lab, r = _implant()
    dis = np.zeros_like(lab)
    classes = (1 << lab).astype(np.uint8)
    dis[(r >= 6) & (r < 7)] = 85  # the bone ring touching the implant is uncertain
    classes[(r >= 6) & (r < 7)] |= 1 << 2
    dis[(r >= 3) & (r < 4)] = 85  # the outer RM ring too
    classes[(r >= 3) & (r < 4)] |= 1 << 2
    classes[(r >= 10) & (r < 11)] |= 1 << 1  # a plane sees bone just outside
    kw = dict(voxel_size_um=5.0, roi_um=40.0, initial_volume_mm3=0.01, initial_surface_mm2=0.5, days=28)
    fused = implant_measures(lab, **kw)
    iv = measure_intervals(lab, dis, classes, **kw)
    for key, (lo, hi) in iv.items():
        assert lo <= fused[key] <= hi and hi > lo, key
    narrow_rm = IntervalLabels(lab, dis, classes, 3, "narrow")[:]
    assert (narrow_rm == 3).sum() < (lab == 3).sum()  # fewer RM voxels → larger DR
    assert iv["dr_mm_per_year"][1] > fused["dr_mm_per_year"]
    assert iv["bic_percent"][0] < fused["bic_percent"]  # uncertain contact bone removed → less contact


def test_predict_cli_reads_and_writes_zarr_with_uncertainty(files, tmp_path, capsys):  # noqa: F811
    import zarr

    with h5py.File(files / "vol.h5") as f:
        image, ref = f["image"][...], f["label"][...]
    store = zarr.open_group(str(tmp_path / "scan.zarr"), mode="w")
    store.create_array("image", data=image, chunks=(8, 8, 8))
    # A plain Zarr array carries no voxel size: refused before any prediction, one line naming --voxel-size.
    rc, msg = run(capsys, files / "oracle.keras", tmp_path / "scan.zarr", "--planes", "3",
                  "--out", tmp_path / "seg.zarr")
    assert rc == 2 and msg.count("\n") == 1 and "--voxel-size" in msg and "scan.zarr" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.zarr"]  # no output, no plane files
    rc, msg = run(capsys, files / "oracle.keras", tmp_path / "scan.zarr", "--planes", "3",
                  "--out", tmp_path / "seg.zarr", "--uncertainty", "--workers", "2", "--voxel-size", "5")
    assert rc == 0, msg
    assert (_scales(_read_ngff(tmp_path / "seg.zarr")[0])[0]) == [5.0] * 3
    with open_volume(VolumeRef(tmp_path / "seg.zarr", "labels")) as z:
        np.testing.assert_array_equal(z[...], ref)
        assert z.shape == CLI_SHAPE
    with open_volume(VolumeRef(tmp_path / "seg.zarr", "disagreement")) as z:
        assert z.dtype == np.uint8 and z.shape == CLI_SHAPE
    # The measures CLI takes the store as its labels.
    from analysis.measures_cli import main as measures_main

    assert measures_main([str(tmp_path / "seg.zarr"), "--dataset", "labels", "--voxel-size-um", "5", "--json"]) == 0
    assert '"bv_tv_percent"' in capsys.readouterr().out
    # An existing store is kept without --overwrite.
    rc, msg = run(capsys, files / "oracle.keras", tmp_path / "scan.zarr", "--out", tmp_path / "seg.zarr",
                  "--voxel-size", "5")
    assert rc == 2 and "exists" in msg


def test_predict_takes_the_voxel_size_from_the_input(files, tmp_path, capsys):  # noqa: F811
    # A prepared HDF5 file carries voxel_size_um (data.prepare); an OME-Zarr scan carries its scale.
    with h5py.File(files / "vol.h5") as f:
        image, ref = f["image"][...], f["label"][...]
    with h5py.File(tmp_path / "prepared.h5", "w") as f:
        f["image"] = image
        f.attrs["voxel_size_um"] = 2.5
    rc, msg = run(capsys, files / "oracle.keras", tmp_path / "prepared.h5", "--planes", "rc",
                  "--out", tmp_path / "a.zarr")
    assert rc == 0, msg
    assert _scales(_read_ngff(tmp_path / "a.zarr")[0])[0] == [2.5] * 3
    rc, msg = run(capsys, files / "oracle.keras", tmp_path / "a.zarr", "--planes", "rc", "--out", tmp_path / "b.zarr")
    assert rc == 0, msg  # the store's root image is the scan, at its scale
    assert _scales(_read_ngff(tmp_path / "b.zarr")[0])[0] == [2.5] * 3
    with open_volume(VolumeRef(tmp_path / "b.zarr", "labels")) as z:
        np.testing.assert_array_equal(z[...], ref)
    # --voxel-size wins and is recorded in an HDF5 output; a bad one is refused naming the option.
    rc, msg = run(capsys, files / "oracle.keras", tmp_path / "prepared.h5", "--planes", "rc",
                  "--out", tmp_path / "c.h5", "--voxel-size", "3")
    assert rc == 0, msg
    with h5py.File(tmp_path / "c.h5") as f:
        assert f.attrs["voxel_size_um"] == 3.0
    rc, msg = run(capsys, files / "oracle.keras", tmp_path / "prepared.h5", "--out", tmp_path / "d.zarr",
                  "--voxel-size", "-1")
    assert rc == 2 and "--voxel-size" in msg and not (tmp_path / "d.zarr").exists(), msg


def test_prepare_accepts_a_zarr_volume(tmp_path):
    import zarr

    from data.manifest import Sample, write_manifest
    from data.prepare import prepare_dataset

    rng = np.random.default_rng(4)
    image = rng.integers(0, 4096, (12, 16, 20)).astype(np.uint16)
    label = rng.integers(0, 4, image.shape).astype(np.uint8)
    for name, kind in (("h5", "h5"), ("zarr", "zarr")):
        root = tmp_path / name
        root.mkdir()
        if kind == "h5":
            with h5py.File(root / "v.h5", "w") as f:
                f["image"], f["label"] = image, label
            refs = VolumeRef(root / "v.h5", "/image"), VolumeRef(root / "v.h5", "/label")
        else:
            g = zarr.open_group(str(root / "v.zarr"), mode="w")
            g.create_array("image", data=image, chunks=(4, 8, 8))
            g.create_array("label", data=label, chunks=(4, 8, 8))
            refs = VolumeRef(root / "v.zarr", "image"), VolumeRef(root / "v.zarr", "label")
        write_manifest(root, [Sample(id="a", image=refs[0], label=refs[1], voxel_size_um=2.4, alloy="Mg-5Gd",
                                     beamline="P05", implantation_days=28, label_quality="WF", split="train")])
        prepare_dataset(root, tmp_path / f"out_{name}")
    with h5py.File(tmp_path / "out_h5" / "a.h5") as a, h5py.File(tmp_path / "out_zarr" / "a.h5") as b:
        np.testing.assert_array_equal(a["image"][...], b["image"][...])
        np.testing.assert_array_equal(a["label"][...], b["label"][...])


def test_max_disk_overrides_the_estimate(files, tmp_path, capsys):  # noqa: F811
    # 1 KiB is less than one plane file: the run stops after the first plane, from the size it wrote,
    # and keeps that plane for a resumed run; no output.
    rc, msg = run(capsys, files / "oracle.keras", files / "vol.h5", "--planes", "9", "--out", tmp_path / "o.h5",
                  "--max-disk", "1K")
    assert rc == 2 and "--max-disk" in msg and "remaining planes" in msg, msg
    assert not (tmp_path / "o.h5").exists()
    assert sorted(p.name for p in (tmp_path / "o.h5.planes").iterdir()) == ["rc.h5"]
    rc, msg = run(capsys, files / "oracle.keras", files / "vol.h5", "--out", tmp_path / "o.h5", "--max-disk", "lots")
    assert rc == 2 and "max-disk" in msg
    rc, msg = run(capsys, files / "oracle.keras", files / "vol.h5", "--out", tmp_path / "o.h5", "--max-disk", "1G")
    assert rc == 0, msg


def test_table3_prints_the_mean_interval_over_folds():
    from analysis.table3 import table3, table3_latex, table3_markdown

    values = {"s1": {"HQ": {"dr_mm_per_year": 0.2, "bic_percent": 50.0, "bv_tv_percent": 40.0}, "WF": None,
                     "ML": [{"dr_mm_per_year": 0.21, "bic_percent": 45.0, "bv_tv_percent": 42.0},
                            {"dr_mm_per_year": 0.23, "bic_percent": 55.0, "bv_tv_percent": 44.0}],
                     "ML_interval": [{"dr_mm_per_year": (0.20, 0.22), "bic_percent": (40.0, 47.0),
                                      "bv_tv_percent": (41.0, 43.0)},
                                     {"dr_mm_per_year": (0.22, 0.26), "bic_percent": (50.0, 57.0),
                                      "bv_tv_percent": (43.0, 45.0)}],
                     "folds": [0, 1, 2, 3], "days": 28.0, "methods": {"avr_9"}}}
    df = table3(values)
    md = table3_markdown(df)
    assert "| s1 | ML | 0.220 (+10.0%) [0.210, 0.240] | 50.0 (+0.0%) [45.0, 52.0] | 43.0 (+7.5%) [42.0, 44.0] |" in md
    assert "| s1 | HQ | 0.200 | 50.0 | 40.0 |" in md
    assert "plane-disagreement interval" in md
    assert r"0.220 (+10.0\%) [0.210, 0.240]" in table3_latex(df)


def test_table3_values_compute_the_interval_with_the_real_measures(tmp_path):
    # The reports pass the real measures function explicitly; the interval was skipped on that path.
    from analysis.table3 import default_measures, table3_values
    from tests.conftest import write_raw_dataset

    samples = write_raw_dataset(tmp_path / "ds", n_train=0, n_test=1, shape=(12, 16, 16))
    with h5py.File(samples[0].label.path) as f:
        label = f["label"][...]
    with h5py.File(tmp_path / "pred.h5", "w") as f:
        f["labels"] = label
        f["disagreement"] = np.where(label == 1, 128, 0).astype(np.uint8)  # planes split on all bone
        f["plane_classes"] = (1 << label).astype(np.uint8)
    preds = {0: {"dataset": str(tmp_path / "ds"), "method": "avr_9", "samples": {samples[0].id: str(tmp_path / "pred.h5")}}}
    values, _ = table3_values(preds, measures_fn=default_measures())
    (interval,) = values[samples[0].id]["ML_interval"]
    lo, hi = interval["bv_tv_percent"]
    assert lo < hi  # narrow drops the disputed bone, so BV/TV falls
