"""Read runs from an MLflow tracking store: the store checked first, then all runs of the training and fusing
experiments with ONE paginated ``search_runs`` over both experiment ids, as plain :class:`RunRecord` objects.

Training runs (experiment ``scaling-unet``): one run per (config, fold), tags ``config_key``, ``fold``,
``experiment`` (compound/depth/width/input_size/optuna/single); params ``model.width``, ``model.depth``,
``model.input_size``; metrics ``mean_iou``, ``iou_*``, ``flops``, ``params``, ``paper_flops``. Parent
runs (tag ``is_parent=true``, no ``fold``) are ignored.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing as tp
import urllib.parse
import urllib.request
from pathlib import Path

from model.server_health import ServerUnreachable, check_server, redact_uri


class StoreError(ValueError):
    """The tracking store cannot be read (unreachable server, no sqlite file, no such experiment)."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What the analysis needs of one MLflow run (plain values; metrics are the latest values)."""

    run_id: str
    experiment_id: str
    status: str
    start_time: int
    end_time: int
    run_name: str
    tags: tp.Mapping[str, str]
    params: tp.Mapping[str, str]
    metrics: tp.Mapping[str, float]

    @classmethod
    def from_run(cls, run) -> "RunRecord":
        i = run.info
        return cls(run_id=i.run_id, experiment_id=str(i.experiment_id), status=str(i.status),
                   start_time=int(i.start_time or 0), end_time=int(i.end_time or i.start_time or 0),
                   run_name=i.run_name or "", tags=dict(run.data.tags), params=dict(run.data.params),
                   metrics=dict(run.data.metrics))

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    def fold(self) -> tp.Optional[int]:
        v = self.tags.get("fold", self.params.get("fold"))
        try:
            return None if v is None else int(v)
        except ValueError:
            return None

    def int_param(self, name: str) -> tp.Optional[int]:
        v = self.params.get(name)
        try:
            return None if v is None else int(float(v))
        except ValueError:
            return None

    def metric(self, name: str) -> float:
        v = self.metrics.get(name)
        return math.nan if v is None else float(v)


@dataclasses.dataclass
class Runs:
    """The runs of the training experiment and (if it exists) of the fusing experiment."""

    tracking_uri: str
    experiment: str
    fusing_experiment: str
    training: list[RunRecord]
    fusing: tp.Optional[list[RunRecord]]  # None: the fusing experiment does not exist
    read_s: float = 0.0
    search_calls: int = 0


def check_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast instead of creating an empty sqlite file or waiting minutes on HTTP retries."""
    if not uri:
        raise StoreError("empty tracking URI")
    if uri.startswith("sqlite:"):
        path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        if path in ("", ":memory:"):
            raise StoreError(f"tracking URI {uri} names no sqlite file")
        db = Path(path).expanduser()
        if not db.is_file():
            raise StoreError(f"no MLflow store at {uri} (file {db} does not exist)")
        with open(db, "rb") as fh:
            head = fh.read(16)
        if not head:  # mlflow would create its tables in it: a write, from a read-only command
            raise StoreError(f"{db} is empty, not an MLflow store (tracking URI {uri})")
        if head != b"SQLite format 3\x00":
            raise StoreError(f"{db} is not an SQLite database (tracking URI {uri})")
        return
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme in ("http", "https"):
        try:
            check_server(uri, timeout_s)
        except ServerUnreachable as e:
            raise StoreError(str(e)) from None
        return
    if parsed.scheme in ("", "file"):
        folder = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme else uri).expanduser()
        if not folder.is_dir():
            raise StoreError(f"no MLflow file store at {uri}")
        return
    if parsed.scheme.split("+", 1)[0] not in ("postgresql", "mysql", "mssql", "databricks"):
        raise StoreError(f"tracking URI {redact_uri(uri)}: unknown scheme {parsed.scheme!r} "
                         "(use sqlite:///<file>, http(s)://<server> or a database URI)")


def tracking_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def search_all(client, experiment_ids: tp.Sequence[str], page_size: int = 50_000) -> tuple[list[RunRecord], int]:
    """Every active run of the experiments, all pages; returns (records, number of search_runs calls)."""
    out: list[RunRecord] = []
    token, calls = None, 0
    while True:
        page = client.search_runs(list(experiment_ids), max_results=page_size, page_token=token)
        calls += 1
        out.extend(RunRecord.from_run(r) for r in page)
        token = page.token
        if not token:
            return out, calls


def read_runs(tracking_uri: str, experiment: str, fusing_experiment: tp.Optional[str] = None, *,
              need_training: bool = True) -> Runs:
    """All runs of both experiments in one paginated search. StoreError if the store (or, with
    ``need_training``, the training experiment) is missing; an absent fusing experiment gives ``fusing=None``."""
    check_store(tracking_uri)
    fusing_experiment = fusing_experiment or f"{experiment}-fusing"
    t0 = time.perf_counter()
    try:
        client = tracking_client(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        fexp = client.get_experiment_by_name(fusing_experiment)
    except Exception as e:  # noqa: BLE001 - any store failure is "cannot read", with the reason
        raise StoreError(f"cannot read MLflow store {redact_uri(tracking_uri)}: {redact_uri(str(e))}") from None
    if exp is None and need_training:
        raise StoreError(f"no experiment {experiment!r} at {redact_uri(tracking_uri)}")
    ids = [e.experiment_id for e in (exp, fexp) if e is not None]
    try:
        records, calls = search_all(client, ids) if ids else ([], 0)
    except Exception as e:  # noqa: BLE001 - as above
        raise StoreError(f"cannot read MLflow store {redact_uri(tracking_uri)}: {redact_uri(str(e))}") from None
    train_id = None if exp is None else exp.experiment_id
    fusing_id = None if fexp is None else fexp.experiment_id
    return Runs(tracking_uri=tracking_uri, experiment=experiment, fusing_experiment=fusing_experiment,
                training=[r for r in records if r.experiment_id == train_id],
                fusing=None if fexp is None else [r for r in records if r.experiment_id == fusing_id],
                read_s=time.perf_counter() - t0, search_calls=calls)
