"""Implant measures (analysis.measures): Eq. 1-3 on numbers, convergence on analytic shapes, slab-size
independence, exactness against an in-memory reference, and the CLI (JSON, table, bad input)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import typing as tp
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from analysis.measures import bone_implant_contact, bone_volume_fraction, degradation_rate, implant_measures
from analysis.measures_cli import main
from data.errors import DataError

REPO = Path(__file__).resolve().parents[1]
KS = (1, 2, 4)  # grid refinements: voxel size 4h, 2h, h for the same physical shape; finest ≈ 124³


# ----------------------------------------------------------------------------------------------- shapes


class Cylinder(tp.NamedTuple):
    labels: np.ndarray
    voxel_um: float
    r_rm: float  # µm: residual material core radius
    r_o: float  # µm: outer radius of the degradation layer shell = implant radius
    length: float  # µm
    roi: float  # µm: R of BV/TV

    @property
    def surface(self) -> float:  # µm², lateral + 2 caps
        return 2 * math.pi * self.r_o * self.length + 2 * math.pi * self.r_o ** 2

    @property
    def lateral(self) -> float:
        return 2 * math.pi * self.r_o * self.length

    @property
    def roi_volume(self) -> float:
        """Steiner: volume within R of a cylinder, minus the cylinder (lateral shell, caps, two rim tori)."""
        r, L, R = self.r_o, self.length, self.roi
        return (math.pi * (2 * r * R + R * R) * L + 2 * math.pi * r * r * R + math.pi ** 2 * r * R * R
                + 4 / 3 * math.pi * R ** 3)


def cylinder(k: int, bone: str = "none", *, sector_deg: float = 120.0) -> Cylinder:
    """Implant along z: RM core radius 5 units, DL shell to 8 units, length 24, ROI R = 6 units; one unit
    = k voxels of 40/k µm (same physical shape at every k). The axis is off the voxel grid by a fraction.

    bone: "none"; "sector" = a bone shell (3 units thick) on the lateral surface over ``sector_deg``
    centred on +x; "wedge" = bone within 3 units of the implant (lateral and caps) in that sector;
    "half_shell" = bone from the implant out to R/2 (lateral only) on the +x half."""
    r_o, r_rm, L, R = 8 * k, 5 * k, 24 * k, 6 * k
    n, nz = 2 * (r_o + R) + 4, L + 2 * R + 4
    cz, c = (nz - 1) / 2 + 0.21, (n - 1) / 2 + 0.13
    z, y, x = np.ogrid[:nz, :n, :n]
    rr = np.hypot(y - c, x - c)
    phi = np.degrees(np.arctan2(y - c, x - c))
    in_z = np.abs(z - cz) <= L / 2
    in_sector = (phi + sector_deg / 2) % 360 < sector_deg
    lab = np.zeros((nz, n, n), np.uint8)
    if bone == "sector":
        lab[(rr <= r_o + 3 * k) & in_z & in_sector] = 1
    elif bone == "wedge":
        lab[(rr <= r_o + 3 * k) & (np.abs(z - cz) <= L / 2 + 3 * k) & in_sector] = 1
    elif bone == "half_shell":
        lab[(rr <= r_o + R / 2) & in_z & (x > c)] = 1
    lab[(rr <= r_o) & in_z] = 2
    lab[(rr <= r_rm) & in_z] = 3
    h = 40.0 / k
    return Cylinder(lab, h, r_rm * h, r_o * h, L * h, R * h)


def measure(cyl: Cylinder, **kw) -> dict[str, float]:
    return implant_measures(cyl.labels, voxel_size_um=cyl.voxel_um, roi_um=cyl.roi, **kw)


def rel_errors(values: tp.Sequence[float], truth: float) -> list[float]:
    return [abs(v - truth) / abs(truth) for v in values]


def blobs(shape=(40, 44, 48), seed: int = 3) -> np.ndarray:
    """All four classes in irregular blobs, touching each other and the volume border."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0)
    b = ndimage.gaussian_filter(rng.standard_normal(shape), 4.0)
    lab = np.zeros(shape, np.uint8)
    lab[b > 0.02] = 1
    lab[a > 0.03] = 2
    lab[a > 0.06] = 3
    return lab


