"""Synthetic explants (data.synth) and the slice viewer (data.show). Small volumes only: the dev box has 2 cores."""

from __future__ import annotations

import math
from collections import Counter

import h5py
import numpy as np
import pytest
from scipy import ndimage

from data import show, synth, synth_explant, synth_geometry
from data.errors import DataError
from data.manifest import load_dataset, validate_volumes


@pytest.fixture(scope="module")
def explants():
    """Two 64³ samples covering both beamlines, both alloys and the shortest and longest implantation."""
    return [
        synth.generate_explant(64, (7, 0), beamline="P05", alloy="Mg-5Gd", days=84),
        synth.generate_explant(64, (7, 1), beamline="I13", alloy="Mg-10Gd", days=28),
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    samples = synth.write_dataset(out, n_train=2, n_test=1, shape=48, seed=3)
    return out, samples


def test_same_seed_gives_identical_arrays():
    a = synth.generate_explant(48, (5, 2), beamline="I13", alloy="Mg-10Gd", days=56)
    b = synth.generate_explant(48, (5, 2), beamline="I13", alloy="Mg-10Gd", days=56)
    c = synth.generate_explant(48, (5, 3), beamline="I13", alloy="Mg-10Gd", days=56)
    for name in ("image", "label_hq", "label_wf"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert a.image.tobytes() != c.image.tobytes()
    assert a.initial_volume_mm3 == b.initial_volume_mm3


def test_dataset_files_are_deterministic(dataset, tmp_path):
    """Also across worker processes: the fixture's dataset was made serially (3 samples), this one by 2 workers."""
    out, samples = dataset
    synth.write_dataset(tmp_path / "again", n_train=2, n_test=1, shape=48, seed=3, workers=2)
    for s in samples:
        with h5py.File(out / f"{s.id}.h5", "r") as f1, h5py.File(tmp_path / "again" / f"{s.id}.h5", "r") as f2:
            for key in ("image", "label", "label_hq", "label_wf"):
                assert f1[key][()].tobytes() == f2[key][()].tobytes(), (s.id, key)
    assert (out / "manifest.yaml").read_text() == (tmp_path / "again" / "manifest.yaml").read_text()


def test_types_shapes_and_all_classes_present(explants):
    for ex in explants:
        assert ex.image.dtype == np.uint16 and ex.label_hq.dtype == np.uint8 and ex.label_wf.dtype == np.uint8
        assert ex.image.shape == ex.label_hq.shape == ex.label_wf.shape == (64, 64, 64)
        assert ex.image.max() <= 2 ** ex.bits - 1
        for lab in (ex.label_hq, ex.label_wf):
            counts = np.bincount(lab.ravel(), minlength=5)
            assert counts[4] == 0 and (counts[:4] > 0).all(), counts
    assert explants[1].image.max() <= 4095  # I13 style: 12-bit data stored as uint16


def test_grey_values_order_like_srct(explants):
    """Soft tissue darkest, then bone, DL in between, RM brightest (Mg-10Gd brighter than Mg-5Gd relative to bone)."""
    for ex in explants:
        med = [np.median(ex.image[ex.label_hq == k]) for k in range(4)]
        assert med[0] < med[1] < med[3] and med[1] < med[2] < med[3], med


def test_cracks_in_hq_mostly_dl_in_wf(explants):
    for ex in explants:
        crack = ex.crack_mask
        assert crack.sum() > 20
        assert (ex.label_hq[crack] == synth_explant.BACKGROUND).all()
        assert np.mean(ex.label_wf[crack] == synth_explant.DL) > 0.8
        # WF never invents bone and only differs inside / at the implant
        diff = ex.label_hq != ex.label_wf
        assert np.isin(ex.label_wf[diff], (synth_explant.DL, synth_explant.RM)).all()


def test_bone_touches_implant_in_some_places_only(explants):
    for ex in explants:
        implant = ex.label_hq >= synth_explant.DL
        boundary = implant & ~ndimage.binary_erosion(implant)
        touching = boundary & ndimage.binary_dilation(ex.label_hq == synth_explant.BONE)
        frac = touching.sum() / boundary.sum()
        assert 0.1 < frac < 0.9, frac


def test_residual_material_shrinks_with_time():
    short = synth.generate_explant(48, 11, days=28)
    long = synth.generate_explant(48, 11, days=84)
    rm_short, rm_long = short.label_hq == synth_explant.RM, long.label_hq == synth_explant.RM
    assert not (rm_short & ~short.initial_mask).any()  # RM lies inside the initial screw
    assert rm_long.sum() < rm_short.sum() < 0.95 * short.initial_mask.sum()
    assert not (rm_long & ~rm_short).any()  # same seed: deeper degradation only removes material


def test_analytic_volume_matches_rasterised_screw(explants):
    for ex in explants:
        n = ex.initial_mask.sum()
        assert abs(n - ex.initial_volume_vox) / ex.initial_volume_vox < 0.03
        mm = ex.voxel_size_um * 1e-3
        assert math.isclose(ex.initial_volume_mm3, ex.initial_volume_vox * mm ** 3, rel_tol=1e-12)
        assert math.isclose(ex.initial_surface_mm2, ex.initial_surface_vox * mm ** 2, rel_tol=1e-12)
        g = ex.geometry
        length = g.z_top - g.z_bottom
        assert math.pi * g.r_core ** 2 * length * 0.8 < ex.initial_volume_vox < math.pi * g.r_major ** 2 * length
        assert ex.initial_surface_vox > 2 * math.pi * g.r_core * length * 0.8  # the thread adds area


def test_integrator_on_cylinder_with_cone():
    """No thread: a cylinder on a frustum, whose volume and area have closed forms."""
    r, r0, h, t = 10.0, 3.0, 50.0, 8.0
    g = synth_geometry.ScrewGeometry(z_bottom=0.0, z_top=h, r_core=r, thread_depth=0.0, pitch=5.0, thread_phase=0.0,
                            tip_length=t, tip_radius=r0)
    vol, area = g.volume_and_surface()
    v_exp = math.pi * t / 3 * (r * r + r * r0 + r0 * r0) + math.pi * r * r * (h - t)
    a_exp = (math.pi * (r + r0) * math.hypot(r - r0, t) + 2 * math.pi * r * (h - t)
             + math.pi * r * r + math.pi * r0 * r0)
    assert math.isclose(vol, v_exp, rel_tol=1e-5)
    assert math.isclose(area, a_exp, rel_tol=1e-4)  # one midpoint cell straddles the cone-cylinder kink


def test_thread_volume_and_area():
    """Helical trapezoid thread (no tip): per-pitch averages of r² and of the area element, done in 1D."""
    rc, h, p, length = 40.0, 2.0, 10.0, 200.0
    g = synth_geometry.ScrewGeometry(z_bottom=0.0, z_top=length, r_core=rc, thread_depth=h, pitch=p, thread_phase=0.3,
                            tip_length=1e-6, tip_radius=rc + h)  # a cone of zero slope never cuts the thread
    vol, area = g.volume_and_surface()
    # over one pitch: root (P = 0) 15 %, two linear flanks 60 %, crest (P = 1) 25 %
    r = np.linspace(rc, rc + h, 200001)
    mean_r2 = 0.15 * rc ** 2 + 0.25 * (rc + h) ** 2 + 0.6 * np.mean(r ** 2)
    r_z, r_t = h / (0.3 * p), h / (0.3 * 2 * math.pi)  # flank slopes of r(θ, z)
    mean_da = 0.15 * rc + 0.25 * (rc + h) + 0.6 * np.mean(np.sqrt(r ** 2 * (1 + r_z ** 2) + r_t ** 2))
    assert math.isclose(vol, math.pi * length * mean_r2, rel_tol=1e-4)
    assert math.isclose(area, 2 * math.pi * length * mean_da + 2 * math.pi * mean_r2, rel_tol=1e-4)


def test_manifest_loads_and_validates(dataset):
    out, samples = dataset
    ds = load_dataset(out)
    assert [s.id for s in ds.samples] == ["synth01", "synth02", "synth03"]
    assert [s.split for s in ds.samples] == ["train", "train", "test"]
    assert [s.label_quality for s in ds.samples] == ["WF", "WF", "HQ"]
    shapes = validate_volumes(ds)
    assert set(shapes.values()) == {(48, 48, 48)}
    test = ds.test[0]
    assert test.wf_label is not None and test.wf_label.dataset == "/label_wf"
    assert all(s.wf_label is None for s in ds.train)
    for s in ds.samples:
        assert s.voxel_size_um == 5.0 and s.initial_volume_mm3 > 0 and s.initial_surface_mm2 > 0
        assert s.image.path.name == f"{s.id}.h5" and s.label.dataset == "/label"
        with h5py.File(s.image.path, "r") as f:
            expected = f["label_hq"] if s.label_quality == "HQ" else f["label_wf"]
            assert np.array_equal(f["label"][()], expected[()])
            assert f.attrs["beamline"] == s.beamline and f.attrs["seed"] == 3
            assert math.isclose(f.attrs["initial_volume_mm3"], s.initial_volume_mm3, rel_tol=1e-6)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_default_plan_balanced_for_four_fold_cv():
    plan = synth.sample_plan(14, 3)
    train = [p for p in plan if p["split"] == "train"]
    assert len(train) == 14 and sum(p["split"] == "test" for p in plan) == 3
    combos = Counter((p["alloy"], p["beamline"]) for p in train)
    assert len(combos) == 4 and min(combos.values()) >= 3
    assert {p["days"] for p in train} == {28.0, 56.0, 84.0}
    assert {p["label_quality"] for p in plan if p["split"] == "test"} == {"HQ"}


def test_refuses_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError) as err:
        synth.write_dataset(out, n_train=1, n_test=0, shape=32)
    assert str(out) in str(err.value)
    assert synth.main(["--out", str(out), "--n-train", "1", "--n-test", "0", "--size", "32"]) == 2
    assert str(out) in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written
    assert synth.main(["--out", str(out), "--n-train", "1", "--n-test", "0", "--size", "32", "--overwrite"]) == 0
    assert load_dataset(out).samples[0].id == "synth01"


def test_show_writes_png(dataset, tmp_path):
    out, _ = dataset
    png = tmp_path / "fig" / "s.png"
    assert show.main([str(out), "--sample", "synth03", "--out", str(png), "--label-field", "label_wf"]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    show.render(out, "synth01", tmp_path / "hq.png", label_field="label_hq")
    assert (tmp_path / "hq.png").stat().st_size > 1000
    with pytest.raises(DataError, match="nope"):
        show.render(out, "nope", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    real = synth.generate_explant

    def flaky(shape, seed, **kw):
        if seed[1] == 1:
            raise RuntimeError("boom")
        return real(shape, seed, **kw)

    monkeypatch.setattr(synth, "generate_explant", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        synth.write_dataset(tmp_path / "ds", n_train=2, n_test=0, shape=32)
    assert list((tmp_path / "ds").iterdir()) == []
