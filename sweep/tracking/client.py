"""MLflow tracking for one training run: explicit client calls, retries, and loud failures.

Only ``MlflowClient`` is used (no fluent ``mlflow.start_run`` global state), so several runs per process and
resuming a run by id are explicit. Create the experiment once with :func:`ensure_experiment` *before* launching
parallel jobs (concurrent get-or-create races, see shared/platform-facts.md "MLflow 3.17").

Note: for ``http(s)://`` URIs, MLflow's HTTP layer retries on its own (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7,
exponential backoff up to ~4 min per call); :class:`RunRecorder` retries stack on top of that.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
import typing as tp
from collections.abc import Mapping
from pathlib import Path

import tenacity
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

log = logging.getLogger(__name__)

T = tp.TypeVar("T")

TAG_CONFIG_KEY = "config_key"
TAG_FOLD = "fold"
TAG_GIT_COMMIT = "git_commit"
TAG_SLURM_JOB_ID = "slurm_job_id"
TAG_SLURM_ARRAY_JOB_ID = "slurm_array_job_id"
TAG_SLURM_ARRAY_TASK_ID = "slurm_array_task_id"
TAG_HOSTNAME = "hostname"
TAG_FAILURE_REASON = "failure_reason"  # the exception that ended a FAILED run, one line

# Errors that no retry can fix: fail at once instead of backing off.
PERMANENT_ERROR_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST",
    "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_ALREADY_EXISTS",
})
_SLURM_ENV = {
    TAG_SLURM_JOB_ID: "SLURM_JOB_ID",
    TAG_SLURM_ARRAY_JOB_ID: "SLURM_ARRAY_JOB_ID",
    TAG_SLURM_ARRAY_TASK_ID: "SLURM_ARRAY_TASK_ID",
}
# The store checks and the config values live in their own modules; their names stay importable from here.
# The store checks and the config values live in their own modules; their names stay importable from here.
from sweep.core.params import DEFAULT_CONFIG_KEY_EXCLUDE, TRUNCATED_SUFFIX, _flat_items, config_key, flatten, sanitize  # noqa: F401
from sweep.tracking.store import (
    TrackingError,
    TrackingUnavailable,
    _local_store_dir,
    check_tracking_uri,  # noqa: F401
    redact_uri,
)


def _permanent(exc: BaseException) -> bool:
    """A refusal that no retry changes: ours, or an MLflow error code such as INVALID_PARAMETER_VALUE."""
    return isinstance(exc, TrackingError) or (isinstance(exc, MlflowException)
                                              and getattr(exc, "error_code", None) in PERMANENT_ERROR_CODES)


class _LostInsertRace(RuntimeError):
    """Retried like a network error (not a :class:`TrackingError`, which is never retried)."""


def _lost_insert_race(exc: BaseException) -> bool:
    """A unique-constraint refusal from the server's database (PostgreSQL, MySQL, sqlite wording)."""
    text = str(exc)
    return any(s in text for s in ("UniqueViolation", "UNIQUE constraint failed", "Duplicate entry",
                                   "duplicate key value"))


def _retry(fn: tp.Callable[[], T], what: str, uri: str, retries: int, backoff_s: float) -> T:
    """Call ``fn`` up to ``retries`` times, waiting ``backoff_s`` × 2^(try − 1) between tries; then raise
    :class:`TrackingUnavailable` (never drop silently). A permanent refusal is raised at once as :class:`TrackingError`."""
    tries = max(1, int(retries))

    def log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("MLflow at %s: %s failed (try %d/%d), retrying in %.1f s: %s", redact_uri(uri), what,
                    state.attempt_number, tries, state.upcoming_sleep, redact_uri(str(exc)))

    retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(tries),
                                 wait=tenacity.wait_exponential(multiplier=backoff_s, min=0, exp_base=2),
                                 retry=tenacity.retry_if_exception(lambda e: not _permanent(e)),
                                 before_sleep=log_retry, sleep=lambda s: time.sleep(s), reraise=True)
    try:
        return retrying(fn)
    except TrackingError:
        raise
    except MlflowException as e:
        if not _permanent(e):
            raise TrackingUnavailable(f"MLflow at {redact_uri(uri)}: {what} failed after {tries} tries: "
                                      f"{type(e).__name__}: {redact_uri(str(e))}") from e
        raise TrackingError(f"MLflow at {redact_uri(uri)}: {what} failed: {redact_uri(str(e))}") from e
    except Exception as e:  # noqa: BLE001 - network, sqlite locks, server errors: all retried, then raised
        raise TrackingUnavailable(f"MLflow at {redact_uri(uri)}: {what} failed after {tries} tries: "
                                  f"{type(e).__name__}: {redact_uri(str(e))}") from e


