"""Tracking-server outages cost a training run nothing (sweep.tracking.outbox): a real MLflow server is stopped while runs
train and started again on the same database; every validation point reaches it, in order, and the runs end
FINISHED. A run that ends while the server is away is recorded in its offline store and synced into its server run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweep.tracking import client as tracking
from sweep.tracking.outbox import Outbox
from tests.mlflow_server import postgres_database, start_mlflow_server
from tests.slurm_fixture import slurm_cluster  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
OUTAGE_S = 30.0  # a server restart (about a minute when a cluster's admins do it; the outbox does not count it)
# The array test keeps 60 s: with 30 s the sweep synced the offline stores itself before sweep.status (CI, 2026-12-07).
ARRAY_OUTAGE_S = 60.0
TINY = ["model.width=32", "model.depth=1", "data.synth.size=32", "data.synth.n_train=4", "data.synth.n_test=1",
        "train.batch_size=2", "train.val_crop=32", "train.val_slice_step=8", "train.final_slice_step=8",
        "train.open_slabs=2", "train.bn_recalibration_batches=0", "train.early_stop_patience_iters=1000000",
        "train.lr_patience_iters=1000000"]


@pytest.fixture
def own_server(tmp_path):
    """A server of this test's own (stopping the session's server would break the other tests)."""
    box = {"db": postgres_database()}  # the same database after a restart, as a cluster's server keeps it
    box["handle"] = start_mlflow_server(tmp_path / "server", backend_store_uri=box["db"])
    yield box
    box["handle"].stop()


def _restart(box: dict, tmp_path: Path) -> None:
    """Start the stopped server again on the same port and the same database."""
    box["handle"] = start_mlflow_server(tmp_path / "server", port=box["handle"].port, backend_store_uri=box["db"])


def test_outbox_keeps_batches_in_order_through_a_restart_and_raises_for_a_refused_request(tmp_path, own_server):
    uri = own_server["handle"].uri
    exp = tracking.ensure_experiment(uri, "outbox")
    rec = tracking.RunRecorder(uri, exp, run_name="r")
    rec.start()
    box = Outbox(rec, tolerance_s=3600, probe_every_s=0.0)
    box.log_metrics({"val_loss": 1.0}, step=1, timestamp_ms=1_000)
    assert not box.pending and not box.down
    own_server["handle"].stop()
    t0 = time.monotonic()
    for step in (2, 3, 4):
        box.log_metrics({"val_loss": float(step)}, step=step, timestamp_ms=step * 1_000)
    box.set_tags({"during": "outage"})
    assert box.down and len(box.pending) == 4
    # A system-metrics sample (its own step: a sample index) does not move the iteration the outage is stamped with.
    box.log_metrics({"system/cpu_utilization_percentage": 5.0}, step=37, timestamp_ms=4_500)
    assert time.monotonic() - t0 < 20, "an outage must cost the training loop seconds, not minutes of retries"
    _restart(own_server, tmp_path)
    assert box.flush(force=True) and not box.pending and not box.down
    assert len(box.outages) == 1 and box.outage_tag()["tracking_outages"].endswith("s@4")  # not @37 (issue 29)
    client = MlflowClient(uri)
    hist = client.get_metric_history(rec.run_id, "val_loss")
    assert [(m.step, m.timestamp, m.value) for m in hist] == [(s, s * 1000, float(s)) for s in (1, 2, 3, 4)]
    assert client.get_run(rec.run_id).data.tags["during"] == "outage"
    box.log_metrics({"val_loss": 2.0}, step=2, timestamp_ms=2_000)  # a batch sent twice adds nothing
    assert len(client.get_metric_history(rec.run_id, "val_loss")) == 4
    # A refused request is no outage: it fails loudly at once instead of waiting.
    with pytest.raises(tracking.TrackingError) as err:
        box.log_metrics({"x" * 600: 1.0}, step=5)
    assert not isinstance(err.value, tracking.TrackingUnavailable)


def test_outbox_gives_up_after_the_tolerance_and_waits_at_the_end(tmp_path, own_server):
    uri = own_server["handle"].uri
    exp = tracking.ensure_experiment(uri, "tolerance")
    rec = tracking.RunRecorder(uri, exp, run_name="r")
    rec.start()
    now = [0.0]
    box = Outbox(rec, tolerance_s=100, probe_every_s=10, clock=lambda: now[0])
    own_server["handle"].stop()
    box.log_metrics({"a": 1.0}, step=1)
    assert box.down and not box.gave_up
    probes = []
    box._probe = lambda u: probes.append(now[0]) or False
    now[0] = 5.0
    box.log_metrics({"a": 2.0}, step=2)  # within probe_every_s: not even a probe
    assert probes == []
    now[0] = 50.0
    assert not box.wait(20, sleep=lambda s: now.__setitem__(0, now[0] + s))  # waited 20 s of fake time
    assert probes and 70.0 <= now[0] <= 71.0 and not box.gave_up
    now[0] = 101.0
    box.log_metrics({"a": 3.0}, step=3)
    assert box.gave_up and len(box.pending) == 3
    n = len(probes)
    assert not box.wait(1000) and len(probes) == n  # gave up: no more tries, the run ends offline


def _sweep(tmp_path: Path, uri: str, experiment: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, SCALING_UNET_WORK=str(tmp_path / "work"), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "sweep", *TINY, f"mlflow.tracking_uri={uri}", f"mlflow.experiment={experiment}",
           "hydra/launcher=local", "hydra.launcher.n_workers=2", "hydra.launcher.threads_per_worker=1", *extra, "-m"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(tmp_path / "sweep.log", "w"),
                            stderr=subprocess.STDOUT)


def _wait_for_points(uri: str, experiment: str, n_runs: int, timeout: float, log: Path) -> list:
    client = MlflowClient(uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        runs = [r for r in runs if "fold" in r.data.tags]
        if len(runs) == n_runs and all("val_mean_iou" in r.data.metrics for r in runs):
            return runs
        time.sleep(0.5)
    pytest.fail(f"no validation point of {n_runs} runs after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def test_two_training_runs_live_through_a_server_outage(tmp_path, own_server):
    """Stopped after the first validation point, started again OUTAGE_S later on the same database: both runs FINISHED
    with every validation point, including those made while the server was away; the sweep exits 0."""
    uri = own_server["handle"].uri
    proc = _sweep(tmp_path, uri, "outage", "model.input_size=384,512", "fold=0", "train.max_iters=1500",
                  "train.checkpoint_every=150")
    _wait_for_points(uri, "outage", 2, 300, tmp_path / "sweep.log")
    own_server["handle"].stop()
    down = time.time()
    time.sleep(OUTAGE_S)
    assert proc.poll() is None, "the sweep must keep training while the server is away"
    _restart(own_server, tmp_path)
    up = time.time()
    proc.wait(timeout=600)
    out = (tmp_path / "sweep.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    client = MlflowClient(uri)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("outage").experiment_id])
            if "fold" in r.data.tags]
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    made_during = 0
    for r in runs:
        hist = client.get_metric_history(r.info.run_id, "val_mean_iou")
        assert sorted(m.step for m in hist) == list(range(150, 1501, 150)), r.info.run_name
        made_during += sum(down * 1000 <= m.timestamp <= up * 1000 for m in hist)
        assert "mean_iou" in r.data.metrics and {a.path for a in client.list_artifacts(r.info.run_id)} >= {"model"}
    assert made_during >= 2, "validation points made while the server was away, logged with their own time"
    assert "does not answer" in out and "answers again" in out


def test_an_array_whose_runs_end_during_the_outage_exits_well_and_status_brings_them_in(tmp_path, own_server,
                                                                                         slurm_cluster):
    """On the test cluster: both array tasks end while the server is away (mlflow.end_wait_s=0), each records its
    run in its offline store and exits 0 (COMPLETED); once the server is back, sweep.status completes the server
    runs: FINISHED with every validation point, made before and during the outage."""
    uri = own_server["handle"].uri
    work = tmp_path / "work"
    name = "su-test-outage"
    common = [*TINY, f"mlflow.tracking_uri={uri}", "mlflow.experiment=outage-slurm", "model.input_size=384,512",
              "fold=0", "train.max_iters=900", "train.checkpoint_every=150", "mlflow.end_wait_s=0"]
    cmd = [sys.executable, "-m", "sweep", *common, "hydra/launcher=slurm_v100", "allow_stand_in=true",
           "train.cpu_replicas=1", "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10", "hydra.launcher.poll_interval_s=1",
           "hydra.launcher.array_parallelism=2", f"hydra.launcher.name={name}", "-m"]
    env = dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3")
    log = tmp_path / "sweep.log"
    before = {line.split("_")[0] for line in slurm_cluster.run(
        "sacct", "-n", "-X", "-P", f"--name={name}", "--format=JobID").stdout.split()}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    _wait_for_points(uri, "outage-slurm", 2, 400, log)
    own_server["handle"].stop()
    down = time.time()
    def this_array() -> str:  # sacct keeps earlier runs of this test under the same job name
        out = slurm_cluster.run("sacct", "-n", "-X", "-P", f"--name={name}", "--format=JobID,State,ExitCode").stdout
        return "".join(line + "\n" for line in out.splitlines() if line.split("_")[0] not in before)

    ended = slurm_cluster.wait_for("both tasks to end while the server is away", lambda: (
        lambda out: out if out.count("COMPLETED") + out.count("FAILED") >= 2 else None)(this_array()),
        timeout=ARRAY_OUTAGE_S + 240, interval=1)  # on a loaded machine (two pytest workers) the outage lasts longer
    assert ended.count("COMPLETED|0:0") == 2, ended
    time.sleep(max(0.0, ARRAY_OUTAGE_S - (time.time() - down)))
    _restart(own_server, tmp_path)
    up = time.time()
    proc.wait(timeout=300)
    assert proc.returncode == 0, log.read_text()[-4000:]
    stores = sorted(work.glob("checkpoints/*/fold0/mlflow/mlflow.db"))
    assert len(stores) == 2

    status = subprocess.run([sys.executable, "-m", "sweep.status", *common], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert "synced offline stores: 0 runs created" in status.stdout and "2 runs ended" in status.stdout, \
        status.stdout[-3000:] + status.stderr[-3000:]
    assert status.returncode == 0, status.stdout[-3000:] + status.stderr[-3000:]
    client = MlflowClient(uri)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("outage-slurm").experiment_id])
            if "fold" in r.data.tags]
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        hist = client.get_metric_history(r.info.run_id, "val_mean_iou")
        assert sorted(m.step for m in hist) == list(range(150, 901, 150)), r.info.run_name
        assert any(m.timestamp < down * 1000 for m in hist) and any(down * 1000 <= m.timestamp <= up * 1000
                                                                   for m in hist)
        assert r.info.end_time <= up * 1000 and "mean_iou" in r.data.metrics
        assert {"model", "config.yaml"} <= {a.path for a in client.list_artifacts(r.info.run_id)}


def test_a_resumed_run_backfills_the_points_a_killed_job_held_in_memory(tmp_path, own_server):
    """A job preempted during an outage held validation points in memory only; state.json has them all."""
    from sweep.tracking.outbox import backfill
    from sweep.jobs.train import _chunk_metrics

    uri = own_server["handle"].uri
    rec = tracking.RunRecorder(uri, tracking.ensure_experiment(uri, "backfill"), run_name="r")
    rec.start()
    history = [{"iteration": it, "time": 1000.0 + it, "train_loss": 1.0 / it, "val_loss": 2.0, "learning_rate": 1e-3,
                "images_per_s": 5.0, "mean_iou": it / 1000} for it in (100, 200, 300)]
    rec.log_metrics(_chunk_metrics(history[0]), step=100)
    box = Outbox(rec)
    assert backfill(rec, history, _chunk_metrics, box) == 2 and box.flush()
    hist = MlflowClient(uri).get_metric_history(rec.run_id, "val_mean_iou")
    assert sorted((m.step, m.value) for m in hist) == [(100, 0.1), (200, 0.2), (300, 0.3)]
    assert {m.timestamp for m in hist if m.step > 100} == {1_200_000, 1_300_000}  # as of when they were made
    assert backfill(rec, history, _chunk_metrics, box) == 0


@pytest.fixture
def sqlite_server(tmp_path):
    """A server of this test's own on a sqlite file, which a restart keeps (quicker to start than a database)."""
    box = {"db": None}
    box["handle"] = start_mlflow_server(tmp_path / "server")
    yield box
    box["handle"].stop()


