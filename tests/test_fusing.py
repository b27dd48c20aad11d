"""Table 2 experiment: `python -m sweep +experiment=fusing -m` on tiny trained folds, local pool, local MLflow store."""

from __future__ import annotations

import json

import h5py
import numpy as np
from mlflow.tracking import MlflowClient

from model.inference import TABLE2_METHODS
from tests.test_sweep_local import _sweep

CONFIG = ["model.width=32", "model.input_size=384"]


def test_fusing_sweep_logs_seven_methods_per_fold_and_resumes(tmp_path):
    work = tmp_path / "work"
    res = _sweep(work, *CONFIG, "fold=0,1")
    assert res.returncode == 0, res.stderr[-3000:]

    # A fold that was never trained stops the whole fusing sweep before any prediction.
    res = _sweep(work, "+experiment=fusing", *CONFIG, "fold=0,1,2")
    assert res.returncode != 0
    assert "1 of 3 fusing jobs cannot run; nothing was queued" in res.stderr
    assert "no FINISHED training run of c32-d2-is384-fold2" in res.stderr
    assert not (work / "fusing").exists()

    res = _sweep(work, "+experiment=fusing", *CONFIG, "fold=0,1")
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
        saver = next(k for k in kids if k.data.tags["fusing_method"] == "avr_3")
        pred = json.loads(open(c.download_artifacts(saver.info.run_id, "predictions.json", str(tmp_path))).read())
        assert pred["method"] == "avr_3" and len(pred["samples"]) == 1
        with h5py.File(next(iter(pred["samples"].values()))) as f:
            assert f["labels"].dtype == np.uint8 and f["labels"].ndim == 3
    # The training experiment is untouched: no fusing runs there, no extra parents.
    train = c.search_runs([c.get_experiment_by_name("scaling-unet").experiment_id], max_results=1000)
    assert not any("fusing_method" in r.data.tags or r.data.tags.get("task") == "fusing" for r in train)
    # Plane files are removed after scoring (keep_planes=false).
    assert not list((work / "fusing").rglob("rc.h5"))

    res = _sweep(work, "+experiment=fusing", *CONFIG, "fold=0,1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 jobs, 2 already FINISHED in MLflow (skipped)" in res.stderr + res.stdout
    assert len(c.search_runs([exp.experiment_id], max_results=1000)) == 16
