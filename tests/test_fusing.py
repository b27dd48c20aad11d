"""Table 2 experiment: `python -m sweep +experiment=fusing -m` on tiny trained folds, local pool, local MLflow store."""

from __future__ import annotations

import json

import h5py
import numpy as np
from mlflow.tracking import MlflowClient

from model.planes import TABLE2_METHODS
from tests.test_sweep_local import _sweep

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