def _history(*iterations: int) -> list[dict]:
    return [{"iteration": it, "time": 1000.0 + it, "train_loss": 1.0 / it, "val_loss": 2.0, "learning_rate": 1e-3,
             "images_per_s": 5.0, "mean_iou": it / 1000} for it in iterations]


def _resumed_during_outage(sqlite_server) -> tuple[str, tp.Any, Outbox]:
    """A run whose killed attempt logged its first point only (stamped when it was made, as on_chunk does), resumed
    while the server is away: its outbox owes the checkpoint's history (points 100, 200, 300)."""
    from sweep.jobs.train import _chunk_metrics

    uri = sqlite_server["handle"].uri
    rec = tracking.RunRecorder(uri, tracking.ensure_experiment(uri, "backfill"), run_name="r")
    rec.start()
    history = _history(100, 200, 300)
    rec.log_metrics(_chunk_metrics(history[0]), step=100, timestamp_ms=1_100_000)
    sqlite_server["handle"].stop()
    box = Outbox(rec, tolerance_s=3600, probe_every_s=0.0)
    box.backfill_when_up(history, _chunk_metrics)
    return uri, rec, box


def test_a_backfill_the_server_was_away_for_is_done_once_it_answers(tmp_path, sqlite_server):
    """The requeued job resumes while the server is away: the points its killed attempt held in memory only reach the
    server run at the first flush after the restart, not never."""
    from sweep.jobs.train import _chunk_metrics

    uri, rec, box = _resumed_during_outage(sqlite_server)
    assert box.down and box.owed is not None
    (later,) = _history(400)
    box.log_metrics(_chunk_metrics(later), step=400, timestamp_ms=1_400_000)
    assert not box.flush(force=True)  # still away: still owed
    _restart(sqlite_server, tmp_path)
    assert box.flush(force=True) and box.owed is None
    hist = MlflowClient(uri).get_metric_history(rec.run_id, "val_mean_iou")
    assert sorted((m.step, m.value) for m in hist) == [(100, 0.1), (200, 0.2), (300, 0.3), (400, 0.4)]


