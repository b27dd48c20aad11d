"""sweep.tracking against a real MLflow server (started once per session) and a local sqlite store."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweep.tracking import client as tracking
from sweep.tracking.client import RunRecorder, TrackingError
from tests.mlflow_server import free_port, mlflow_server, start_mlflow_server  # noqa: F401


@pytest.fixture
def fast_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own HTTP retries (7, up to ~4 min per call) off, so RunRecorder's retries are the only ones."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_ensure_experiment_idempotent_and_race_free(mlflow_server):
    uri = mlflow_server.uri
    name = unique("exp")
    first = tracking.ensure_experiment(uri, name)
    assert tracking.ensure_experiment(uri, name) == first

    raced = unique("race")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: tracking.ensure_experiment(uri, raced), range(4)))
    assert len(set(ids)) == 1
    client = MlflowClient(uri)
    assert client.get_experiment(ids[0]).name == raced
    assert [e.name for e in client.search_experiments(filter_string=f"name = '{raced}'")] == [raced]
    # MLflow 3's UI opens the runs table (not its GenAI view) for experiments of this kind; an older one gets the tag
    assert client.get_experiment(ids[0]).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment(unique("old"))
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    tracking.ensure_experiment(uri, client.get_experiment(old).name)
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_ui_url_opens_the_runs_table_and_never_prints_credentials():
    from sweep.tracking.client import ui_url

    # MLflow 3.17's UI picks GenAI or model training from the link (or the browser's remembered switch)
    assert ui_url("http://alice:s3cret@mlflow.lab:5000/", "7") == \
        "http://mlflow.lab:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert ui_url("http://mlflow.lab:5000", "7") == "http://mlflow.lab:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert ui_url("sqlite:////data/work/mlflow.db", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"


def test_ensure_experiment_lost_creation_race_rereads(mlflow_server, monkeypatch):
    """Another job creates the experiment between our lookup and our create: its id is returned."""
    uri = mlflow_server.uri
    name = unique("lost")
    winner = MlflowClient(uri).create_experiment(name)
    real = tracking._client

    def stale_first_lookup(u):
        client = real(u)
        lookup, calls = client.get_experiment_by_name, []

        def get_experiment_by_name(n):
            calls.append(n)
            return None if len(calls) == 1 else lookup(n)

        client.get_experiment_by_name = get_experiment_by_name
        return client

    monkeypatch.setattr(tracking, "_client", stale_first_lookup)
    # retries=1: only the RESOURCE_ALREADY_EXISTS re-read, not a second try, can give the winner's id
    assert tracking.ensure_experiment(uri, name, retries=1) == winner


def test_run_logs_everything_and_finishes(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    exp = tracking.ensure_experiment(uri, unique("run"))
    art = tmp_path / "model.txt"
    art.write_text("weights")
    tags = {tracking.TAG_CONFIG_KEY: "abc123abc123", tracking.TAG_FOLD: "0", **tracking.environment_tags()}
    with RunRecorder(uri, exp, run_name="w16-d4-fold0", tags=tags) as rec:
        rec.log_params({"model": {"width": 16, "depth": 4}, "train": {"lr": 1e-3, "planes": [0, 1, 2]},
                        "data": {"dataset": str(Path.home() / "data" / "prepared")}})
        rec.log_metrics({"train_loss": 0.9, "val_loss": 1.1}, step=10)
        rec.log_metrics({"train_loss": 0.5, "val_loss": 0.7}, step=20)
        rec.set_tags({"stage": "final"})
        rec.log_artifact(art, "model")
        rec.log_text("a: 1\n", "config.yaml")
        rec.finish()

    client = MlflowClient(uri)
    run = client.get_run(rec.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "w16-d4-fold0"
    assert run.data.params["model.width"] == "16"
    assert run.data.params["train.planes"] == "[0, 1, 2]"
    assert run.data.params["data.dataset"] == "~/data/prepared"
    assert run.data.tags["stage"] == "final"
    assert run.data.tags[tracking.TAG_CONFIG_KEY] == "abc123abc123"
    assert run.data.tags[tracking.TAG_GIT_COMMIT]
    assert [(m.step, m.value) for m in client.get_metric_history(rec.run_id, "train_loss")] == [(10, 0.9), (20, 0.5)]
    assert {f.path for f in client.list_artifacts(rec.run_id)} == {"model", "config.yaml"}
    got = client.download_artifacts(rec.run_id, "model/model.txt", str(tmp_path / "dl"))
    assert Path(got).read_text() == "weights"


def test_resume_continues_the_same_run(mlflow_server):
    uri = mlflow_server.uri
    exp = tracking.ensure_experiment(uri, unique("resume"))
    params = {"model": {"width": 8}, "seed": 1}
    first = RunRecorder(uri, exp, tags={tracking.TAG_CONFIG_KEY: "k", tracking.TAG_FOLD: "1"})
    run_id = first.start()
    first.log_params(params)
    first.log_metrics({"loss": 1.0}, step=1)
    # ... the job is killed here: no finish(); a restarted job resumes by id.
    second = RunRecorder(uri, exp, run_id=run_id)
    assert second.start() == run_id
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    second.log_params(params)  # identical values on resume are fine
    with pytest.raises(TrackingError, match=r"model\.width"):
        second.log_params({"model": {"width": 16}})
    second.log_metrics({"loss": 0.5}, step=2)
    second.finish()

    runs = client.search_runs([exp])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 1.0), (2, 0.5)]
    assert runs[0].data.params["model.width"] == "8"


def test_context_manager_marks_failed_on_exception(mlflow_server):
    uri = mlflow_server.uri
    exp = tracking.ensure_experiment(uri, unique("fail"))
    with pytest.raises(ZeroDivisionError):
        with RunRecorder(uri, exp) as rec:
            1 / 0
    assert MlflowClient(uri).get_run(rec.run_id).info.status == "FAILED"


def test_find_runs_filters(mlflow_server):
    uri = mlflow_server.uri
    exp = tracking.ensure_experiment(uri, unique("find"))
    ids = {}
    for key in ("aaaaaaaaaaaa", "bbbbbbbbbbbb"):
        for fold in (0, 1):
            rec = RunRecorder(uri, exp, tags={tracking.TAG_CONFIG_KEY: key, tracking.TAG_FOLD: str(fold)})
            ids[key, fold] = rec.start()
            if fold == 0:
                rec.finish()
    assert len(tracking.find_runs(uri, exp)) == 4
    assert {r.info.run_id for r in tracking.find_runs(uri, exp, config_key="aaaaaaaaaaaa")} == \
        {ids["aaaaaaaaaaaa", 0], ids["aaaaaaaaaaaa", 1]}
    assert [r.info.run_id for r in tracking.find_runs(uri, exp, config_key="bbbbbbbbbbbb", fold=1)] == \
        [ids["bbbbbbbbbbbb", 1]]
    assert {r.info.run_id for r in tracking.find_runs(uri, exp, status="FINISHED")} == \
        {ids["aaaaaaaaaaaa", 0], ids["bbbbbbbbbbbb", 0]}
    assert tracking.find_runs(uri, exp, config_key="aaaaaaaaaaaa", fold=1, status="FINISHED") == []


def test_server_dying_mid_run_raises(tmp_path, fast_http):
    server = start_mlflow_server(tmp_path / "doomed")
    try:
        exp = tracking.ensure_experiment(server.uri, "doomed")
        rec = RunRecorder(server.uri, exp, retries=2, backoff_s=0.1)
        rec.start()
        rec.log_metrics({"loss": 1.0}, step=1)
    finally:
        server.stop()
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=r"after 2 tries") as err:
        rec.log_metrics({"loss": 0.5}, step=2)
    assert time.monotonic() - t0 < 30
    assert server.uri in str(err.value)


def test_check_tracking_uri_closed_port_is_loud():
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable") as err:
        tracking.check_tracking_uri(uri, timeout_s=2.0)
    assert time.monotonic() - t0 < 5
    assert uri in str(err.value)


def test_check_tracking_uri_ok_and_credentials_redacted(mlflow_server):
    tracking.check_tracking_uri(mlflow_server.uri)
    secret = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError) as err:
        tracking.check_tracking_uri(secret, timeout_s=2.0)
    assert "s3cret" not in str(err.value) and "alice" not in str(err.value)
    assert tracking.redact_uri("postgresql://u:p@db:5432/x") == "postgresql://db:5432/x"


def test_check_tracking_uri_refused_host_header(mlflow_server):
    """/health says 200 for any Host, the API refuses names not in --allowed-hosts: the check must see that."""
    name = socket.gethostname()
    try:
        loopback = socket.gethostbyname(name).startswith("127.")
    except OSError:
        loopback = False
    if name == "localhost" or not loopback:
        pytest.skip("needs a hostname other than localhost that resolves to loopback")
    with pytest.raises(TrackingError, match="allowed-hosts"):
        tracking.check_tracking_uri(f"http://{name}:{mlflow_server.port}")


def test_check_tracking_uri_local_stores(tmp_path, monkeypatch):
    tracking.check_tracking_uri(f"sqlite:///{tmp_path}/new/sub/mlflow.db")
    assert (tmp_path / "new" / "sub").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TrackingError, match="sqlite"):
        tracking.check_tracking_uri(f"sqlite:///{blocker}/mlflow.db")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingError, match="MLFLOW_ALLOW_FILE_STORE"):
        tracking.check_tracking_uri((tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking.check_tracking_uri((tmp_path / "mlruns").as_uri())
    with pytest.raises(TrackingError, match="file"):
        tracking.check_tracking_uri(str(blocker / "mlruns"))


def test_sqlite_store_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written to the cwd by mistake lands here, not in the repo
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    tracking.check_tracking_uri(uri)
    exp = tracking.ensure_experiment(uri, "local")
    assert tracking.ensure_experiment(uri, "local") == exp
    with RunRecorder(uri, exp, tags={tracking.TAG_FOLD: "3"}) as rec:
        rec.log_params({"a": 1})
        rec.log_metrics({"m": 2.0}, step=5)
        rec.log_text("hello", "notes.txt")
        rec.finish()
    client = MlflowClient(uri)
    run = client.get_run(rec.run_id)
    assert (run.info.status, run.data.params, run.data.metrics) == ("FINISHED", {"a": "1"}, {"m": 2.0})
    assert [r.info.run_id for r in tracking.find_runs(uri, exp, fold=3, status="FINISHED")] == [rec.run_id]
    assert (tmp_path / "store" / "artifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()


def test_config_key_ignores_fold_and_bookkeeping():
    cfg = {"model": {"width": 16, "depth": 4}, "train": {"lr": 1e-3}, "fold": 0,
           "mlflow": {"tracking_uri": "http://a"}, "paths": {"checkpoints": "/x"}}
    key = tracking.config_key(cfg)
    assert len(key) == 12 and int(key, 16) >= 0
    reordered = {"train": {"lr": 1e-3}, "model": {"depth": 4, "width": 16}, "fold": 3,
                 "mlflow": {"tracking_uri": "http://b"}, "paths": {"checkpoints": "/y"}, "hydra": {"job": 1}}
    assert tracking.config_key(reordered) == key
    assert tracking.config_key({**cfg, "model": {"width": 32, "depth": 4}}) != key
    assert tracking.config_key(cfg, exclude=("train",)) != key
    assert tracking.config_key({**cfg, "train": {"lr": 5}}, exclude=("train.lr",)) == tracking.config_key(
        cfg, exclude=("train.lr",))
    assert key == "%s" % tracking.config_key(dict(cfg))  # stable across calls


def test_flatten_and_sanitize(monkeypatch, tmp_path):
    flat = tracking.flatten({"a": {"b": {"c": 1}}, "d": [1, 2], "e": None})
    assert flat == {"a.b.c": "1", "d": "[1, 2]", "e": "None"}
    home = str(Path.home())
    assert tracking.sanitize(f"{home}/data/x.h5") == "~/data/x.h5"
    assert tracking.sanitize(f"--in={home}/a --out={home}") == "--in=~/a --out=~"
    assert tracking.sanitize(f"/mnt{home}/x") == f"/mnt{home}/x"
    monkeypatch.chdir(tmp_path)
    assert tracking.sanitize(f"{os.getcwd()}/runs/a") == "runs/a"
    long = tracking.sanitize("x" * 10_000)
    assert len(long) == tracking.MAX_PARAM_VAL_LENGTH and long.endswith(tracking.TRUNCATED_SUFFIX)
    assert len(tracking.sanitize("x" * 10_000, limit=None)) == 10_000


def test_environment_tags(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    tags = tracking.environment_tags()
    assert tags[tracking.TAG_SLURM_JOB_ID] == "123" and tags[tracking.TAG_SLURM_ARRAY_TASK_ID] == "7"
    assert tracking.TAG_SLURM_ARRAY_JOB_ID not in tags
    commit = tags[tracking.TAG_GIT_COMMIT]
    assert tags[tracking.TAG_HOSTNAME] and (commit == "unknown" or len(commit) == 40)


def test_runs_of_one_fold_log_the_same_new_dataset_at_once(mlflow_server):
    """The array tasks of one fold start together: the server's look-up-then-insert of a dataset races (PostgreSQL
    refuses the loser with a unique violation, seen in CI); every run still gets both inputs, each dataset once."""
    uri = mlflow_server.uri
    exp = tracking.ensure_experiment(uri, unique("datasets"))
    n = 8
    recorders = [RunRecorder(uri, exp, run_name=f"r{i}", retries=6, backoff_s=0.05) for i in range(n)]
    for rec in recorders:
        rec.start()
    digest = uuid.uuid4().hex[:12]
    inputs = [("prepared/fold0/training", digest, "data/prepared", {"samples": ["a", "b"]}, "training"),
              ("prepared/fold0/validation", digest[::-1], "data/prepared", {"samples": ["c"]}, "validation")]
    barrier = __import__("threading").Barrier(n)

    def log(rec: RunRecorder) -> None:
        barrier.wait()
        rec.log_dataset_inputs(inputs)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        list(pool.map(log, recorders))
    client = MlflowClient(uri)
    for rec in recorders:
        got = {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in client.get_run(rec.run_id).inputs.dataset_inputs}
        assert got == {("prepared/fold0/training", digest, "training"),
                       ("prepared/fold0/validation", digest[::-1], "validation")}
        rec.finish()


def test_a_lost_dataset_insert_race_is_retried_not_fatal(mlflow_server, monkeypatch):
    """Deterministic form of the race above: the first call is refused as the server refuses the loser."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE

    uri = mlflow_server.uri
    exp = tracking.ensure_experiment(uri, unique("datasets-lost"))
    rec = RunRecorder(uri, exp, retries=3, backoff_s=0.01)
    rec.start()
    real, calls = rec.client.log_inputs, []

    def refused_once(run_id, datasets=None, **kw):
        calls.append(run_id)
        if len(calls) == 1:
            raise MlflowException('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint '
                                  '"dataset_pk"', error_code=BAD_REQUEST)
        return real(run_id, datasets=datasets, **kw)

    monkeypatch.setattr(rec.client, "log_inputs", refused_once)
    rec.log_dataset_inputs([("d", "0123456789ab", "data", {}, "training")])
    assert len(calls) == 2
    assert [d.dataset.name for d in MlflowClient(uri).get_run(rec.run_id).inputs.dataset_inputs] == ["d"]
    # Any other refusal stays one clear error, not retried.
    calls.clear()
    monkeypatch.setattr(rec.client, "log_inputs", lambda *a, **k: (calls.append(1), (_ for _ in ()).throw(
        MlflowException("bad dataset", error_code=INVALID_PARAMETER_VALUE)))[1])
    with pytest.raises(TrackingError, match="log dataset inputs .* bad dataset"):
        rec.log_dataset_inputs([("d", "0123456789ab", "data", {}, "training")])
    assert calls == [1]
    rec.finish()
