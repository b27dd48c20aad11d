"""analysis: Fig. 3 table, Table 2, Table 3, Pareto front and missing-run report from a local MLflow store
filled with runs whose per-fold values the test chose; checked number by number."""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from analysis import reports as R
from analysis.__main__ import main
from analysis.pareto import optuna_table, pareto_mask
from analysis.results import config_table, config_table_from_runs, fig3_configs
from analysis.store import read_runs
from analysis.table2 import METHODS, table2, table2_markdown
from analysis.table3 import table3, table3_latex, table3_markdown

ROOT = Path(__file__).resolve().parents[1]
EXP, FEXP = "scaling-unet", "scaling-unet-fusing"
CLASSES = ("iou_bone", "iou_degradation_layer", "iou_residual_material")

# Training: (width, depth, input size) -> mean_iou of folds 0..3 (None = no FINISHED run for that fold).
TRAIN = {
    (32, 3, 384): [0.890, 0.880, 0.900, 0.894],
    (64, 3, 384): [0.900, 0.896, 0.904, 0.892],
    (32, 4, 384): [0.895, 0.899, 0.893, None],   # fold 3 FAILED: 3 of 4 folds
    (32, 3, 512): [0.891, 0.887, 0.899, 0.897],
}
CLASS_OFFSETS = (0.05, -0.10, 0.05)  # per-class IoU = mean_iou + offset (mean over classes = mean_iou)
# Optuna trials (fold 0): (width, depth, input size, flops, mean_iou); front = indices 0, 1, 4.
OPTUNA = [(32, 3, 384, 1e10, 0.80), (64, 3, 384, 2e10, 0.85), (32, 4, 384, 1.5e10, 0.79),
          (64, 4, 384, 4e10, 0.85), (96, 5, 512, 5e10, 0.90), (112, 5, 640, 6e10, 0.88)]
# Table 2: per method base IoU (bone, DL, RM); fold offsets added; mv_9 has folds 0, 1, 3 only.
BASE = {"baseline_rc": (0.950, 0.780, 0.930), "baseline_cp": (0.948, 0.775, 0.925),
        "baseline_pr": (0.951, 0.779, 0.931), "avr_3": (0.955, 0.800, 0.945), "mv_3": (0.954, 0.795, 0.944),
        "avr_9": (0.953, 0.813, 0.940), "mv_9": (0.960, 0.790, 0.946)}
FOLD_OFFSET = (0.004, -0.002, 0.001, -0.003)
MV9_FOLDS = (0, 1, 3)
BEST = {"iou_bone": "avr_3", "iou_degradation_layer": "avr_9", "iou_residual_material": "avr_3", "mean_iou": "avr_9"}
FUSING_KEY = "fusecfg00001"


def flops_of(w, d, s):
    return float(w * w * d * s * s)


def key_of(w, d, s):
    return f"k{w}-{d}-{s}"


def fusing_values(method, fold):
    return [b + FOLD_OFFSET[fold] for b in BASE[method]]


# ----------------------------------------------------------------------------------------------- volumes


def implant_volume(n=24, *, dl_shift=0, bone_extra=0):
    """A screw (RM) with a degradation layer shell and bone on one side, labels 0..3 (z, y, x)."""
    z, y, x = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    r = np.hypot(y - n / 2 + 0.5, x - n / 2 + 0.5)
    lab = np.zeros((n, n, n), np.uint8)
    lab[(r < 8 + bone_extra) & (x < n / 2 + 2)] = 1
    lab[r < 6 + dl_shift * 0.5] = 2
    lab[r < 4] = 3
    lab[:2] = 0
    return lab


def stub_measures(calls):
    def fn(arr, *, voxel_size_um, roi_um, initial_volume_mm3, initial_surface_mm2, days, slab):
        a = np.asarray(arr[:])
        calls.append(dict(voxel_size_um=voxel_size_um, roi_um=roi_um, days=days, slab=slab))
        n = np.bincount(a.ravel(), minlength=4)
        return {"dr_mm_per_year": n[3] / 1000, "bic_percent": n[1] / 100, "bv_tv_percent": n[2] / 50,
                "other": 1.0}
    return fn


