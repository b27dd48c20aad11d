"""The MLflow tracking store: reachability and writability checks before any training, URIs without credentials."""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

log = logging.getLogger("sweep.tracking")

_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]*@")


class TrackingError(RuntimeError):
    """An MLflow tracking problem; the message names the (redacted) tracking URI."""


class TrackingUnavailable(TrackingError):
    """The tracking store did not answer (network, server down, database locked), retries included: an outage that may
    end, unlike a refused request (a permanent MLflow error code), which stays a plain :class:`TrackingError`."""


def redact_uri(uri: str) -> str:
    """``uri`` without ``user:pass@`` (also inside longer text such as exception messages)."""
    return _USERINFO_RE.sub(r"\g<scheme>", str(uri))


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
    from model.server_health import UNREACHABLE, health, server_get

    red = redact_uri(uri)
    try:
        status, body = health(uri, timeout_s)
    except UNREACHABLE as e:
        raise TrackingError(f"MLflow tracking server at {red} is unreachable: {redact_uri(str(e))}") from e
    if status != 200:
        raise TrackingError(f"MLflow tracking server at {red} is unreachable: /health answered {status}: {body[:200]}")
    # /health answers 200 even when the API refuses this Host header (platform-facts), so probe the API too.
    try:
        status, body = server_get(uri, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default", timeout_s)
    except UNREACHABLE as e:
        raise TrackingError(f"MLflow tracking server at {red} is unreachable: {redact_uri(str(e))}") from e
    if status in (401, 403):
        hint = " (start the server with --allowed-hosts naming this host)" if "Host header" in body else ""
        raise TrackingError(f"MLflow tracking server at {red} refuses API requests: {status} {body[:200]}{hint}")


# ----------------------------------------------------------------------------------------------- retries