def write_h5(path: Path, lab: np.ndarray, key: str = "labels") -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=lab, chunks=tuple(min(16, s) for s in lab.shape), compression="lzf")
    return path


# ----------------------------------------------------------------------------------------------- equations


def test_degradation_rate_by_hand():
    # (10 − 6.5) mm³ / (25 mm² · 0.5 year) = 0.28 mm/year
    assert degradation_rate(10.0, 6.5, 25.0, 365.25 / 2) == pytest.approx(0.28, rel=1e-12)
    # residual larger than initial: negative rate, not clipped (segmentation error shows)
    assert degradation_rate(1.0, 1.2, 2.0, 365.25) == pytest.approx(-0.1, rel=1e-12)
    for bad in ((0.0, 1, 1, 1), (1, 1, 0.0, 1), (1, 1, 1, 0.0), (1, 1, 1, -3.0), (1, 1, 1, float("nan"))):
        with pytest.raises(DataError):
            degradation_rate(*bad)


def test_bic_and_bv_tv_helpers():
    assert bone_implant_contact(0.5, 2.0) == pytest.approx(25.0)
    assert bone_implant_contact(2.0, 2.0) == pytest.approx(100.0)
    assert math.isnan(bone_implant_contact(0.0, 0.0))
    assert bone_volume_fraction(0.3, 1.2) == pytest.approx(25.0)
    assert math.isnan(bone_volume_fraction(0.0, 0.0))


def test_dr_from_a_volume_and_missing_inputs():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[1:11, 1:11, 1:11] = 3  # 1000 RM voxels of (10 µm)³ = 1e-3 mm³
    lab[5, 5, 5] = 2  # one DL voxel: not residual material
    res = implant_measures(lab, voxel_size_um=10.0, roi_um=20.0, initial_volume_mm3=0.003, initial_surface_mm2=0.1,
                           days=365.25)
    assert res["residual_volume_mm3"] == pytest.approx(0.999e-3)
    assert res["implant_volume_mm3"] == pytest.approx(1e-3)
    assert res["dr_mm_per_year"] == pytest.approx((0.003 - 0.999e-3) / 0.1)
    assert math.isnan(implant_measures(lab, voxel_size_um=10.0, roi_um=20.0, days=30)["dr_mm_per_year"])


def test_required_keys_and_empty_implant():
    res = implant_measures(np.ones((6, 7, 8), np.uint8), voxel_size_um=5.0, roi_um=10.0)
    for key in ("dr_mm_per_year", "bic_percent", "bv_tv_percent", "residual_volume_mm3", "implant_volume_mm3",
                "implant_surface_mm2", "contact_surface_mm2", "bone_volume_mm3", "roi_volume_mm3", "voxel_size_um",
                "roi_um"):
        assert key in res
    assert res["implant_surface_mm2"] == 0 and res["roi_volume_mm3"] == 0
    assert math.isnan(res["bic_percent"]) and math.isnan(res["bv_tv_percent"])


def test_volume_border_is_not_a_surface():
    """An implant cut by the field of view: only its real face counts; the ROI ends at the border."""
    lab = np.zeros((20, 16, 16), np.uint8)
    lab[:10] = 3
    lab[10:13] = 1
    res = implant_measures(lab, voxel_size_um=1.0, roi_um=5.0, slab=4)
    assert res["implant_surface_mm2"] * 1e6 == pytest.approx(16 * 16, rel=1e-9)
    assert res["bic_percent"] == pytest.approx(100.0, rel=1e-9)
    assert res["roi_volume_mm3"] * 1e9 == pytest.approx(5 * 16 * 16)  # layers 10..14
    assert res["bv_tv_percent"] == pytest.approx(60.0)


# ----------------------------------------------------------------------------------------------- convergence


