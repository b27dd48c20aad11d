"""The sweep on the real local SLURM cluster (slurm/) with a real MLflow server: one job array per sweep,
4 GPUs per run, resume of a half-done sweep, preemption (USR2) with requeue, failures reported promptly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.slurm_fixture import checkpoint_at, slurm_cluster  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.width=32", "model.depth=1", "data.synth.size=32", "data.synth.n_train=4", "data.synth.n_test=1",
        "train.batch_size=2", "train.val_crop=32", "train.val_slice_step=8", "train.final_slice_step=8",
        "train.open_slabs=2"]
# The test cluster's 4 fake V100s train the laptop profile on synthetic data: a stand-in, allowed explicitly,
# on 4 logical CPU devices (train.cpu_replicas) under the same MirroredStrategy as 4 GPUs; the global batch
# (TINY's 2, overridden) splits evenly over the 4 replicas.
STAND_IN = ["allow_stand_in=true", "train.cpu_replicas=4", "train.batch_size=4"]


def _launch(work: Path, uri: str, experiment: str, name: str, *overrides: str) -> tuple[subprocess.Popen, Path]:
    log = work.parent / f"{name}.log"
    cmd = [sys.executable, "-m", "sweep", "+experiment=compound", "hydra/launcher=slurm_v100", *TINY, *STAND_IN,
           "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
           "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=20", "hydra.launcher.poll_interval_s=1",
           "hydra.launcher.array_parallelism=4", f"hydra.launcher.name=su-test-{name}",
           f"mlflow.tracking_uri={uri}", f"mlflow.experiment={experiment}", *overrides, "-m"]
    env = dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3", MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=work.parent, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, log


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"sweep still running after {timeout:.0f} s:\n{log.read_text()[-4000:]}")
    return log.read_text()


def _fold_runs(uri: str, experiment: str, status: str | None = None) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "fold" in r.data.tags and (status is None or r.info.status == status)]


def _array_ids(cluster, name: str) -> list[str]:
    out = cluster.run("squeue", "-h", "-r", "-n", f"su-test-{name}", "-o", "%i|%T", check=False).stdout
    return [line.split("|") for line in out.split()]


def test_compound_subset_is_one_array_of_4_gpu_jobs_and_resumes_only_what_is_missing(
        tmp_path, slurm_cluster, mlflow_server):
    work = tmp_path / "work"
    # One config (4 folds) first: the array's subject is its shape, not its size (each 4-replica job traces ~10 s).
    proc, log = _launch(work, mlflow_server.uri, "slurm-array", "array", "model.input_size=384")
    out = _wait(proc, log, 600)
    assert proc.returncode == 0, out[-4000:]
    assert "submitted 4 runs as ONE SLURM job array" in out
    runs = _fold_runs(mlflow_server.uri, "slurm-array", "FINISHED")
    assert len(runs) == 4 and len({(r.data.tags["config_key"], r.data.tags["fold"]) for r in runs}) == 4
    # Each 4-GPU job trained on 4 replicas (CPU stand-ins for the fake GPUs), read from the trained model.
    assert {(r.data.tags["replicas"], r.data.tags["device_kind"]) for r in runs} == {("4", "CPU stand-in")}
    array_ids = {r.data.tags["slurm_array_job_id"] for r in runs}
    assert len(array_ids) == 1, array_ids
    array_id = array_ids.pop()
    tres = slurm_cluster.run("sacct", "-j", array_id, "-X", "-n", "-P", "--format=JobID,AllocTRES%80").stdout
    lines = [line for line in tres.splitlines() if line.strip()]
    assert len(lines) == 4 and all("gres/gpu=4" in line for line in lines), tres
    # Parent runs: one per config with its 4 folds nested and mean ± SE.
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("slurm-array")
    parents = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("is_parent") == "true"]
    assert len(parents) == 1 and {p.data.tags["n_folds"] for p in parents} == {"4"}
    assert all("mean_iou" in p.data.metrics and "mean_iou_se" in p.data.metrics for p in parents)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {p.info.run_id for p in parents}
    # A sweep that waited for its runs ends its own MLflow run (it stayed RUNNING until sweep.status: issue 29's chaos run)
    sweeps = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("is_sweep") == "true"]
    assert [r.info.status for r in sweeps] == ["FINISHED"]

    # The grid grows by one input size: only its 4 runs are queued. Where a run trains (train.cpu_replicas) is not
    # part of its config key: one replica here, so the 4 FINISHED runs still count and the new 4 train faster.
    proc, log = _launch(work, mlflow_server.uri, "slurm-array", "array2", "model.input_size=384,512",
                        "train.cpu_replicas=1")
    out = _wait(proc, log, 600)
    assert proc.returncode == 0, out[-4000:]
    assert "4 already FINISHED in MLflow (skipped)" in out and "submitted 4 runs as ONE SLURM job array" in out
    runs = _fold_runs(mlflow_server.uri, "slurm-array", "FINISHED")
    assert len(runs) == 8 and len({(r.data.tags["config_key"], r.data.tags["fold"]) for r in runs}) == 8


def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path, slurm_cluster, mlflow_server):
    work = tmp_path / "work"
    # One replica: requeue and resume through SLURM are the subject; resuming on 4 replicas exactly is test_distributed's.
    proc, log = _launch(work, mlflow_server.uri, "slurm-preempt", "preempt", "model.input_size=384", "fold=0",
                        "train.max_iters=600", "train.checkpoint_every=100", "train.early_stop_patience_iters=100000",
                        "train.cpu_replicas=1")
    state = slurm_cluster.wait_for("the first checkpoint", checkpoint_at(work, 100), timeout=240, interval=0.5)
    (job_id, job_state), = _array_ids(slurm_cluster, "preempt")
    assert job_state == "RUNNING"
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    out = _wait(proc, log, 600)
    assert proc.returncode == 0, out[-4000:]
    (run,) = _fold_runs(mlflow_server.uri, "slurm-preempt")
    assert run.info.status == "FINISHED"
    resumed = [int(x) for x in run.data.tags["resumed_from_iteration"].split(",")]
    assert len(resumed) == 1 and resumed[0] >= 100
    assert run.data.metrics["iterations"] == 600
    history = slurm_cluster.run("sacct", "-j", job_id, "-D", "-X", "-n", "-P", "--format=JobID,State").stdout
    assert "REQUEUED" in history or "PREEMPTED" in history, history
    assert json.loads(state.read_text())["finished"] is True


def test_cancelled_job_is_reported_as_failed_promptly(tmp_path, slurm_cluster, mlflow_server):
    work = tmp_path / "work"
    proc, log = _launch(work, mlflow_server.uri, "slurm-cancel", "cancel", "model.input_size=384", "fold=0,1",
                        "train.max_iters=300", "train.checkpoint_every=100", "train.early_stop_patience_iters=100000",
                        "train.cpu_replicas=1")  # one replica: the report is the subject
    tasks = slurm_cluster.wait_for("both tasks running", lambda: (
        lambda t: t if len(t) == 2 and all(s == "RUNNING" for _, s in t) else None)(_array_ids(slurm_cluster, "cancel")),
        timeout=240, interval=0.5)
    victim = sorted(t[0] for t in tasks)[0]
    slurm_cluster.run("scancel", victim)
    t0 = time.monotonic()
    seen = slurm_cluster.wait_for("the sweep to report the cancelled run", lambda: "FAILED:" in log.read_text(),
                                  timeout=60, interval=0.5)
    assert seen and time.monotonic() - t0 < 45
    out = _wait(proc, log, 600)
    assert proc.returncode != 0
    assert "1 of 2 runs FAILED" in out and "c32-d1-is384-fold" in out and "CANCELLED" in out.upper()
    assert len(_fold_runs(mlflow_server.uri, "slurm-cancel", "FINISHED")) == 1