def write_dataset(root: Path) -> dict:
    """A 'prepared dataset' with 2 test samples (HQ label + WF label) and per-fold prediction files."""
    from data.manifest import Sample, write_manifest
    from data.volume import VolumeRef

    root.mkdir(parents=True)
    samples, preds = [], {f: {} for f in range(4)}
    for i, sid in enumerate(("t01", "t02")):
        hq = implant_volume(bone_extra=i)
        wf = implant_volume(dl_shift=-2, bone_extra=i)
        img = hq.astype(np.float32) / 3
        with h5py.File(root / f"{sid}.h5", "w") as f:
            f["image"], f["label"], f["label_wf"] = img, hq, wf
        samples.append(Sample(id=sid, image=VolumeRef(root / f"{sid}.h5", "/image"),
                              label=VolumeRef(root / f"{sid}.h5", "/label"),
                              wf_label=VolumeRef(root / f"{sid}.h5", "/label_wf"), voxel_size_um=5.0,
                              alloy="Mg-10Gd", beamline="P05", implantation_days=28.0 * (i + 1), label_quality="HQ",
                              split="test", initial_volume_mm3=0.05, initial_surface_mm2=0.9))
        for fold in range(4):
            ml = implant_volume(bone_extra=i, dl_shift=fold - 1)
            p = root / "pred" / f"fold{fold}" / f"{sid}.h5"
            p.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(p, "w") as f:
                f["labels"] = ml
            preds[fold][sid] = str(p)
    write_manifest(root, samples)
    return preds


# ----------------------------------------------------------------------------------------------- store


def new_run(client, exp_id, tags, params, metrics, status="FINISHED", end_time=None, name=None):
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, tags=tags, run_name=name)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()], synchronous=True)
    client.set_terminated(run.info.run_id, status=status, end_time=end_time)
    return run.info.run_id


def fill_store(tmp: Path, *, with_fusing=True, with_predictions=True):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXP, artifact_location=(tmp / "artifacts").as_uri())
    t0 = 1_700_000_000_000
    for (w, d, s), folds in TRAIN.items():
        for fold, v in enumerate(folds):
            params = {"model.width": w, "model.depth": d, "model.input_size": s, "fold": fold}
            metrics = {"flops": flops_of(w, d, s), "params": w * d, "paper_flops": flops_of(w, d, s)}
            tags = {"config_key": key_of(w, d, s), "fold": str(fold), "experiment": "compound"}
            if v is None:
                new_run(client, exp, tags, params, metrics, status="FAILED")
                continue
            metrics.update({"mean_iou": v, **{c: v + o for c, o in zip(CLASSES, CLASS_OFFSETS)}})
            new_run(client, exp, tags, params, metrics, end_time=t0 + 1000 * fold)
    # an older duplicate of (32,3,384) fold 0 with a wild value: the latest FINISHED run wins
    new_run(client, exp, {"config_key": key_of(32, 3, 384), "fold": "0", "experiment": "compound"},
            {"model.width": 32, "model.depth": 3, "model.input_size": 384, "fold": 0},
            {"mean_iou": 0.1, "flops": flops_of(32, 3, 384)}, end_time=t0 - 10_000)
    # a parent run: no fold tag, must be ignored
    new_run(client, exp, {"config_key": key_of(64, 3, 384), "is_parent": "true"},
            {"model.width": 64, "model.depth": 3, "model.input_size": 384}, {"mean_iou": 0.5})
    for i, (w, d, s, fl, v) in enumerate(OPTUNA):
        new_run(client, exp, {"config_key": f"opt{i}", "fold": "0", "experiment": "optuna"},
                {"model.width": w, "model.depth": d, "model.input_size": s, "fold": 0, "train.learning_rate": 1e-4 * (i + 1)},
                {"flops": fl, "mean_iou": v, **{c: v for c in CLASSES}})
    if not with_fusing:
        return uri, client
    fexp = client.create_experiment(FEXP, artifact_location=(tmp / "fusing-artifacts").as_uri())
    preds = write_dataset(tmp / "dataset") if with_predictions else {}
    for method in METHODS:
        for fold in range(4):
            if method == "mv_9" and fold not in MV9_FOLDS:
                continue
            vals = fusing_values(method, fold)
            rid = new_run(client, fexp, {"config_key": FUSING_KEY, "fold": str(fold), "task": "fusing",
                                         "fusing_method": method},
                          {"model.width": 64, "model.depth": 5, "model.input_size": 640, "fold": fold},
                          {**dict(zip(CLASSES, vals)), "mean_iou": sum(vals) / 3})
            if method == "avr_3" and with_predictions:
                doc = {"dataset": str(tmp / "dataset"), "method": method, "samples": preds[fold]}
                client.log_text(rid, json.dumps(doc), "predictions.json")
    return uri, client


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    uri, _ = fill_store(tmp)
    return uri, tmp