def test_a_run_that_ends_before_its_backfill_brings_the_points_through_its_offline_store(tmp_path, sqlite_server):
    """The server stays away until the run ends: the offline store carries the whole history and the sync adds what
    the server run lacks, each point once."""
    from sweep.tracking.offline import SyncCounts, offline_uri, sync_store
    from sweep.tracking.outbox import OfflineEnding, end_offline

    uri, rec, box = _resumed_during_outage(sqlite_server)
    end_offline(box, offline_uri(tmp_path / "ck"), "backfill", "r", OfflineEnding({}, {}, [], []))
    _restart(sqlite_server, tmp_path)
    sync_store(tmp_path / "ck" / "mlflow" / "mlflow.db", uri, "backfill", SyncCounts())
    client = MlflowClient(uri)
    hist = client.get_metric_history(rec.run_id, "val_mean_iou")
    assert sorted((m.step, m.value) for m in hist) == [(100, 0.1), (200, 0.2), (300, 0.3)]
    assert client.get_run(rec.run_id).info.status == "FINISHED"


def test_a_slurm_job_that_starts_during_a_restart_waits_for_the_server(tmp_path, own_server, monkeypatch):
    import threading

    from sweep.jobs import train as task

    uri = own_server["handle"].uri
    own_server["handle"].stop()
    cfg = task.OmegaConf.create({"mlflow": {"start_wait_s": 120}})
    with pytest.raises(tracking.TrackingError, match="unreachable"):
        task._check_tracking_at_start(cfg, uri)  # by hand (no SLURM job): one clear error at once
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setattr(task, "START_POLL_S", 0.5)
    restart = threading.Timer(3.0, _restart, (own_server, tmp_path))
    restart.start()
    t0 = time.monotonic()
    task._check_tracking_at_start(cfg, uri)
    restart.join()
    assert 3.0 <= time.monotonic() - t0 < 60
    own_server["handle"].stop()
    with pytest.raises(tracking.TrackingError, match="unreachable"):
        task._check_tracking_at_start(task.OmegaConf.create({"mlflow": {"start_wait_s": 1}}), uri)