def _client(uri: str) -> MlflowClient:
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as e:  # noqa: BLE001 - e.g. a refused file store: say which URI
        raise TrackingError(f"MLflow at {redact_uri(uri)}: cannot create client: {redact_uri(str(e))}") from e


# ----------------------------------------------------------------------------------------------- experiments


def _default_artifact_location(uri: str) -> str | None:
    """Next to a sqlite database (not ``./mlruns`` in whatever the cwd happens to be)."""
    local = _local_store_dir(uri)
    if local is not None and local[0] == "sqlite":
        return (local[1].resolve() / "artifacts").as_uri()
    return None


# MLflow 3's UI opens an experiment by this tag: without it, on its GenAI view (traces), not on the runs table.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# MLflow 3.17's UI obeys the tag only with its GenAI / Model training switch off: with it (the default) each browser
# remembers its own choice, GenAI at first, whatever the tag says; a link with this query opens the runs table.
UI_VIEW = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def is_server_uri(uri: str) -> bool:
    """A tracking server (its own UI), not a local store that ``mlflow ui`` has to serve."""
    return uri.startswith(("http://", "https://"))


def ui_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI: on the tracking server, or where ``mlflow ui
    --backend-store-uri <uri>`` serves a local store (credentials never printed)."""
    base = redact_uri(uri).rstrip("/") if is_server_uri(uri) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs?{UI_VIEW}"


def check_store_exists(uri: str, field: str = "mlflow.tracking_uri") -> None:
    """A store that is read (never written) must exist: MLflow would create an empty sqlite file and find nothing.
    Raises TrackingError naming ``field``; a server must answer (:func:`check_tracking_uri`)."""
    local = _local_store_dir(uri)
    if local is not None and local[0] == "sqlite":
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser()
        if not db.is_file():
            raise TrackingError(f"{field}: no MLflow store at {redact_uri(uri)} (nothing trained there)")
    check_tracking_uri(uri)


def existing_experiment(uri: str, name: str, *, retries: int = 3, backoff_s: float = 0.5) -> str | None:
    """The id of the active experiment ``name``, or None: a reader's lookup, which creates nothing."""
    client = _client(uri)
    exp = _retry(lambda: client.get_experiment_by_name(name), f"get experiment {name!r}", uri, retries, backoff_s)
    return None if exp is None or exp.lifecycle_stage != "active" else str(exp.experiment_id)


def ensure_experiment(uri: str, name: str, *, artifact_location: str | None = None,
                      retries: int = 3, backoff_s: float = 0.5) -> str:
    """Get or create experiment ``name`` and return its id; call once before launching parallel jobs.

    For a ``sqlite:///`` store, new experiments keep artifacts in ``<db folder>/artifacts`` unless
    ``artifact_location`` says otherwise; a server decides for itself.
    """
    client = _client(uri)
    red = redact_uri(uri)
    location = artifact_location if artifact_location is not None else _default_artifact_location(uri)

    def get_or_create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
            except MlflowException as e:
                if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                # Lost a creation race to another process: the winner's experiment is the one to use.
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise TrackingError(f"MLflow at {red}: experiment {name!r} (id {exp.experiment_id}) is "
                                f"{exp.lifecycle_stage}; restore it or choose another name")
        for k, v in EXPERIMENT_TAGS.items():  # experiments made before the tag existed
            if exp.tags.get(k) != v:
                client.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id

    return _retry(get_or_create, f"get-or-create experiment {name!r}", uri, retries, backoff_s)


