"""Table 2 experiment: `python -m sweep +experiment=fusing -m` on tiny trained folds, local pool, local MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from model.planes import TABLE2_METHODS
from tests.test_sweep_local import TINY, _sweep

CONFIG = ["model.width=32", "model.input_size=384"]


def test_fusing_sweep_logs_seven_methods_per_fold_and_resumes(tmp_path):
    work = tmp_path / "work"
    res = _sweep(work, *CONFIG, "fold=0,1")
    assert res.returncode == 0, res.stderr[-3000:]

    # The default (fusing.model=best) needs a config trained on all 4 folds: none is.
    res = _sweep(work, "+experiment=fusing", *CONFIG, "fold=0,1")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "fusing.model: best: no config has FINISHED training runs for all 4 folds" in res.stderr
    assert not (work / "fusing").exists()

    # A fold that was never trained stops the whole fusing sweep before any prediction.
    res = _sweep(work, "+experiment=fusing", *CONFIG, "fusing.model=baseline", "fold=0,1,2")
    assert res.returncode != 0
    assert "1 of 3 fusing jobs cannot run; nothing was queued" in res.stderr
    assert "no FINISHED training run of c32-d2-is384-fold2" in res.stderr
    assert not (work / "fusing").exists()

    res = _sweep(work, "+experiment=fusing", *CONFIG, "fusing.model=baseline", "fold=0,1")
    assert res.returncode == 0, res.stderr[-3000:]
    c = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = c.get_experiment_by_name("scaling-unet-fusing")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "fusing_method" not in r.data.tags]
    children = [r for r in runs if "fusing_method" in r.data.tags]
    assert len(parents) == 2 and len(children) == 14
    assert all(r.info.status == "FINISHED" and r.data.tags["task"] == "fusing" for r in runs)
    for p in parents:
        kids = [r for r in children if r.data.tags["mlflow.parentRunId"] == p.info.run_id]
        assert sorted(k.data.tags["fusing_method"] for k in kids) == sorted(TABLE2_METHODS)
        assert {k.data.tags["fold"] for k in kids} == {p.data.tags["fold"]}
        for k in kids:
            m = k.data.metrics
            assert set(m) == {"iou_bone", "iou_degradation_layer", "iou_residual_material", "mean_iou"}
            finite = [m[n] for n in ("iou_bone", "iou_degradation_layer", "iou_residual_material") if np.isfinite(m[n])]
            assert abs(m["mean_iou"] - np.mean(finite)) < 1e-9
            assert p.data.metrics[f"{k.data.tags['fusing_method']}.mean_iou"] == m["mean_iou"]
            assert k.data.params["model.width"] == "32" and k.data.params["fold"] == p.data.tags["fold"]
        arts = {a.path for a in c.list_artifacts(p.info.run_id)}
        assert {"fig4.png", "fig5.png"} <= arts
        assert all(k.data.tags["model_selection"].startswith("baseline") for k in kids)
        saver = next(k for k in kids if k.data.tags["fusing_method"] == "avr_9")  # paper Fig. 5: Avr., 9-planes
        pred = json.loads(open(c.download_artifacts(saver.info.run_id, "predictions.json", str(tmp_path))).read())
        assert pred["method"] == "avr_9" and len(pred["samples"]) == 1
        with h5py.File(next(iter(pred["samples"].values()))) as f:
            assert f["labels"].dtype == np.uint8 and f["labels"].ndim == 3
    # The training experiment is untouched: no fusing runs there, no extra parents.
    train = c.search_runs([c.get_experiment_by_name("scaling-unet").experiment_id], max_results=1000)
    assert not any("fusing_method" in r.data.tags or r.data.tags.get("task") == "fusing" for r in train)
    # Plane files are removed after scoring (keep_planes=false).
    assert not list((work / "fusing").rglob("rc.h5"))

    res = _sweep(work, "+experiment=fusing", *CONFIG, "fusing.model=baseline", "fold=0,1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 jobs, 2 already FINISHED in MLflow (skipped)" in res.stderr + res.stdout
    assert len(c.search_runs([exp.experiment_id], max_results=1000)) == 16

    _check_fold_ensemble(work, tmp_path)


def _single(work, *args: str) -> subprocess.CompletedProcess:
    """One job, no -m (how the fold ensemble is launched)."""
    env = dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "sweep", *args, *TINY], cwd=work.parent, env=env,
                          capture_output=True, text=True, timeout=600)


def _check_fold_ensemble(work, tmp_path):
    """The fold-ensemble job on the store of the per-fold test (folds 0, 1 trained and fused)."""
    # 32 slices per forward pass: the tiny volume's planes in one batch each (4× fewer model calls on CPU)
    ens = ["+experiment=fusing", *CONFIG, "fusing.model=baseline", "fusing.ensemble=true", "fusing.batch_size=32"]
    res = _single(work, *ens)  # folds 2 and 3 were never trained: one line, nothing predicted
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert ("error: fusing.ensemble: needs a FINISHED training run of each of the 4 folds of config" in res.stderr
            and "folds 2,3 have none (2 of 4 FINISHED)" in res.stderr), res.stderr[-3000:]
    assert not list((work / "fusing").glob("*/ensemble"))
    assert _sweep(work, *CONFIG, "fold=2,3").returncode == 0

    res = _single(work, *ens, "fusing.keep_planes=true")
    assert res.returncode == 0, res.stderr[-3000:]
    uri = f"sqlite:///{work}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("scaling-unet-fusing").experiment_id
    runs = [r for r in c.search_runs([exp], max_results=1000) if "ensemble_of_folds" in r.data.tags]
    parent = next(r for r in runs if "fusing_method" not in r.data.tags)
    kids = {r.data.tags["fusing_method"]: r for r in runs if "fusing_method" in r.data.tags}
    assert len(runs) == 5 and set(kids) == {"avr_3", "mv_3", "avr_9", "mv_9"}
    assert all(r.info.status == "FINISHED" and r.data.tags["ensemble_of_folds"] == "0,1,2,3" and "fold" not in r.data.tags
               and "fold" not in r.data.params and r.data.tags["task"] == "fusing" for r in runs)
    assert all(k.data.tags["mlflow.parentRunId"] == parent.info.run_id for k in kids.values())
    train = {int(r.data.tags["fold"]): r.info.run_id for r in c.search_runs(
        [c.get_experiment_by_name("scaling-unet").experiment_id], max_results=1000) if "fold" in r.data.tags}
    assert parent.data.tags["trained_run_ids"] == ",".join(train[f] for f in range(4))
    pred = json.loads(open(c.download_artifacts(kids["avr_9"].info.run_id, "predictions.json", str(tmp_path))).read())
    assert pred["method"] == "avr_9" and pred["ensemble_of_folds"] == [0, 1, 2, 3]
    _check_ensemble_is_the_mean_of_the_folds(work, uri, [f"runs:/{train[f]}/model" for f in range(4)],
                                             kids["avr_9"].data.metrics)

    res = _single(work, *ens)  # a rerun finds the FINISHED ensemble and skips it
    assert res.returncode == 0 and "ensemble fusing already FINISHED; skipping" in res.stderr + res.stdout
    assert len([r for r in c.search_runs([exp], max_results=1000) if "ensemble_of_folds" in r.data.tags]) == 5

    from analysis import reports as R
    from analysis.store import read_runs

    store = read_runs(uri, "scaling-unet")
    t2, key = R.table2_part(store, tmp_path / "reports")
    md = (tmp_path / "reports" / "table2.md").read_text()
    avr9 = kids["avr_9"].data.metrics
    assert key == parent.data.tags["config_key"]
    assert (f"| Avr 9-planes, 4-fold ensemble† | {avr9['iou_bone'] * 100:.2f} | "
            f"{avr9['iou_degradation_layer'] * 100:.2f} |") in md, md
    assert "| Avr 9-planes* | " in md and " ± " in md and "† One value per column" in md  # beside the per-fold rows
    calls: list = []
    t3 = R.table3_part(store, tmp_path / "reports", key, measures_fn=_stub_measures(calls))
    assert t3.skipped is None and any("ML from the fold-ensemble run" in n for n in t3.notes), t3.notes
    csv = pd.read_csv(tmp_path / "reports" / "table3.csv", dtype={"folds": str})
    csv["se_none"] = csv.dr_mm_per_year_se.isna()  # one prediction: no standard error
    ml = csv[csv.segmentation == "ML"].iloc[0]
    assert (ml.ml_source, ml.n_folds, ml.folds, ml.se_none) == ("ensemble", 4, "0,1,2,3", True), csv
    assert "ML: the measures of the prediction of the 4-fold ensemble" in (tmp_path / "reports" / "table3.md").read_text()
    t3 = R.table3_part(store, tmp_path / "folds", key, measures_fn=_stub_measures(calls), ml_from="folds")
    assert any("predictions of folds [0, 1]" in n for n in t3.notes), t3.notes


def _stub_measures(calls):
    def fn(arr, **kw):
        calls.append(kw)
        n = np.bincount(np.asarray(arr[:]).ravel(), minlength=4)
        return {"dr_mm_per_year": n[3] / 1000, "bic_percent": n[1] / 100, "bv_tv_percent": n[2] / 50}
    return fn


def _check_ensemble_is_the_mean_of_the_folds(work, uri, specs, avr9):
    """Each plane file of the ensemble = the mean of the single fold models' plane files, to the uint8 step; its
    avr_9 IoU is the one scored from those files."""
    from data.manifest import load_dataset
    from model.evaluation import iou_metrics
    from model.inference import Source, evaluate_methods, predict_plane
    from model.planes import PLANE_SETS, PLANES, TABLE2_METHODS
    from model.predict import keras_predictor, load_models

    sample = next(s for s in load_dataset(next((work / "data").rglob("prepared"))).samples if s.split == "test")
    planes = work / "fusing" / next(p.name for p in (work / "fusing").iterdir()) / "ensemble" / sample.id
    files = {p: planes / f"{p}.h5" for p in PLANE_SETS["9"]}
    cm = evaluate_methods(files, sample.label, {"avr_9": TABLE2_METHODS["avr_9"]})["avr_9"]
    assert iou_metrics(cm) == {k: avr9[k] for k in iou_metrics(cm)}
    models, _ = load_models(specs, tracking_uri=uri)
    with h5py.File(files["rc"]) as f:
        source = Source(sample.image, tuple(f["probabilities"].shape[:3]))
    rotated = next(p for p in PLANE_SETS["9"] if PLANES[p].rotated)
    # uint8 steps: an axis plane is rounded once (≤ 1); a rotated one also before rotating back (≤ 3)
    for plane, step in (("rc", 1), (rotated, 3)):
        singles = []
        for i, m in enumerate(models):
            out = predict_plane(source, plane, keras_predictor(m), planes.parent / f"single{i}" / f"{plane}.h5",
                                model_id=str(i), progress=False)
            with h5py.File(out) as f:
                singles.append(f["probabilities"][...].astype(np.float64))
        with h5py.File(files[plane]) as f:
            ensemble = f["probabilities"][...].astype(np.float64)
        assert np.abs(np.mean(singles, axis=0) - ensemble).max() <= step, plane


def _fake_run(client, exp, key, fold, iou, flops, *, parent=False, status="FINISHED"):
    tags = {"config_key": key, **({"is_parent": "true"} if parent else {"fold": str(fold)})}
    run = client.create_run(exp, tags=tags)
    for name, value in (("model.width", 32), ("model.depth", 3), ("model.input_size", 384)):
        client.log_param(run.info.run_id, name, value)
    client.log_metric(run.info.run_id, "mean_iou", iou)
    client.log_metric(run.info.run_id, "flops", flops)
    client.set_terminated(run.info.run_id, status)


def test_best_config_is_the_highest_mean_iou_over_complete_folds_ties_to_fewer_flops(tmp_path):
    from sweep.jobs.fusing import best_config

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("train")
    for fold in range(4):
        _fake_run(client, exp, "aaaaaaaaaaaa", fold, 0.80, 2e9)
        _fake_run(client, exp, "bbbbbbbbbbbb", fold, 0.80, 1e9)  # same IoU, fewer FLOPs: wins the tie
        _fake_run(client, exp, "cccccccccccc", fold, 0.79 if fold else 0.70, 1e8)
        if fold < 3:
            _fake_run(client, exp, "dddddddddddd", fold, 0.95, 1e8)  # better, but fold 3 is missing
    _fake_run(client, exp, "dddddddddddd", 3, 0.99, 1e8, status="FAILED")
    _fake_run(client, exp, "eeeeeeeeeeee", 0, 0.99, 1e8, parent=True)  # parent runs carry no fold
    assert best_config(uri, exp, 4) == ("bbbbbbbbbbbb", 0.80, 3)


def test_ensemble_flag_is_a_bool_and_one_job_not_a_sweep():
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from sweep.core.errors import ConfigError
    from sweep.jobs.fusing import check_ensemble

    check_ensemble(OmegaConf.create({"fusing": {"ensemble": True}}))
    with pytest.raises(ConfigError, match="fusing.ensemble: must be true or false, got 'yes'"):
        check_ensemble(OmegaConf.create({"fusing": {"ensemble": "yes"}}))
    swept = OmegaConf.create({"fusing": {"ensemble": True}, "hydra": {"mode": RunMode.MULTIRUN}})
    with pytest.raises(ConfigError, match="fusing.ensemble: true is one job over all folds: run it without -m"):
        check_ensemble(swept)


def _t2_record(method, *, fold=None, ensemble=None, iou=0.5, end=1):
    from analysis.store import RunRecord

    tags = {"config_key": "k", "task": "fusing", "fusing_method": method,
            **({"fold": str(fold)} if fold is not None else {}), **({"ensemble_of_folds": ensemble} if ensemble else {})}
    metrics = {"iou_bone": iou, "iou_degradation_layer": iou, "iou_residual_material": iou, "mean_iou": iou}
    return RunRecord(run_id=f"{method}{fold}{ensemble}{end}", experiment_id="1", status="FINISHED", start_time=0,
                     end_time=end, run_name="", tags=tags, params={}, metrics=metrics)


def test_table2_ensemble_rows_are_one_value_without_se_and_never_bold():
    from analysis.table2 import METHODS, table2, table2_latex, table2_markdown

    folds = [_t2_record(m, fold=f, iou=0.5 + 0.01 * f + 0.001 * i) for i, m in enumerate(METHODS) for f in range(4)]
    md_old = table2_markdown(table2(folds, "k"))
    assert "ensemble" not in md_old and "†" not in md_old  # a store without ensemble runs: the table as before
    ens = [_t2_record(m, ensemble="0,1,2", iou=0.1, end=1) for m in ("avr_9", "mv_9")]
    ens += [_t2_record(m, ensemble="0,1,2,3", iou=0.9, end=0) for m in ("avr_9", "mv_9", "avr_3", "mv_3")]
    df = table2(folds + ens, "k")
    assert list(df.label[7:]) == [f"{m}, 4-fold ensemble" for m in ("Avr 3-planes", "MV 3-planes", "Avr 9-planes",
                                                                     "MV 9-planes")]
    row = df[df.label == "Avr 9-planes, 4-fold ensemble"].iloc[0]  # the ensemble of most folds, not the latest
    assert row.mean_iou == pytest.approx(90.0) and np.isnan(row.mean_iou_se) and row.complete and row.mean_iou_n == 1
    md = table2_markdown(df)
    assert "| Avr 9-planes, 4-fold ensemble† | 90.00 | 90.00 | 90.00 | 90.00 |" in md
    assert "| MV 9-planes | **" in md and md.count("**") == 2 * 4  # the best per-fold row is bold, not the ensemble
    assert "† One value per column, not a mean over folds (no standard error)" in md
    assert r"Avr 9-planes, 4-fold ensemble$^{\dagger}$ & 90.00 &" in table2_latex(df)
