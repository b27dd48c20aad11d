"""Offline compute nodes: a run logs to the SQLite store in its own folder; sweep.sync copies it to a real
MLflow server, and syncing again adds nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.width=32", "model.depth=2", "model.input_size=384", "data.synth.size=32", "data.synth.n_train=4",
        "data.synth.n_test=1", "train.batch_size=2", "train.val_crop=32", "train.val_slice_step=8",
        "train.final_slice_step=8", "train.open_slabs=2", "train.max_iters=4", "train.checkpoint_every=2"]


def _py(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SCALING_UNET_WORK=str(tmp_path / "work"), TF_CPP_MIN_LOG_LEVEL="3",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_offline_run_is_synced_to_the_server_once(tmp_path, mlflow_server):
    common = [*TINY, f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=offline-sync"]
    res = _py(tmp_path, "sweep", *common, "mlflow.offline=true")
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(mlflow_server.uri)
    assert client.get_experiment_by_name("offline-sync") is None  # the job never talked to the server
    (db,) = (tmp_path / "work" / "checkpoints").glob("*/fold0/mlflow/mlflow.db")
    local = MlflowClient(f"sqlite:///{db}")
    (lrun,) = local.search_runs([local.get_experiment_by_name("offline-sync").experiment_id])
    assert lrun.info.status == "FINISHED"

    first = _py(tmp_path, "sweep.sync", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "synced: 1 runs created" in first.stdout and "1 runs ended" in first.stdout
    exp = client.get_experiment_by_name("offline-sync")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["offline_run_id"] == lrun.info.run_id
    assert run.data.params == lrun.data.params and run.data.metrics == lrun.data.metrics
    history = len(client.get_metric_history(run.info.run_id, "train_loss"))
    assert history == len(local.get_metric_history(lrun.info.run_id, "train_loss")) >= 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "config.yaml"} <= artifacts

    again = _py(tmp_path, "sweep.sync", *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "synced: 0 runs created, 0 params, 0 metric values, 0 artifacts, 0 runs ended, 1 runs already in sync" \
        in again.stdout
    (run2,) = client.search_runs([exp.experiment_id])
    assert len(client.get_metric_history(run2.info.run_id, "train_loss")) == history