@pytest.fixture(scope="module")
def runs(store):
    return read_runs(store[0], EXP)


# ----------------------------------------------------------------------------------------------- Fig. 3 table


def se(vals):
    return statistics.stdev(vals) / math.sqrt(len(vals))


def test_fig3_table_number_by_number(store, runs):
    assert runs.search_calls == 1
    table = config_table_from_runs(runs.training)
    assert len(table) == len(TRAIN)  # the Optuna trial at (32,3,384) and the parent run are not configs
    for (w, d, s), folds in TRAIN.items():
        row = table[(table.width == w) & (table.depth == d) & (table.input_size == s)].iloc[0]
        vals = [v for v in folds if v is not None]
        assert row.config_key == key_of(w, d, s)
        assert row.n_folds == len(vals)
        assert row.mean_iou == pytest.approx(statistics.mean(vals), abs=1e-12)
        assert row.mean_iou_se == pytest.approx(se(vals), abs=1e-12)
        assert row.iou_degradation_layer == pytest.approx(statistics.mean(vals) - 0.10, abs=1e-12)
        assert row.flops == flops_of(w, d, s)
        assert bool(row.complete) == (len(vals) == 4)
    # the compatibility entry point gives the same table
    pd.testing.assert_frame_equal(config_table(store[0], EXP), table)


def test_fig3_duplicate_run_uses_latest(runs):
    table = config_table_from_runs(runs.training)
    row = table[table.config_key == key_of(32, 3, 384)].iloc[0]
    assert row.n_folds == 4 and row.mean_iou == pytest.approx(statistics.mean(TRAIN[(32, 3, 384)]))


def test_missing_report(runs, tmp_path):
    part = R.missing_part(runs, tmp_path)
    df = pd.read_csv(tmp_path / "missing.csv", dtype=str, keep_default_na=False)
    inc = df[(df.kind == "training") & (df.config_key == key_of(32, 4, 384))]
    assert len(inc) == 1
    assert inc.iloc[0].present_folds == "0,1,2" and inc.iloc[0].missing_folds == "3"
    assert "FAILED" in inc.iloc[0].note
    absent = df[(df.kind == "training") & (df.present_folds == "")]
    assert len(absent) == 48 - len(TRAIN)  # every other grid config is reported absent
    dup = df[df.kind == "training (duplicate)"]
    assert list(dup.config_key) == [key_of(32, 3, 384)]
    mv9 = df[(df.kind == "fusing") & (df.method == "mv_9")]
    assert list(mv9.missing_folds) == ["2"] and list(mv9.present_folds) == ["0,1,3"]
    assert set(df[df.kind == "fusing"].method) == {"mv_9"}
    md = (tmp_path / "missing.md").read_text()
    assert key_of(32, 4, 384) in md and "| fusing |" in md
    assert any("32,4" in w or "c0=32 d=4 IS=384" in w for w in part.warnings)
    assert any("44 of 48 grid configs" in w for w in part.warnings)