def test_cylinder_volume_and_surface_converge():
    """RM volume and implant surface (lateral + caps) → analytic. Surface within 2 % at the finest grid
    (measured −5.1 %, −2.6 %, −1.3 %: the rims are rounded over ~1 voxel, an error ∝ voxel size);
    plain face counting gives +21 % on every grid."""
    cyls = [cylinder(k) for k in KS]
    res = [measure(c) for c in cyls]
    c = cyls[0]
    v_rm = math.pi * c.r_rm ** 2 * c.length * 1e-9
    v_imp = math.pi * c.r_o ** 2 * c.length * 1e-9
    e_rm = rel_errors([r["residual_volume_mm3"] for r in res], v_rm)
    e_imp = rel_errors([r["implant_volume_mm3"] for r in res], v_imp)
    e_a = rel_errors([r["implant_surface_mm2"] for r in res], c.surface * 1e-6)
    assert e_rm[-1] < 0.01 and e_imp[-1] < 0.01, (e_rm, e_imp)
    assert e_a[0] > e_a[1] > e_a[2], e_a
    assert e_a[-1] < 0.02, e_a
    assert all(r["contact_surface_mm2"] == 0 for r in res)


@pytest.mark.parametrize("k", [2, 4])
def test_sphere_surface_within_one_percent(k):
    """No edges: the estimator's error floor (staircase, curvature) is under 1 %."""
    r = 8 * k
    n = 2 * r + 8
    c = (n - 1) / 2 + 0.17
    z, y, x = np.ogrid[:n, :n, :n]
    lab = np.where((z - c) ** 2 + (y - c + 0.11) ** 2 + (x - c) ** 2 <= r * r, 3, 0).astype(np.uint8)
    res = implant_measures(lab, voxel_size_um=1.0, roi_um=2.0)
    assert res["implant_surface_mm2"] * 1e6 == pytest.approx(4 * math.pi * r * r, rel=0.01)


def test_bic_lateral_sector_converges():
    """Bone on 120° of the lateral surface, centred on a grid axis (where plain face counts are most biased:
    they give BIC 26.9 % instead of 25.0 % here). Contact area error decreasing (measured 5.9 %, 2.6 %,
    0.6 %), BIC within 1.5 % (relative) of the analytic value on every grid (measured 0.8 %, 0.02 %, 0.7 %:
    the contact and rim errors partly cancel, the rest is the estimator's orientation floor of ~0.6 %)."""
    cyls = [cylinder(k, "sector") for k in KS]
    res = [measure(c) for c in cyls]
    c = cyls[0]
    truth = 100 * (c.lateral / 3) / c.surface
    e_c = rel_errors([r["contact_surface_mm2"] for r in res], c.lateral / 3 * 1e-6)
    e_bic = rel_errors([r["bic_percent"] for r in res], truth)
    assert e_c[0] > e_c[1] > e_c[2] and e_c[-1] < 0.01, e_c
    assert max(e_bic) < 0.015, e_bic


def test_bic_wedge_is_a_third():
    """Bone over a 120° wedge of the whole implant (lateral and caps): exactly a third of the surface;
    the rim error cancels in the ratio (measured 32.66 %, 32.99 %, 33.33 %)."""
    res = [measure(cylinder(k, "wedge")) for k in KS]
    err = [abs(r["bic_percent"] - 100 / 3) for r in res]
    assert err[0] > err[1] > err[2], err
    assert err[-1] < 0.3, err


def test_bv_tv_converges():
    """Bone filling the ROI from the implant out to R/2 on one half (lateral part). ROI volume vs the
    Steiner formula and BV/TV vs analytic within 3 % at the finest grid, errors decreasing (measured ROI
    −6.6 %, −4.6 %, −2.0 %; BV/TV +7.6 %, +5.1 %, +2.6 %: the ROI is ~0.3 voxel thinner on curved surfaces)."""
    cyls = [cylinder(k, "half_shell") for k in KS]
    res = [measure(c) for c in cyls]
    c = cyls[0]
    bone = math.pi * ((c.r_o + c.roi / 2) ** 2 - c.r_o ** 2) * c.length / 2
    e_roi = rel_errors([r["roi_volume_mm3"] for r in res], c.roi_volume * 1e-9)
    e_bv = rel_errors([r["bone_volume_mm3"] for r in res], bone * 1e-9)
    e_frac = rel_errors([r["bv_tv_percent"] for r in res], 100 * bone / c.roi_volume)
    assert e_roi[0] > e_roi[1] > e_roi[2] and e_roi[-1] < 0.03, e_roi
    assert e_bv[-1] < 0.01, e_bv
    assert e_frac[0] > e_frac[1] > e_frac[2] and e_frac[-1] < 0.03, e_frac


