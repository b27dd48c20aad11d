"""A training run outlives tracking-server outages: what it logs waits in order and is written when the server answers.

A paper sweep runs for days; the tracking server is restarted, or its database is, in that time. The training job
must not die with it (the run would stay RUNNING on the server with a partial history, and the job would not be
requeued). So, while a run trains:

- every metric batch and tag set goes through an :class:`Outbox`: sent at once while the server answers; kept, in
  order and with the time it was made, while it does not; the next chunk (or the end of training) sends what waits,
  oldest first. A batch sent twice adds nothing (MLflow keys a value by key, timestamp, step and value).
- a server that does not answer is probed once per ``probe_every_s`` with one quick HTTP request instead of MLflow's
  minutes of retries, so an outage costs the training loop seconds, not minutes per chunk;
- a resumed run's validation points that a job killed during an outage held in memory only (state.json has them) are
  compared with the server run at the first flush the server answers, and retried at each flush until that worked
  once (:meth:`Outbox.backfill_when_up`); a run that ends before it did carries them all into its offline store;
- an outage longer than ``mlflow.outage_tolerance_s`` (default 6 h) stops the probing: the run ends in the offline
  store, like one that ends while the server is away (after ``mlflow.end_wait_s`` of waiting for it). The job exits 0;
  ``python -m sweep.sync`` (or ``sweep.status``) copies the run into its server run (tag ``server_run_id``).

A refused request (a permanent MLflow error such as an invalid parameter) is not an outage: it raises at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import typing as tp
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from sweep.tracking.client import RunRecorder, ensure_experiment
from sweep.tracking.store import TrackingError, TrackingUnavailable, redact_uri

log = logging.getLogger(__name__)

TAG_SERVER_RUN_ID = "server_run_id"  # on an offline run: the server run it completes (sweep.sync)
TAG_OUTAGES = "tracking_outages"  # on the server run: outages the run lived through, "<seconds>s@<iteration>", ...
DEFAULT_TOLERANCE_S = 6 * 3600.0
DEFAULT_END_WAIT_S = 120.0
DEFAULT_PROBE_EVERY_S = 15.0


@dataclasses.dataclass
class _Entry:
    kind: str  # "metrics" or "tags"
    values: dict[str, tp.Any]
    step: int = 0
    timestamp_ms: int = 0


@dataclasses.dataclass
class _Owed:
    """A resumed run's history (state.json) not yet compared with the server run (:func:`backfill`)."""

    history: list[dict[str, tp.Any]]
    rename: tp.Callable[[Mapping[str, tp.Any]], dict[str, float]]
    key: str


