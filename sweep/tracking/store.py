"""The MLflow tracking store: reachability and writability checks before any training, URIs without credentials."""

from __future__ import annotations

import logging
import os
import urllib.parse
import urllib.request
from pathlib import Path

from model.server_health import ServerUnreachable, check_server, redact_uri  # noqa: F401 - redact_uri: this package's API

log = logging.getLogger("sweep.tracking")


class TrackingError(RuntimeError):
    """An MLflow tracking problem; the message names the (redacted) tracking URI."""


class TrackingUnavailable(TrackingError):
    """The tracking store did not answer (network, server down, database locked), retries included: an outage that may
    end, unlike a refused request (a permanent MLflow error code), which stays a plain :class:`TrackingError`."""


def _local_store_dir(uri: str) -> tuple[str, Path] | None:
    """(kind, folder that must be writable) for sqlite / file stores; None for other schemes."""
    if uri.startswith("sqlite:"):
        db = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        return None if db in ("", ":memory:") else ("sqlite", Path(db).expanduser().parent)
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme == "file":
        return "file", Path(urllib.request.url2pathname(parsed.path)).expanduser()
    if parsed.scheme == "":
        return "file", Path(uri).expanduser()
    return None


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (before any training) when the tracking store cannot be reached or written."""
    if not uri:
        raise TrackingError("MLflow tracking URI is empty; set it explicitly (no silent ./mlflow.db in the cwd)")
    red = redact_uri(uri)
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme in ("http", "https"):
        _check_http(uri, timeout_s)
        return
    local = _local_store_dir(uri)
    if local is None:
        log.info("check_tracking_uri: no reachability check for scheme of %s", red)
        return
    kind, folder = local
    if kind == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackingError(f"MLflow tracking URI {red} is a file store, which mlflow 3 refuses unless "
                            "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///<path>/mlflow.db instead")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrackingError(f"MLflow {kind} store {red}: cannot create folder {folder}: {e}") from e
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingError(f"MLflow {kind} store {red}: folder {folder} is not a writable directory")
    if kind == "sqlite":
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser()
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise TrackingError(f"MLflow sqlite store {red}: database file {db} is not readable and writable")


def _check_http(uri: str, timeout_s: float) -> None:
    try:
        check_server(uri, timeout_s)
    except ServerUnreachable as e:
        raise TrackingError(str(e)) from e
