"""Split-conformal measure intervals (analysis.calibration): the rank rule, the bias correction, coverage on
exchangeable errors, and the table's round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.calibration import (MEASURES, Calibration, conformal_quantile, conformal_rank, coverage, fit_calibration,
                                  min_calibration_scans)


def test_the_rank_and_the_fewest_scans_for_a_level():
    assert conformal_rank(9, 0.1) == 9 and conformal_rank(30, 0.1) == 28
    assert min_calibration_scans(0.1) == 9 and min_calibration_scans(0.05) == 19
    assert math.isinf(conformal_quantile([1.0] * 8, 0.1))  # 8 scans cannot bound a 90 % interval
    assert conformal_quantile(list(range(1, 10)), 0.1) == 9


def _records(rng, n, bias, scale, start=0):
    """Scans whose ML measure is HQ + bias + noise (spread ∝ the noise's scale: members that disagree where it is
    hard); the HQ values vary as a population's do."""
    out = []
    for i in range(n):
        s = scale * rng.uniform(0.5, 2.0)
        hq = {m: rng.uniform(40, 80) for m in MEASURES}
        err = {m: bias + s * rng.normal() for m in MEASURES}
        out.append({"id": f"s{start + i}", "hq": hq, "ml": {m: hq[m] + err[m] for m in MEASURES},
                    "members": {m: list(hq[m] + err[m] + s * rng.normal(size=4)) for m in MEASURES},
                    "plane": {m: [hq[m] + err[m] - 1.0, hq[m] + err[m] + 1.0] for m in MEASURES}})
    return out


def test_conformal_intervals_cover_as_often_as_they_say_even_with_a_one_sided_bias():
    rng = np.random.default_rng(0)
    hits = {"conformal": [], "conformal_normalised": []}
    for _ in range(200):
        cal = fit_calibration(_records(rng, 30, bias=12.0, scale=3.0), alpha=0.1)
        cov = coverage(cal, _records(rng, 30, bias=12.0, scale=3.0))
        for k in hits:
            hits[k].append(cov["bic_percent"][k]["coverage"])
        # a one-sided bias of 12 with noise 3: the bias-corrected centre is far nearer HQ than ML is
        assert abs(cal.measures["bic_percent"].bias - 12.0) < 3.0
    for k, h in hits.items():
        assert 0.87 <= float(np.mean(h)) <= 0.95, (k, np.mean(h))  # ≥ 1 − α on average, not much more
    # the plane interval (±1) is blind to the bias: it almost never holds HQ
    assert cov["bic_percent"]["plane_disagreement"]["coverage"] < 0.2


def test_the_table_round_trips_through_json(tmp_path):
    rng = np.random.default_rng(1)
    cal = fit_calibration(_records(rng, 5, bias=1.0, scale=1.0), alpha=0.1, model="models:/screws/1", note="synthetic")
    assert math.isinf(cal.measures["dr_mm_per_year"].q_absolute)  # 5 < 9 scans: no finite 90 % interval
    back = Calibration.read(cal.write(tmp_path / "calibration.json"))
    assert back == cal and back.n == 5
    assert back.interval("bic_percent", 50.0) == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="not a calibration table"):
        Calibration.from_json({"format": 1}, "x.json")


@pytest.fixture(scope="module")
def hq_scans(tmp_path_factory):
    """Three synthetic HQ-labelled explants (32³, prepared at 5 µm) and two tiny untrained U-nets."""
    from data.prepare import prepare_dataset
    from data.synth import write_dataset
    from model.unet import build_unet

    root = tmp_path_factory.mktemp("calibration")
    write_dataset(root / "raw", n_train=0, n_test=3, shape=(32, 32, 32), seed=7)
    prepare_dataset(root / "raw", root / "prepared", voxel_size_um=5.0, clip_percentiles=(0.5, 99.9))
    models = []
    for i in range(2):
        build_unet(4, 2).save(root / f"fold{i}.keras")
        models.append(str(root / f"fold{i}.keras"))
    return root, models