def test_fig3_marks_incomplete_and_writes_png_pdf(runs, tmp_path):
    part = R.fig3_part(runs, tmp_path)
    names = {p.name for p in part.written}
    assert names == {"fig3.png", "fig3.pdf", "configs.csv"}
    assert (tmp_path / "fig3.png").stat().st_size > 10_000
    assert (tmp_path / "fig3.pdf").read_bytes()[:4] == b"%PDF"
    assert any("c0=32 d=4 IS=384" in w and "0,1,2" in w for w in part.warnings)
    csv = pd.read_csv(tmp_path / "configs.csv")
    row = csv[csv.config_key == key_of(32, 4, 384)].iloc[0]
    assert row.n_folds == 3 and not row.complete
    assert not list(tmp_path.glob(".*tmp*"))


def test_fig3_configs_one_per_grid_point():
    t = pd.DataFrame({"config_key": ["a", "b", "c"], "width": [32, 32, 64], "depth": [3, 3, 3],
                      "input_size": [384, 384, 384], "n_folds": [2, 4, 4], "flops": [1.0, 1.0, 2.0],
                      "mean_iou": [0.9, 0.9, 0.9]})
    chosen, left = fig3_configs(t)
    assert list(chosen.config_key) == ["b", "c"] and list(left.config_key) == ["a"]


# ----------------------------------------------------------------------------------------------- Table 2


def expected_t2(method, col):
    folds = MV9_FOLDS if method == "mv_9" else range(4)
    per_fold = []
    for f in folds:
        vals = fusing_values(method, f)
        per_fold.append(sum(vals) / 3 if col == "mean_iou" else vals[CLASSES.index(col)])
    return statistics.mean(per_fold) * 100, se(per_fold) * 100


def test_table2_number_by_number(runs, tmp_path):
    df = table2(runs.fusing, FUSING_KEY)
    assert list(df.method) == list(METHODS)
    assert list(df.label) == ["Baseline S_rc", "Baseline S_cp", "Baseline S_pr", "Avr 3-planes", "MV 3-planes",
                              "Avr 9-planes", "MV 9-planes"]
    for r in df.itertuples():
        assert r.n_folds == (3 if r.method == "mv_9" else 4)
        assert r.complete == (r.method != "mv_9")
        for col in ("iou_bone", "iou_degradation_layer", "iou_residual_material", "mean_iou"):
            m, s = expected_t2(r.method, col)
            assert getattr(r, col) == pytest.approx(m, abs=1e-9), (r.method, col)
            assert getattr(r, f"{col}_se") == pytest.approx(s, abs=1e-9), (r.method, col)

    part, key = R.table2_part(runs, tmp_path)
    assert key == FUSING_KEY and "only one" in part.notes[0]
    csv = pd.read_csv(tmp_path / "table2.csv")
    m, s = expected_t2("avr_9", "iou_degradation_layer")
    row = csv[csv.method == "avr_9"].iloc[0]
    assert row.iou_degradation_layer == pytest.approx(m, abs=1e-6) and row.iou_degradation_layer_se == pytest.approx(s, abs=1e-6)
    assert csv[csv.method == "mv_9"].iloc[0].missing_folds == 2

    md = (tmp_path / "table2.md").read_text()
    tex = (tmp_path / "table2.tex").read_text()
    assert md == table2_markdown(df, title=md.splitlines()[0])
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ") and "Method" not in ln}
    cols = ["iou_bone", "iou_degradation_layer", "iou_residual_material", "mean_iou"]
    for method, label in zip(METHODS, df.label):
        label_md = label + ("*" if method == "mv_9" else "")
        cells = [c.strip() for c in lines[label_md].split("|")[2:-1]]
        for col, cell in zip(cols, cells):
            m, s = expected_t2(method, col)
            text = f"{m:.2f} ± {s:.2f}"
            assert cell == (f"**{text}**" if BEST[col] == method else text), (method, col, cell)
    # mv_9 has the highest bone and RM means but only 3 folds: marked, footnoted, never bold
    assert "MV 9-planes: mean over 3 of 4 folds only (folds 0,1,3; missing 2)" in md
    assert md.count("**") == 2 * len(BEST)
    assert r"\textbf{" + f"{expected_t2('avr_9', 'mean_iou')[0]:.2f}" + r" $\pm$ " in tex
    assert r"Baseline $S_{rc}$ &" in tex and r"MV 9-planes$^{*}$ &" in tex
    assert tex.count(r"\textbf{") == len(BEST)
    assert tex.count(r"\begin{tabular}") == 1 and tex.rstrip().endswith(r"\end{table}")


