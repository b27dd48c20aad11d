"""Offline compute nodes: each run logs to a SQLite store in its own folder, synced to the server later.

With ``mlflow.offline=true`` a training job records its run in ``<checkpoint folder>/mlflow/mlflow.db``
(artifacts next to it) instead of ``mlflow.tracking_uri``, which only the login node must reach.

    python -m sweep.sync +experiment=compound mlflow=server     # or: python -m sweep.status ... --sync

copies every offline run under ``paths.checkpoints`` to the server: the server run is found by the
tag ``offline_run_id`` (the local run id), and only what it lacks is added (params, metric values
by key, step and timestamp, artifacts by path, tags, the end status), so syncing twice adds nothing
and a run synced while it was still RUNNING is completed by the next sync.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import typing as tp
from pathlib import Path

from sweep.tracking import client as tracking

log = logging.getLogger(__name__)

STORE_DIR = "mlflow"
TAG_OFFLINE_ID = "offline_run_id"
from sweep.tracking.outbox import TAG_SERVER_RUN_ID  # noqa: E402 - an offline run that completes a server run (server away)


def offline_uri(ckpt_dir: Path) -> str:
    return f"sqlite:///{Path(ckpt_dir).resolve() / STORE_DIR / 'mlflow.db'}"


def stores(checkpoints: Path) -> list[Path]:
    """Offline stores of all runs under the checkpoint folder (``<key>/fold<k>/mlflow/mlflow.db``)."""
    return sorted(Path(checkpoints).glob(f"*/fold*/{STORE_DIR}/mlflow.db"))


@dataclasses.dataclass
class SyncCounts:
    runs_created: int = 0
    params: int = 0
    metrics: int = 0
    artifacts: int = 0
    finished: int = 0
    unchanged: int = 0

    def __str__(self) -> str:
        return (f"{self.runs_created} runs created, {self.params} params, {self.metrics} metric values, "
                f"{self.artifacts} artifacts, {self.finished} runs ended, {self.unchanged} runs already in sync")


def _artifact_paths(client, run_id: str, path: tp.Optional[str] = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def _server_run(remote, run_id: str, experiment_id: str) -> list:
    """[the server run ``run_id``] when it exists in ``experiment_id`` and is active; else [] (a new run is made)."""
    from mlflow.exceptions import MlflowException

    try:
        run = remote.get_run(run_id)
    except MlflowException as exc:
        log.warning("server run %s named by an offline store is gone (%s): the offline run becomes a new run",
                    run_id, exc)
        return []
    if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        log.warning("server run %s named by an offline store is not an active run of experiment %s: the offline run "
                    "becomes a new run", run_id, experiment_id)
        return []
    return [run]


def sync_store(db: Path, uri: str, experiment: str, counts: SyncCounts) -> None:
    """Copy the runs of one offline store into ``experiment`` on ``uri``, adding only what is missing."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    local = MlflowClient(f"sqlite:///{db}")
    exp = local.get_experiment_by_name(experiment)
    if exp is None:
        return
    remote = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(uri, experiment)
    for run in local.search_runs([exp.experiment_id], max_results=1000):
        rid = run.info.run_id
        found = remote.search_runs([experiment_id], filter_string=f"tags.{TAG_OFFLINE_ID} = '{rid}'", max_results=2)
        server_run_id = run.data.tags.get(TAG_SERVER_RUN_ID)
        if not found and server_run_id:  # the end of a run whose server was away (sweep.tracking.outbox): complete that run
            found = _server_run(remote, server_run_id, experiment_id)
        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") and k != TAG_SERVER_RUN_ID}
        tags[TAG_OFFLINE_ID] = rid
        if found:
            target = found[0]
        else:
            target = remote.create_run(experiment_id, run_name=run.info.run_name, start_time=run.info.start_time,
                                       tags=tags)
            counts.runs_created += 1
        tid = target.info.run_id
        changed = not found
        new_tags = [RunTag(k, v) for k, v in tags.items() if target.data.tags.get(k) != v]
        params = [Param(k, v) for k, v in run.data.params.items() if k not in target.data.params]
        metrics = []
        for key in run.data.metrics:
            have = {(m.step, m.timestamp, m.value) for m in remote.get_metric_history(tid, key)} \
                if key in target.data.metrics else set()
            metrics += [Metric(key, m.value, m.timestamp, m.step) for m in local.get_metric_history(rid, key)
                        if (m.step, m.timestamp, m.value) not in have]
        for i in range(0, max(len(params), len(metrics), len(new_tags)), 100):
            remote.log_batch(tid, metrics=metrics[i:i + 100], params=params[i:i + 100], tags=new_tags[i:i + 100])
        counts.params += len(params)
        counts.metrics += len(metrics)
        changed |= bool(params or metrics or new_tags)
        missing = sorted(_artifact_paths(local, rid) - _artifact_paths(remote, tid))
        if missing:
            with tempfile.TemporaryDirectory() as tmp:
                for path in missing:
                    got = local.download_artifacts(rid, path, tmp)
                    parent = os.path.dirname(path) or None
                    remote.log_artifact(tid, got, parent)
            counts.artifacts += len(missing)
            changed = True
        if run.info.status != "RUNNING" and target.info.status != run.info.status:
            remote.set_terminated(tid, status=run.info.status, end_time=run.info.end_time)
            counts.finished += 1
            changed = True
        if not changed:
            counts.unchanged += 1


def sync_pairs(ckpt_dirs: tp.Iterable[Path], uri: str, experiment: str) -> SyncCounts:
    """Sync the offline stores of these runs' checkpoint folders, if any (the end of a sweep: runs that ended while
    the server was away, or ran with mlflow.offline=true), so their server runs are complete before parents."""
    counts = SyncCounts()
    for d in ckpt_dirs:
        db = Path(d) / STORE_DIR / "mlflow.db"
        if db.is_file():
            check_store(db)
            sync_store(db, uri, experiment, counts)
    return counts


def check_store(db: Path) -> None:
    """An offline store that can be read (an MLflow SQLite database), or TrackingError naming the file."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            con.execute("SELECT count(*) FROM runs").fetchone()
    except sqlite3.Error as exc:
        raise tracking.TrackingError(f"offline store {db}: not a readable MLflow store ({exc}); move it away or "
                                     "restore it, then sync again") from None


def sync_all(checkpoints: Path, uri: str, experiment: str) -> SyncCounts:
    tracking.check_tracking_uri(uri)
    found = stores(checkpoints)
    for db in found:  # every store readable before anything is copied
        check_store(db)
    counts = SyncCounts()
    for db in found:
        sync_store(db, uri, experiment, counts)
    return counts