# ----------------------------------------------------------------------------------------------- exactness


def test_roi_matches_in_memory_distance_transform():
    """The slab-wise separable ROI equals scipy's 3D EDT on the whole volume, voxel count for voxel count,
    and the degradation layer never enters the ROI."""
    lab = blobs()
    h, roi_um = 2.5, 9.0
    imp = lab >= 2
    dist = ndimage.distance_transform_edt(~imp, sampling=h)
    roi = (dist <= roi_um) & ~imp
    res = implant_measures(lab, voxel_size_um=h, roi_um=roi_um, slab=5)
    voxel = (h * 1e-3) ** 3
    assert res["roi_volume_mm3"] == pytest.approx(roi.sum() * voxel, rel=1e-12)
    assert res["bone_volume_mm3"] == pytest.approx((roi & (lab == 1)).sum() * voxel, rel=1e-12)
    # relabelling DL as RM changes nothing but the residual volume: DL is implant, never ROI
    res2 = implant_measures(np.where(lab == 2, 3, lab).astype(np.uint8), voxel_size_um=h, roi_um=roi_um, slab=5)
    for key in ("roi_volume_mm3", "bone_volume_mm3", "implant_surface_mm2", "contact_surface_mm2"):
        assert res2[key] == pytest.approx(res[key], rel=1e-12)


def test_slab_size_does_not_change_the_result(tmp_path):
    lab = blobs()
    path = write_h5(tmp_path / "blobs.h5", lab)
    kw = dict(voxel_size_um=3.0, roi_um=12.0, initial_volume_mm3=1e-3, initial_surface_mm2=0.05, days=60.0)
    whole = implant_measures(lab, slab=lab.shape[0], **kw)
    with h5py.File(path, "r") as f:
        results = [implant_measures(f["labels"], slab=s, **kw) for s in (8, 1, 13)]
    assert whole["implant_surface_mm2"] > 0 and whole["contact_surface_mm2"] > 0 and whole["roi_volume_mm3"] > 0
    for res in results:
        assert res.keys() == whole.keys()
        for key, v in whole.items():
            assert res[key] == pytest.approx(v, rel=1e-9, abs=0), key


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("lab, text", [
    (np.zeros((4, 4), np.uint8), "3D"),
    (np.zeros((4, 4, 4), np.float32), "integers"),
    (np.full((4, 4, 4), 4, np.uint8), "0..3"),
    (np.full((4, 4, 4), -1, np.int16), "0..3"),
])
def test_bad_label_arrays(lab, text):
    with pytest.raises(DataError, match=text):
        implant_measures(lab, voxel_size_um=1.0, roi_um=1.0)


@pytest.mark.parametrize("kw, field", [(dict(voxel_size_um=0.0), "voxel_size_um"), (dict(roi_um=-1.0), "roi_um"),
                                       (dict(days=0.0), "days"), (dict(slab=0), "slab")])
def test_bad_numbers(kw, field):
    args = dict(voxel_size_um=1.0, roi_um=1.0) | kw
    with pytest.raises(DataError, match=field):
        implant_measures(np.zeros((4, 4, 4), np.uint8), **args)