def test_table2_config_choice():
    from analysis.store import RunRecord
    from analysis.table2 import choose_config

    def rec(key, method, fold):
        return RunRecord(run_id=f"{key}{method}{fold}", experiment_id="1", status="FINISHED", start_time=0, end_time=fold,
                         run_name="", tags={"config_key": key, "fold": str(fold), "task": "fusing",
                                            "fusing_method": method}, params={}, metrics={})
    rs = [rec("a", m, f) for m in METHODS for f in range(4)] + [rec("b", "avr_3", 0)]
    key, why = choose_config(rs)
    assert key == "a" and "most" in why and "b (1)" in why
    assert choose_config(rs, "b")[0] == "b"
    with pytest.raises(ValueError, match="no FINISHED fusing runs for config 'c'"):
        choose_config(rs, "c")


# ----------------------------------------------------------------------------------------------- Table 3


def test_table3_formatting_with_stub_measures(store, runs, tmp_path):
    uri, tmp = store
    calls = []
    fn = stub_measures(calls)
    part = R.table3_part(runs, tmp_path, FUSING_KEY, roi_um=150, measures_fn=fn)
    assert part.skipped is None, part.skipped
    assert {p.name for p in part.written} == {"table3.csv", "table3.md", "table3.tex"}
    assert all(c["roi_um"] == 150 and c["voxel_size_um"] == 5.0 and c["slab"] == 64 for c in calls)
    assert len(calls) == 2 * (2 + 4)  # per sample: HQ, WF once; ML once per fold
    csv = pd.read_csv(tmp_path / "table3.csv")
    md = (tmp_path / "table3.md").read_text()
    for i, sid in enumerate(("t01", "t02")):
        hq = fn(implant_volume(bone_extra=i), voxel_size_um=5, roi_um=1, initial_volume_mm3=1, initial_surface_mm2=1,
                days=1, slab=1)
        wf = fn(implant_volume(dl_shift=-2, bone_extra=i), voxel_size_um=5, roi_um=1, initial_volume_mm3=1,
                initial_surface_mm2=1, days=1, slab=1)
        mls = [fn(implant_volume(bone_extra=i, dl_shift=f - 1), voxel_size_um=5, roi_um=1, initial_volume_mm3=1,
                  initial_surface_mm2=1, days=1, slab=1) for f in range(4)]
        rows = {r.segmentation: r for r in csv[csv["sample"] == sid].itertuples()}
        assert set(rows) == {"WF", "HQ", "ML"}
        assert rows["ML"].n_folds == 4 and rows["ML"].folds == "0,1,2,3"
        for key, fmt in (("dr_mm_per_year", ".3f"), ("bic_percent", ".1f"), ("bv_tv_percent", ".1f")):
            ml = statistics.mean(m[key] for m in mls)
            assert getattr(rows["HQ"], key) == pytest.approx(hq[key])
            assert getattr(rows["ML"], key) == pytest.approx(ml)
            assert getattr(rows["WF"], key) == pytest.approx(wf[key])
            assert getattr(rows["ML"], f"{key}_rel_percent") == pytest.approx((ml - hq[key]) / hq[key] * 100)
            assert math.isnan(getattr(rows["HQ"], f"{key}_rel_percent"))
        # Markdown: HQ plain, WF and ML with the relative difference in brackets
        line = {ln.split("|")[2].strip(): ln for ln in md.splitlines() if ln.startswith(f"| {sid} ")}
        bv_hq, bv_wf = hq["bv_tv_percent"], wf["bv_tv_percent"]
        assert f"| {bv_hq:.1f} |" in line["HQ"] and "(" not in line["HQ"]
        assert f"{bv_wf:.1f} ({(bv_wf - bv_hq) / bv_hq * 100:+.1f}%)" in line["WF"]
    # one number written out: t01 WF has a thinner degradation layer than HQ
    assert "ML: mean of the measures over the predictions of the 4 fold models (fusing method avr_3" in md
    assert "150 µm" in md
    tex = (tmp_path / "table3.tex").read_text()
    assert r"BV/TV [\%]" in tex and r"\%)" in tex and "µ" not in tex


