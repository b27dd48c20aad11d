"""`python -m sweep` end to end: a tiny real run recorded in a real MLflow server, kill + resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from sweep.core.errors import ConfigError
from sweep.core.runplan import plan_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.depth=2", "data.synth.size=32", "data.synth.n_train=4", "data.synth.n_test=1",
        "train.batch_size=2", "train.val_crop=32", "train.val_slice_step=8", "train.final_slice_step=8",
        "train.open_slabs=2"]


def _env(work: Path) -> dict:
    env = dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    env.pop("SLURM_JOB_ID", None)
    return env


def _sweep(work: Path, *overrides: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweep", *TINY, *overrides], cwd=work.parent, env=_env(work),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_tiny_run_is_one_finished_mlflow_run_with_the_schema(tmp_path, mlflow_server):
    work = tmp_path / "work"
    proc = _sweep(work, f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=schema",
                  "train.max_iters=4", "train.checkpoint_every=2", "fold=1", "data.prepare.clip_percentiles=[1.0,99.0]")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    (run,) = _runs(mlflow_server.uri, "schema")
    assert run.info.status == "FINISHED" and run.info.run_name == "c32-d2-is384-fold1"
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    for key in ("iou_bone", "iou_degradation_layer", "iou_residual_material", "mean_iou", "flops", "params",
                "receptive_field", "train_loss", "val_loss", "learning_rate", "iterations", "wall_time_s",
                "images_per_s"):
        assert key in m, key
    assert m["iterations"] == 4 and m["params"] > 0 and m["receptive_field"] == 44
    assert p["model.width"] == "32" and p["effective.width"] == "2" and p["fold"] == "1" and p["train.max_iters"] == "4"
    assert not any(str(Path.home()) in v for v in p.values() if str(Path.home()) != "/")
    # What data.prepare did to the training data, read from the data (analysis.segment applies it to a new scan)
    assert (p["preprocessing.voxel_size_um"], p["preprocessing.clip_low_percentile"],
            p["preprocessing.clip_high_percentile"]) == ("5.0", "1.0", "99.0")
    assert t["fold"] == "1" and len(t["config_key"]) == 12 and t["git_commit"] and t["compute_dtype"] == "float32"
    assert t["replicas"] == "1" and t["device_kind"] == "CPU"  # read from the trained model's strategy
    client = MlflowClient(mlflow_server.uri)
    assert [h.step for h in client.get_metric_history(run.info.run_id, "train_loss")] == [2, 4]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model", "training_curves.png"} <= arts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.keras"]
    # What it trained on: MLflow dataset inputs (the runs table's Dataset column), fold 1's samples by context.
    import json

    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
              for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["training", "validation"]
    profiles = {c: json.loads(d.profile) for c, d in inputs.items()}
    train_ids, val_ids = profiles["training"]["samples"], profiles["validation"]["samples"]
    assert train_ids and val_ids and not set(train_ids) & set(val_ids) and len(train_ids) + len(val_ids) == 4
    assert profiles["training"]["fold"] == 1 and profiles["training"]["dataset_digest"] == \
        profiles["validation"]["dataset_digest"]
    assert inputs["training"].name.endswith("/fold1/training") and len(inputs["training"].digest) == 12
    assert inputs["training"].digest != inputs["validation"].digest
    assert str(Path.home()) not in inputs["training"].source or str(Path.home()) == "/"
    # The trained model as an MLflow 3 LoggedModel of the run (the runs table's Models column): READY, linked as the
    # run's output at its last iteration, holding the model file; models:/<model id> loads it.
    outputs = run.outputs.model_outputs
    assert len(outputs) == 1 and outputs[0].step == 4
    logged = client.get_logged_model(outputs[0].model_id)
    assert logged.source_run_id == run.info.run_id and str(logged.status) in ("READY", "LoggedModelStatus.READY")
    assert logged.tags.get("config_key") == run.data.tags["config_key"] and logged.tags.get("fold") == "1"
    from model.predict import load_models

    models, identity = load_models([f"models:/{logged.model_id}"], tracking_uri=mlflow_server.uri)
    assert len(models) == 1 and identity.startswith(f"models:/{logged.model_id}:")
    # The same command again finds the FINISHED run and trains nothing.
    again = _sweep(work, f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=schema",
                   "train.max_iters=4", "train.checkpoint_every=2", "fold=1", "data.prepare.clip_percentiles=[1.0,99.0]")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "already FINISHED" in out, out
    assert len(_runs(mlflow_server.uri, "schema")) == 1


def test_mixed_precision_run_records_the_dtype_its_model_computes_in(tmp_path, mlflow_server):
    # The MLflow tag is read from the trained model; the logged model file must compute in it too.
    import keras

    from model.training import compute_dtype

    work = tmp_path / "work"
    proc = _sweep(work, f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=mixed", "model.width=16",
                  "model.input_size=384", "profile.input_size_map={384:16}", "train.max_iters=2",
                  "train.checkpoint_every=2", "train.precision=mixed_float16")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    (run,) = _runs(mlflow_server.uri, "mixed")
    assert run.info.status == "FINISHED" and run.data.params["train.precision"] == "mixed_float16"
    assert run.data.tags["compute_dtype"] == "float16"
    local = MlflowClient(mlflow_server.uri).download_artifacts(run.info.run_id, "model/model.keras", str(tmp_path))
    assert compute_dtype(keras.models.load_model(local, compile=False)) == "float16"


def test_killed_run_resumes_from_its_checkpoint_as_the_same_run(tmp_path, mlflow_server):
    work = tmp_path / "work"
    args = (f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=resume", "train.max_iters=400",
            "train.checkpoint_every=2", "train.early_stop_patience_iters=4", "train.lr_patience_iters=2")
    proc = _sweep(work, *args, start_new_session=True)
    deadline = time.time() + 240
    state = None
    while time.time() < deadline and proc.poll() is None:
        states = list((work / "checkpoints").glob("*/fold0/state.json"))
        if states:
            try:
                state = json.loads(states[0].read_text())
            except ValueError:
                state = None
            if state and state["iteration"] >= 2:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "run ended before the test could kill it: " + proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(states[0].read_text())["iteration"]
    assert killed_at >= 2
    (run,) = _runs(mlflow_server.uri, "resume")
    assert run.info.status == "RUNNING"  # a SIGKILLed process cannot end its run
    proc = _sweep(work, *args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    (run,) = _runs(mlflow_server.uri, "resume")
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_iteration"] == str(killed_at)
    steps = [h.step for h in MlflowClient(mlflow_server.uri).get_metric_history(run.info.run_id, "train_loss")]
    assert steps == sorted(set(steps)) and steps[0] == 2 and killed_at + 2 in steps


def _compose(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.work={tmp_path}", *TINY, *overrides])


@pytest.mark.parametrize("override, field", [
    ("model.input_size=102", "model.input_size: 102 is not divisible by 2^depth = 4"),
    ("model.width=0", "model.width: must be positive"),
    ("fold=4", "fold: must be in 0..3"),
    ("train.max_iters=0", "train.max_iters must be positive"),
])
def test_bad_config_is_named_before_anything_runs(tmp_path, override, field):
    with pytest.raises(ConfigError) as err:
        plan_run(_compose(tmp_path, override))
    assert field in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line_and_nothing_is_trained(tmp_path):
    work = tmp_path / "work"
    port = tracking_free_port()
    proc = _sweep(work, f"mlflow.tracking_uri=http://127.0.0.1:{port}")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert f"error: MLflow tracking server at http://127.0.0.1:{port} is unreachable" in out
    assert not (work / "checkpoints").exists() and not (work / "data").exists()
    proc = _sweep(work, "model.input_size=102")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: model.input_size: 102 is not divisible by 2^depth" in out, out


def test_dataset_without_training_samples_is_refused(tmp_path):
    from data.prepare import prepare_dataset
    from tests.conftest import write_raw_dataset

    write_raw_dataset(tmp_path / "raw", n_train=0, n_test=2, shape=(8, 8, 8))
    prepare_dataset(tmp_path / "raw", tmp_path / "only_test")
    proc = _sweep(tmp_path / "work", "data=prepared", f"data.dataset={tmp_path / 'only_test'}",
                  f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no training samples" in out, out
    assert not (tmp_path / "work" / "checkpoints").exists()


def tracking_free_port() -> int:
    from tests.mlflow_server import free_port

    return free_port()