# ----------------------------------------------------------------------------------------------- CLI


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json(tmp_path, capsys):
    cyl = cylinder(1, "sector")
    path = write_h5(tmp_path / "pred.h5", cyl.labels)
    rc, out, err = run_cli(capsys, path, "--dataset", "labels", "--voxel-size-um", cyl.voxel_um, "--roi-um", cyl.roi,
                           "--initial-volume-mm3", 0.2, "--initial-surface-mm2", 2.0, "--days", 28, "--json",
                           "--slab", 7)
    assert rc == 0, err
    doc = json.loads(out)
    expected = measure(cyl, initial_volume_mm3=0.2, initial_surface_mm2=2.0, days=28.0)
    for key, v in expected.items():
        assert doc[key] == pytest.approx(v, rel=1e-9), key
    assert doc["dr_mm_per_year"] == pytest.approx((0.2 - expected["residual_volume_mm3"]) / (2.0 * 28 / 365.25))
    assert doc["labels"].endswith("pred.h5:/labels")
    # without DR inputs: null, not NaN (valid JSON); without --json a table
    rc, out, _ = run_cli(capsys, path, "--voxel-size-um", cyl.voxel_um, "--json")
    assert rc == 0 and json.loads(out)["dr_mm_per_year"] is None and json.loads(out)["roi_um"] == 100.0
    rc, out, _ = run_cli(capsys, path, "--voxel-size-um", cyl.voxel_um, "--roi-um", cyl.roi)
    assert rc == 0 and "BIC (Eq. 2)" in out and f"{expected['bic_percent']:.2f}" in out and "DR needs" in out


def test_cli_tiff_folder(tmp_path, capsys):
    import tifffile

    lab = blobs((12, 20, 22))
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, s in enumerate(lab):
        tifffile.imwrite(folder / f"slice_{i}.tif", s)
    rc, out, err = run_cli(capsys, folder, "--voxel-size-um", 2.0, "--roi-um", 6, "--json")
    assert rc == 0, err
    expected = implant_measures(lab, voxel_size_um=2.0, roi_um=6.0)
    assert json.loads(out)["bv_tv_percent"] == pytest.approx(expected["bv_tv_percent"], rel=1e-9)


BAD_CLI = {  # case: (arguments after LABELS, file written as LABELS, texts the one-line message must hold)
    "missing file": (("--voxel-size-um", 5), None, ("missing.h5", "does not exist")),
    "missing dataset": (("--dataset", "nope", "--voxel-size-um", 5), np.zeros((4, 5, 6), np.uint8),
                        ("good.h5", "/nope")),
    "2D": (("--voxel-size-um", 5), np.zeros((5, 6), np.uint8), ("good.h5", "3D")),
    "float": (("--voxel-size-um", 5), np.zeros((4, 5, 6), np.float32), ("good.h5", "integers")),
    "values > 3": (("--voxel-size-um", 5), np.full((4, 5, 6), 7, np.uint8), ("good.h5", "0..3", "7")),
    "voxel size 0": (("--voxel-size-um", 0), np.zeros((4, 5, 6), np.uint8), ("--voxel-size-um", "positive")),
    "roi < 0": (("--voxel-size-um", 5, "--roi-um", -2), np.zeros((4, 5, 6), np.uint8), ("--roi-um",)),
    "days 0": (("--voxel-size-um", 5, "--days", 0), np.zeros((4, 5, 6), np.uint8), ("--days",)),
    "slab 0": (("--voxel-size-um", 5, "--slab", 0), np.zeros((4, 5, 6), np.uint8), ("--slab",)),
    "no voxel size": ((), np.zeros((4, 5, 6), np.uint8), ("--voxel-size-um", "required")),
    "not a number": (("--voxel-size-um", "five"), np.zeros((4, 5, 6), np.uint8), ("--voxel-size-um", "five")),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_cli_bad_input(tmp_path, capsys, case):
    args, data, texts = BAD_CLI[case]
    path = tmp_path / ("missing.h5" if data is None else "good.h5")
    if data is not None:
        write_h5(path, data)
    try:
        rc = main([str(path)] + [str(a) for a in args])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in texts:
        assert text in err, (text, err)


def test_cli_subprocess_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "analysis.measures", str(tmp_path / "nothere.h5"), "--voxel-size-um", "5"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "nothere.h5" in proc.stderr and "Traceback" not in proc.stderr