def test_table3_format_incomplete_and_missing_wf():
    values = {"s1": {"HQ": {"dr_mm_per_year": 0.2, "bic_percent": 50.0, "bv_tv_percent": 40.0}, "WF": None,
                     "ML": [{"dr_mm_per_year": 0.21, "bic_percent": 45.0, "bv_tv_percent": 42.0},
                            {"dr_mm_per_year": 0.23, "bic_percent": 55.0, "bv_tv_percent": 44.0}],
                     "folds": [0, 2], "days": 28.0, "methods": {"avr_3"}}}
    df = table3(values)
    md = table3_markdown(df)
    assert "| s1 | ML* | 0.220 (+10.0%) | 50.0 (+0.0%) | 43.0 (+7.5%) |" in md
    assert "| s1 | HQ | 0.200 | 50.0 | 40.0 |" in md
    assert "| s1 | WF | – | – | – |" in md
    assert "s1: ML mean over 2 of 4 folds only (folds 0,2)." in md
    assert r"ML$^{*}$ & 0.220 (+10.0\%)" in table3_latex(df)


def test_table3_real_measures_end_to_end(store, runs, tmp_path):
    from analysis.measures import implant_measures  # no skip: the measures exist and are tested end to end

    part = R.table3_part(runs, tmp_path, FUSING_KEY, roi_um=20)
    assert part.skipped is None, part.skipped
    csv = pd.read_csv(tmp_path / "table3.csv")
    assert len(csv) == 6
    hq = implant_measures(implant_volume(), voxel_size_um=5.0, roi_um=20, initial_volume_mm3=0.05,
                          initial_surface_mm2=0.9, days=28.0, slab=64)
    row = csv[(csv["sample"] == "t01") & (csv.segmentation == "HQ")].iloc[0]
    for key in ("dr_mm_per_year", "bic_percent", "bv_tv_percent"):
        assert row[key] == pytest.approx(hq[key])
    wf = csv[(csv["sample"] == "t01") & (csv.segmentation == "WF")].iloc[0]
    for key in ("dr_mm_per_year", "bic_percent", "bv_tv_percent"):
        if hq[key]:
            assert wf[f"{key}_rel_percent"] == pytest.approx((wf[key] - hq[key]) / hq[key] * 100)
    # the fusing runs it measured carry their rows, intervals included (issue 30 item 4)
    import mlflow

    client = mlflow.MlflowClient(store[0])
    logged = [r for r in client.search_runs([client.get_experiment_by_name(runs.fusing_experiment).experiment_id])
              if "table3" in {a.path for a in client.list_artifacts(r.info.run_id)}]
    assert logged and any("logged to" in n for n in part.notes)
    doc = json.loads(Path(client.download_artifacts(logged[0].info.run_id, "table3/measures.json",
                                                    str(tmp_path))).read_text())
    ml = csv[(csv["sample"] == "t01") & (csv.segmentation == "ML")].iloc[0]
    got = doc["samples"]["t01"]
    assert got["HQ"]["bic_percent"]["value"] == pytest.approx(hq["bic_percent"])
    assert got["ML"]["bic_percent"]["value"] == pytest.approx(ml["bic_percent"])
    assert len(got["ML"]["bic_percent"]["plane"]) == 2 and "conformal" not in got["ML"]["bic_percent"]


# ----------------------------------------------------------------------------------------------- Pareto


def test_pareto_mask_rules():
    assert pareto_mask([0.8, 0.85, 0.79, 0.85, 0.9], [1, 2, 1.5, 4, 5]) == [True, True, False, False, True]
    assert pareto_mask([0.9, 0.9], [1, 1]) == [True, True]  # equal points do not dominate each other
    assert pareto_mask([float("nan"), 0.5], [1, 2]) == [False, True]