@contextlib.contextmanager
def _quick_http() -> tp.Iterator[None]:
    """MLflow's own HTTP retries (minutes per call) off while an outage may be on: one try, a short timeout."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "20"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def server_answers(uri: str, timeout_s: float = 3.0) -> bool:
    """One quick probe: True for a local store (nothing to reach) or a server whose /health answers 200."""
    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return True
    from model.server_health import UNREACHABLE, health

    try:
        return health(uri, timeout_s)[0] == 200
    except UNREACHABLE:
        return False


class Outbox:
    """Metric batches and tags of one started :class:`~sweep.tracking.RunRecorder`, written in order when possible."""

    def __init__(self, recorder: RunRecorder, *, tolerance_s: float = DEFAULT_TOLERANCE_S,
                 probe_every_s: float = DEFAULT_PROBE_EVERY_S, clock: tp.Callable[[], float] = time.monotonic,
                 probe: tp.Callable[[str], bool] = server_answers):
        self.recorder = recorder
        self.tolerance_s = float(tolerance_s)
        self.probe_every_s = float(probe_every_s)
        self._clock = clock
        self._probe = probe
        self.pending: list[_Entry] = []
        self.down_since: float | None = None  # clock time the current outage was first seen
        self.gave_up = False  # an outage outlasted tolerance_s: no more tries, the run ends offline
        self.outages: list[tuple[float, int]] = []  # (seconds, iteration when it ended) of outages lived through
        self._last_try = -float("inf")
        self._step = 0  # the last training iteration logged: where an outage ended (tracking_outages tag)
        self.owed: _Owed | None = None  # a backfill not done yet (backfill_when_up)

    # ------------------------------------------------------------------------------------------ what a run logs
    def log_metrics(self, metrics: Mapping[str, tp.Any], step: int | None = None, *,
                    timestamp_ms: int | None = None) -> None:
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        if step is not None and not all(str(k).startswith("system/") for k in metrics):
            self._step = int(step)  # the training iteration (system metrics count their own samples)
        self.pending.append(_Entry("metrics", dict(metrics), int(step or 0), ts))
        self.flush()

    def set_tags(self, tags: Mapping[str, tp.Any]) -> None:
        self.pending.append(_Entry("tags", dict(tags)))
        self.flush()

    def backfill_when_up(self, history: tp.Sequence[Mapping[str, tp.Any]],
                         rename: tp.Callable[[Mapping[str, tp.Any]], dict[str, float]], key: str = "train_loss") -> None:
        """Queue the points of ``history`` the server run lacks (:func:`backfill`) at the first flush the server
        answers: tried now and at every later flush until it worked once (the server may be away at the resume)."""
        self.owed = _Owed([dict(h) for h in history], rename, key) if history else None
        self.flush()

    def _backfill_owed(self) -> None:
        """The owed backfill, done once; raises TrackingUnavailable while the server run cannot be read."""
        if self.owed is None:
            return
        if backfill(self.recorder, self.owed.history, self.owed.rename, self, self.owed.key) is None:
            raise TrackingUnavailable(f"the metric history of run {self.recorder.run_id} could not be read")
        self.owed = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def outage_s(self) -> float:
        return 0.0 if self.down_since is None else self._clock() - self.down_since

    # ------------------------------------------------------------------------------------------ sending
    def flush(self, *, force: bool = False) -> bool:
        """Send what waits, oldest first; True when nothing is left. While the server is away, one probe per
        ``probe_every_s`` (every call with ``force``); raises TrackingError only for a refused request."""
        if not self.pending and self.owed is None:
            return True
        if self.gave_up:
            return False
        now = self._clock()
        if self.down and not force and now - self._last_try < self.probe_every_s:
            return False
        self._last_try = now
        if self.down and not self._probe(self.recorder.uri):
            self._still_down()
            return False
        saved = self.recorder.retries
        try:
            with _quick_http():
                self.recorder.retries = 1 if self.down else min(saved, 2)
                self._backfill_owed()
                while self.pending:
                    e = self.pending[0]
                    if e.kind == "metrics":
                        self.recorder.log_metrics(e.values, step=e.step, timestamp_ms=e.timestamp_ms)
                    else:
                        self.recorder.set_tags(e.values)
                    self.pending.pop(0)
        except TrackingUnavailable as exc:
            if not self.down:
                self.down_since = now
                log.warning("MLflow at %s does not answer (%s): the run keeps training; %d log batch(es) wait and "
                            "are sent when it answers (for up to %.0f s)", redact_uri(self.recorder.uri),
                            redact_uri(str(exc))[:300], len(self.pending), self.tolerance_s)
            self._still_down()
            return False
        finally:
            self.recorder.retries = saved
        if self.down:
            seconds = self._clock() - tp.cast(float, self.down_since)
            self.outages.append((seconds, self._step))
            log.warning("MLflow at %s answers again after %.0f s; the waiting log batches were sent in order",
                        redact_uri(self.recorder.uri), seconds)
            self.down_since = None
        return True

    def _still_down(self) -> None:
        if self.down_since is None:
            self.down_since = self._clock()
            log.warning("MLflow at %s does not answer: the run keeps training; its log batches wait",
                        redact_uri(self.recorder.uri))
        if self.outage_s() > self.tolerance_s and not self.gave_up:
            self.gave_up = True
            log.error("MLflow at %s has not answered for %.0f s (mlflow.outage_tolerance_s=%.0f): no more tries; the "
                      "run will be recorded in its offline store (python -m sweep.sync copies it)",
                      redact_uri(self.recorder.uri), self.outage_s(), self.tolerance_s)

    def wait(self, wait_s: float, *, sleep: tp.Callable[[float], None] = time.sleep) -> bool:
        """Flush, waiting up to ``wait_s`` for an absent server (the end of training); True when all was sent."""
        deadline = self._clock() + max(0.0, float(wait_s))
        while not self.flush(force=True):
            if self.gave_up or self._clock() >= deadline:
                return False
            sleep(min(self.probe_every_s, max(0.0, deadline - self._clock())))
        return True

    def outage_tag(self) -> dict[str, str]:
        if not self.outages:
            return {}
        return {TAG_OUTAGES: ",".join(f"{s:.0f}s@{it}" for s, it in self.outages)}


# ---------------------------------------------------------------------------------------------- the offline ending


@dataclasses.dataclass
class OfflineEnding:
    """What the end of a run writes (its last metrics, artifacts, status) when the server is away: into the run's
    offline store, as a run tagged with the server run it completes."""

    params: dict[str, tp.Any]
    tags: dict[str, tp.Any]
    artifacts: list[tuple[Path, str | None]]  # (file or folder, artifact path)
    texts: list[tuple[str, str]]  # (text, artifact file)


def end_offline(outbox: Outbox, store_uri: str, experiment: str, run_name: str | None, ending: OfflineEnding,
                status: str = "FINISHED") -> str:
    """Record the run in the offline store ``store_uri``: its params, tags, every log batch the server did not get,
    its artifacts and ``status``; returns the offline run id. ``sweep.sync`` copies it into the server run."""

    server_run_id = outbox.recorder.run_id
    exp_id = ensure_experiment(store_uri, experiment)
    tags = {**ending.tags, TAG_SERVER_RUN_ID: server_run_id, **outbox.outage_tag()}
    local = RunRecorder(store_uri, exp_id, run_name=run_name, tags=tags)
    local.start()
    local.log_params(ending.params)
    if outbox.owed is not None:  # never compared with the server run: all of it (sweep.sync adds what it lacks)
        _queue(outbox, outbox.owed.history, outbox.owed.rename)
        outbox.owed = None
    for e in outbox.pending:
        if e.kind == "metrics":
            local.log_metrics(e.values, step=e.step, timestamp_ms=e.timestamp_ms)
        else:
            local.set_tags(e.values)
    for path, artifact_path in ending.artifacts:
        local.log_artifact(path, artifact_path)
    for text, artifact_file in ending.texts:
        local.log_text(text, artifact_file)
    local.finish(status)
    outbox.pending.clear()
    return tp.cast(str, local.run_id)


def backfill(recorder: RunRecorder, history: tp.Sequence[Mapping[str, tp.Any]],
             rename: tp.Callable[[Mapping[str, tp.Any]], dict[str, float]], outbox: Outbox,
             key: str = "train_loss") -> int | None:
    """Queue the validation points of ``history`` (state.json) that the server run lacks: those a job killed during
    an outage (preempted, timed out) held in memory only. Returns how many were queued; None while the server is
    away (try again: :meth:`Outbox.backfill_when_up` does)."""
    run_id = tp.cast(str, recorder.run_id)
    try:
        have = {m.step for m in recorder._retry(lambda: recorder.client.get_metric_history(run_id, key),
                                                f"read the {key} history of run {run_id}")}
    except TrackingUnavailable as exc:
        log.warning("could not read the metric history of run %s to backfill it: %s", run_id, str(exc)[:300])
        return None
    except TrackingError as exc:  # refused: no later try changes that
        log.error("run %s refused its metric history; not backfilled: %s", run_id, str(exc)[:300])
        return 0
    todo = [h for h in history if int(h["iteration"]) not in have]
    _queue(outbox, todo, rename)
    if todo:
        log.warning("run %s lacked %d validation point(s) of its checkpoint's history: queued", recorder.run_id,
                    len(todo))
    return len(todo)


def _queue(outbox: Outbox, history: tp.Iterable[Mapping[str, tp.Any]],
           rename: tp.Callable[[Mapping[str, tp.Any]], dict[str, float]]) -> None:
    """History points as metric batches at their iteration, stamped when they were made."""
    for h in history:
        ts = int(float(h.get("time", time.time())) * 1000)
        outbox.pending.append(_Entry("metrics", rename(h), int(h["iteration"]), ts))


__all__ = ["Outbox", "OfflineEnding", "end_offline", "backfill", "server_answers", "TAG_SERVER_RUN_ID",
           "TAG_OUTAGES", "TrackingError"]