def test_calibrate_fits_the_errors_of_each_scan_and_segment_centres_its_interval_on_them(hq_scans, tmp_path, capsys):
    import json

    from analysis.__main__ import main as analysis_main
    from analysis.calibrate import sample_measures
    from analysis.segment import main as segment_main
    from data.manifest import load_dataset
    from data.volume import open_volume

    root, models = hq_scans
    out = tmp_path / "cal.json"
    args = ["calibrate", "--scans", str(root / "prepared"), "--alpha", "0.25", "--out", str(out)]
    assert analysis_main(args + [a for m in models for a in ("--model", m)]) == 0
    cal = Calibration.read(out)
    assert cal.n == 3 and {s["id"] for s in cal.scans} == {"synth01", "synth02", "synth03"}
    ds = load_dataset(root / "prepared")
    s0 = next(s for s in ds.samples if s.id == "synth01")
    with open_volume(s0.label) as lab:
        hq = sample_measures(lab, s0, 100.0)
    bic = cal.measures["bic_percent"]
    assert len(bic.errors) == 3 and all(not math.isnan(x) for x in bic.spreads)  # two members: a spread each
    assert math.isfinite(bic.q_absolute)  # n = 3 suffices at α = 0.25
    assert analysis_main(args + ["--model", models[0]]) == 2  # exists: refused without --overwrite
    assert "--out" in capsys.readouterr().err
    # A scan segmented with the table: its conformal interval is [ML − bias − q, ML − bias + q], named in the report.
    seg = tmp_path / "seg"
    assert segment_main([str(root / "raw" / "synth01.h5"), "--model", models[0], "--model", models[1],
                         "--model-voxel-size", "5", "--out", str(seg), "--calibration", str(out), "--no-progress"]) == 0
    report = json.loads((seg / "report.json").read_text())
    ml = report["measures"]["bic_percent"]
    lo, hi = report["conformal_intervals"]["bic_percent"]
    assert lo == pytest.approx(ml - bic.bias - bic.q_absolute) and hi == pytest.approx(ml - bic.bias + bic.q_absolute)
    assert report["calibration"]["scans"] == 3 and report["calibration"]["alpha"] == 0.25
    assert "conformal interval" in (seg / "report.md").read_text()
    # the table's first error is synth01's ML − HQ: the same ensemble segments the same scan to the same labels
    assert bic.errors[0] == pytest.approx(ml - hq["bic_percent"], abs=1e-9)


def test_table3_shows_the_conformal_interval_of_the_ml_rows_and_names_its_calibration(tmp_path):
    from analysis.table3 import run_measures, table3, table3_latex, table3_markdown, write_table3

    recs = [{"id": f"c{i}", "digest": "x", "hq": {m: 50.0 for m in MEASURES},
             "ml": {m: 50.0 + 10.0 + d for m in MEASURES}} for i, d in enumerate(np.linspace(-2, 2, 9))]
    cal = fit_calibration(recs, alpha=0.1)  # bias +10, errors ±2 around it: q = 2 (the 9th of 9 scores)
    values = {"s1": {"HQ": {"dr_mm_per_year": 0.2, "bic_percent": 50.0, "bv_tv_percent": 40.0}, "WF": None,
                     "ML": [{"dr_mm_per_year": 0.3, "bic_percent": 61.0, "bv_tv_percent": 52.0}],
                     "folds": [0, 1, 2, 3], "days": 28.0, "methods": {"avr_9"}, "ensemble": [0, 1, 2, 3]}}
    df = table3(values, calibration=cal)
    md = table3_markdown(df)
    assert "61.0 (+22.0%) ⟨49.0–53.0⟩" in md and "52.0 (+30.0%) ⟨40.0–44.0⟩" in md
    assert "conformal interval (split conformal, α = 0.1 (90 % intervals), calibrated on 9 scans)" in md
    assert r"61.0 (+22.0\%) $\langle$49.0--53.0$\rangle$" in table3_latex(df)
    written = write_table3(df, tmp_path)
    csv = next(p for p in written if p.suffix == ".csv").read_text()
    assert "bic_percent_conf_lo" in csv.splitlines()[0]
    # the same rows as a fusing run's artifact (analysis.table3.log_measures_to_runs)
    doc = run_measures(df, ["s1"])
    assert doc["samples"]["s1"]["ML"]["bic_percent"]["conformal"] == pytest.approx([49.0, 53.0])
    assert doc["samples"]["s1"]["HQ"]["bic_percent"] == {"value": 50.0, "relative_to_hq_percent": None}
    assert "calibrated on 9 scans" in doc["calibration"]