def test_pareto_front_of_optuna_runs(runs, tmp_path):
    df = optuna_table(runs.training)
    assert sorted(df.config_key) == [f"opt{i}" for i in range(len(OPTUNA))]
    assert sorted(df[df.pareto].config_key) == ["opt0", "opt1", "opt4"]
    assert df.set_index("config_key").loc["opt2", "learning_rate"] == pytest.approx(3e-4)
    part = R.pareto_part(runs, tmp_path)
    csv = pd.read_csv(tmp_path / "pareto.csv")
    assert sorted(csv[csv.pareto].config_key) == ["opt0", "opt1", "opt4"]
    assert list(csv.flops) == sorted(csv.flops)
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert "3 of 6" in part.notes[0]


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_reports_writes_everything(store, tmp_path, monkeypatch, capsys):
    import analysis.table3

    monkeypatch.setattr(analysis.table3, "default_measures", lambda: stub_measures([]))
    out = tmp_path / "reports"
    assert main(["reports", "--tracking-uri", store[0], "--out", str(out)]) == 0
    cap = capsys.readouterr()
    expected = {"fig3.png", "fig3.pdf", "configs.csv", "table2.csv", "table2.md", "table2.tex", "table3.csv",
                "table3.md", "table3.tex", "pareto.png", "pareto.csv", "missing.csv", "missing.md"}
    assert {p.name for p in out.iterdir()} == expected
    for name in expected:
        assert f"wrote {out / name}" in cap.out
    assert "read 24 training and 27 fusing runs" in cap.out
    assert "warning:" in cap.err and "mv_9" in cap.err


def test_cli_reports_skips_parts_without_runs(store, tmp_path, capsys):
    uri, out = store[0], tmp_path / "out"
    assert main(["reports", "--tracking-uri", uri, "--fusing-experiment", "absent-fusing", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "Table 2: skipped, no fusing experiment 'absent-fusing'" in cap.out
    assert "Table 3: skipped" in cap.out
    assert {p.name for p in out.iterdir()} == {"fig3.png", "fig3.pdf", "configs.csv", "pareto.png", "pareto.csv",
                                               "missing.csv", "missing.md"}
    assert main(["table2", "--tracking-uri", uri, "--fusing-experiment", "absent-fusing", "--out", str(out)]) == 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_unreachable_or_absent_store_exit_2(store, tmp_path, capsys):
    db = tmp_path / "nope" / "mlflow.db"
    assert main(["reports", "--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "o")]) == 2
    assert "error: no MLflow store" in capsys.readouterr().err
    assert not db.exists() and not (tmp_path / "o").exists()
    assert main(["fig3", "--tracking-uri", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "o")]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert main(["reports", "--tracking-uri", store[0], "--experiment", "absent", "--out", str(tmp_path / "o")]) == 2
    assert "error: no experiment 'absent'" in capsys.readouterr().err


def test_python_m_analysis_subprocess(store, tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "analysis", "table2", "--tracking-uri", store[0], "--out", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (out / "table2.md").is_file() and "wrote" in p.stdout


def test_runs_without_model_params_are_reported_not_plotted():
    from analysis.results import missing_training
    from analysis.store import RunRecord

    def rec(key, fold, params, end=0, status="FINISHED"):
        return RunRecord(run_id=f"{key}-{fold}-{end}", experiment_id="1", status=status, start_time=0, end_time=end,
                         run_name="", tags={"config_key": key, "fold": str(fold)}, params=params,
                         metrics={"mean_iou": 0.9, "flops": 1e9})
    good = {"model.width": "32", "model.depth": "3", "model.input_size": "384"}
    rs = [rec("a", f, good) for f in range(4)] + [rec("b", 0, {})]
    table = config_table_from_runs(rs)
    chosen, left = fig3_configs(table)
    assert list(chosen.config_key) == ["a"] and list(left.config_key) == ["b"]
    rows = missing_training(rs)
    b = [r for r in rows if r["config_key"] == "b"]
    assert b and b[0]["kind"] == "training (not plotted)" and "lack model" in b[0]["note"]
    assert not [r for r in rows if r["config_key"] == "a"]