def environment_tags() -> dict[str, str]:
    """git commit of this checkout, SLURM job ids when present, the hostname and the process id."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    tags = {TAG_GIT_COMMIT: commit, TAG_HOSTNAME: socket.gethostname(), "pid": str(os.getpid())}
    for tag, var in _SLURM_ENV.items():
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    return tags


def _chunks(items: list[T], n: int) -> tp.Iterator[list[T]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# ----------------------------------------------------------------------------------------------- runs


class RunRecorder:
    """One MLflow run, created or resumed by id; every client call retried, then raised as TrackingError."""

    def __init__(self, uri: str, experiment_id: str, *, run_id: str | None = None, run_name: str | None = None,
                 tags: Mapping[str, tp.Any] | None = None, retries: int = 5, backoff_s: float = 0.5):
        self.uri = uri
        self.experiment_id = str(experiment_id)
        self.run_id = run_id
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.retries = retries
        self.backoff_s = backoff_s
        self.client = _client(uri)
        self.start_time: int | None = None  # ms; set before start() to backdate a new run (parent runs)
        self._started = False

    def __repr__(self) -> str:
        return f"RunRecorder({redact_uri(self.uri)!r}, experiment_id={self.experiment_id!r}, run_id={self.run_id!r})"

    def _retry(self, fn: tp.Callable[[], T], what: str) -> T:
        return _retry(fn, what, self.uri, self.retries, self.backoff_s)

    def _run_id(self) -> str:
        if not self._started or self.run_id is None:
            raise TrackingError(f"MLflow at {redact_uri(self.uri)}: run not started; call start() first")
        return self.run_id

    def start(self) -> str:
        """Create the run, or resume ``run_id`` (status back to RUNNING); returns the run id."""
        if self._started:
            return self._run_id()
        tags = {k: sanitize(v, MAX_TAG_VAL_LENGTH) for k, v in self.tags.items()}
        if self.run_id is None:
            run = self._retry(lambda: self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags,
                                                             start_time=self.start_time),
                              f"create run in experiment {self.experiment_id}")
            self.run_id = run.info.run_id
            self._started = True
            return self.run_id
        run_id = self.run_id
        run = self._retry(lambda: self.client.get_run(run_id), f"get run {run_id} to resume")
        if run.info.experiment_id != self.experiment_id:
            raise TrackingError(f"MLflow at {redact_uri(self.uri)}: run {run_id} belongs to experiment "
                                f"{run.info.experiment_id}, not {self.experiment_id}")
        if run.info.lifecycle_stage != "active":
            raise TrackingError(f"MLflow at {redact_uri(self.uri)}: run {run_id} is {run.info.lifecycle_stage}")
        self._retry(lambda: self.client.update_run(run_id, status="RUNNING"), f"set run {run_id} RUNNING")
        self._started = True
        if tags:
            self.set_tags(tags)
        return run_id

    def log_params(self, params: Mapping[str, tp.Any]) -> None:
        """Flattened, sanitized params; identical re-logs are skipped, a changed value raises TrackingError."""
        run_id = self._run_id()
        flat = {k: sanitize(v, MAX_PARAM_VAL_LENGTH) for k, v in flatten(params).items()}
        existing = self._retry(lambda: self.client.get_run(run_id), f"read params of run {run_id}").data.params
        changed = {k: (existing[k], v) for k, v in flat.items() if k in existing and existing[k] != v}
        if changed:
            detail = "; ".join(f"{k}: logged {old[:80]!r}, now {new[:80]!r}" for k, (old, new) in changed.items())
            raise TrackingError(f"MLflow at {redact_uri(self.uri)}: run {run_id} already has different values "
                                f"for param(s) {', '.join(changed)} (MLflow params are immutable): {detail}")
        todo = [Param(k, v) for k, v in flat.items() if k not in existing]
        for batch in _chunks(todo, MAX_PARAMS_TAGS_PER_BATCH):
            self._retry(lambda b=batch: self.client.log_batch(run_id, params=b, synchronous=True),
                        f"log {len(batch)} params to run {run_id}")

    def log_metrics(self, metrics: Mapping[str, tp.Any], step: int | None = None, *,
                    timestamp_ms: int | None = None) -> None:
        """All values in one ``log_batch`` (per 1000 metrics), same timestamp (default now) and step (``None`` -> 0).

        A batch sent again with the same timestamp adds nothing: MLflow keys a value by (key, timestamp, step, value).
        """
        run_id = self._run_id()
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        items = []
        for k, v in _flat_items(metrics, "."):
            try:
                items.append(Metric(str(k), float(v), ts, int(step or 0)))
            except (TypeError, ValueError) as e:
                raise TrackingError(f"MLflow at {redact_uri(self.uri)}: metric {k!r}={v!r} is not a number") from e
        for batch in _chunks(items, MAX_METRICS_PER_BATCH):
            self._retry(lambda b=batch: self.client.log_batch(run_id, metrics=b, synchronous=True),
                        f"log {len(batch)} metrics (step {step}) to run {run_id}")

    def set_tags(self, tags: Mapping[str, tp.Any]) -> None:
        run_id = self._run_id()
        items = [RunTag(str(k), sanitize(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for batch in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._retry(lambda b=batch: self.client.log_batch(run_id, tags=b, synchronous=True),
                        f"set {len(batch)} tags on run {run_id}")

    def log_dataset_inputs(self, inputs: tp.Sequence[tuple[str, str, str, dict, str]]) -> None:
        """MLflow dataset inputs (the runs table's Dataset column): (name, digest, source, profile, context) each;
        MLflow keeps one input per dataset and context, so a resumed run logs them again harmlessly."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        run_id = self._run_id()
        items = [DatasetInput(Dataset(name=name, digest=digest, source_type="local",
                                      source=json.dumps({"uri": sanitize(source)}), profile=json.dumps(profile)),
                              tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
                 for name, digest, source, profile, context in inputs]
        what = f"log dataset inputs of run {run_id}"

        def log_once() -> None:
            try:
                self.client.log_inputs(run_id, datasets=items)
            except MlflowException as e:
                # MLflow's server looks a dataset up, then inserts it: two runs of one fold starting together race
                # there, and the loser is refused; its next try finds the winner's row.
                if _lost_insert_race(e):
                    raise _LostInsertRace(str(e)) from e
                raise

        self._retry(log_once, what)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or a whole folder."""
        run_id = self._run_id()
        p = Path(path)
        if not p.exists():
            raise TrackingError(f"MLflow at {redact_uri(self.uri)}: artifact {sanitize(p)} does not exist")
        if p.is_dir():
            self._retry(lambda: self.client.log_artifacts(run_id, str(p), artifact_path),
                        f"log artifact folder {sanitize(p)} to run {run_id}")
        else:
            self._retry(lambda: self.client.log_artifact(run_id, str(p), artifact_path),
                        f"log artifact {sanitize(p)} to run {run_id}")

    def log_model(self, path: str | os.PathLike, *, name: str = "unet", step: int = 0,
                  tags: Mapping[str, tp.Any] | None = None) -> str:
        """The trained model as an MLflow 3 LoggedModel of this run (the runs table's Models column, the Models tab,
        ``models:/<model id>``): created once per run and name (a rerun finds a READY one), its file uploaded, marked
        READY, linked as the run's output at ``step``. Returns the model id.

        Not named ``model``: MLflow 3 then reads the run's artifact folder ``model/`` (``runs:/<id>/model``, what
        every reader here fetches) as that LoggedModel, through the process-wide tracking URI."""
        import shutil
        import tempfile

        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        run_id = self._run_id()
        p = Path(path)
        if not p.is_file():
            raise TrackingError(f"MLflow at {redact_uri(self.uri)}: model file {sanitize(p)} does not exist")
        # status is filtered here: MLflow 3.17 on PostgreSQL compares it as an integer and refuses 'READY'
        found = self._retry(lambda: self.client.search_logged_models(
            [self.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'"),
            f"find the logged model of run {run_id}")
        ready = [m for m in found if m.status == LoggedModelStatus.READY]
        if ready:
            return ready[0].model_id
        model = self._retry(lambda: self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=run_id, model_type="keras",
            tags={k: sanitize(v, MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()}),
            f"create the logged model of run {run_id}")
        folder = Path(tempfile.mkdtemp(prefix="scaling-unet-model-"))
        try:  # the model's artifacts are a folder; a copy keeps the checkpoint folder's other files out
            shutil.copy2(p, folder / p.name)
            self._retry(lambda: self.client.log_model_artifacts(model.model_id, str(folder)),
                        f"upload the logged model {model.model_id}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self._retry(lambda: self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY),
                    f"finalize the logged model {model.model_id}")
        self._retry(lambda: self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, int(step))]),
                    f"link the logged model {model.model_id} to run {run_id}")
        return model.model_id

    def log_text(self, text: str, artifact_file: str) -> None:
        run_id = self._run_id()
        self._retry(lambda: self.client.log_text(run_id, text, artifact_file),
                    f"log text {artifact_file} to run {run_id}")

    def finish(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        """Terminate the run with ``status`` (FINISHED, FAILED or KILLED); ``end_time`` in ms, default now."""
        run_id = self._run_id()
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"not a terminal MLflow run status: {status!r}")
        self._retry(lambda: self.client.set_terminated(run_id, status=status, end_time=end_time),
                    f"finish run {run_id} as {status}")

    def __enter__(self) -> RunRecorder:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        # On success the caller decides when to finish; on failure mark the run FAILED with one quick try. An
        # exception that carries ``run_status`` (a pruned trial: KILLED) ends the run with it and its ``run_tags``.
        if exc_type is not None and self._started:
            status = getattr(exc, "run_status", "FAILED")
            try:  # why, in one line, beside the status (the MLflow UI shows tags; the job log may be gone)
                reason = f"{exc_type.__name__}: {' '.join(str(exc).split())}"
                tags = dict(getattr(exc, "run_tags", {}) or {}) if status != "FAILED" else {}
                tags.setdefault(TAG_FAILURE_REASON if status == "FAILED" else "end_reason", reason)
                items = [RunTag(str(k), sanitize(str(v)[-MAX_TAG_VAL_LENGTH:], MAX_TAG_VAL_LENGTH))
                         for k, v in tags.items()]
                _retry(lambda: self.client.log_batch(self.run_id, tags=items, synchronous=True),
                       f"tag run {self.run_id} with its end", self.uri, 1, 0.0)
                _retry(lambda: self.client.set_terminated(self.run_id, status=status),
                       f"mark run {self.run_id} {status}", self.uri, 1, 0.0)
            except Exception as e:  # noqa: BLE001 - best effort: the original exception matters more
                log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, redact_uri(str(e)))
        return False


def _quote(value: tp.Any) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_runs(uri: str, experiment_id: str, config_key: str | None = None, fold: int | str | None = None,
              status: str | None = None, *, retries: int = 3, backoff_s: float = 0.5) -> list[Run]:
    """Active runs of the experiment with matching ``config_key`` / ``fold`` tags and status (all pages)."""
    clauses = []
    if config_key is not None:
        clauses.append(f"tags.{TAG_CONFIG_KEY} = {_quote(config_key)}")
    if fold is not None:
        clauses.append(f"tags.{TAG_FOLD} = {_quote(fold)}")
    if status is not None:
        clauses.append(f"attributes.status = {_quote(status)}")
    filter_string = " AND ".join(clauses)
    client = _client(uri)
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = _retry(lambda t=token: client.search_runs([str(experiment_id)], filter_string=filter_string,
                                                         max_results=1000, page_token=t),
                      f"search runs ({filter_string or 'all'})", uri, retries, backoff_s)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def set_run_tags(uri: str, run_id: str, tags: Mapping[str, tp.Any], *, retries: int = 3, backoff_s: float = 0.5) -> None:
    """Tag an existing run without touching its status (e.g. nesting a finished fold run under its parent)."""
    client = _client(uri)
    items = [RunTag(str(k), sanitize(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
    for batch in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
        _retry(lambda b=batch: client.log_batch(run_id, tags=b, synchronous=True),
               f"set {len(batch)} tags on run {run_id}", uri, retries, backoff_s)


def end_run(uri: str, run_id: str, status: str = "KILLED", *, retries: int = 3, backoff_s: float = 0.5) -> None:
    """Mark a run that can no longer finish (its process died before its first checkpoint)."""
    client = _client(uri)
    _retry(lambda: client.set_terminated(run_id, status=status), f"end run {run_id} as {status}", uri, retries, backoff_s)


TAG_IS_PARENT = "is_parent"


def finished_fold_runs(uri: str, experiment_id: str) -> dict[tuple[str, int], dict[str, float]]:
    """Metrics of the FINISHED fold run of each (config_key, fold); parent runs carry no fold and are left out."""
    done: dict[tuple[str, int], dict[str, float]] = {}
    for run in find_runs(uri, experiment_id, status="FINISHED"):
        tags = run.data.tags
        if TAG_CONFIG_KEY in tags and TAG_FOLD in tags and tags.get(TAG_IS_PARENT) != "true":
            done.setdefault((tags[TAG_CONFIG_KEY], int(tags[TAG_FOLD])), dict(run.data.metrics))
    return done

