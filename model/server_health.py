"""HTTP probes of an MLflow tracking server (``/health``, an API path), for every command that checks a server before it
works (sweep.store before a sweep, model.predict before loading ``runs:/`` models, analysis.results before
reading runs). In model/ because model/ may not import sweep/ or analysis/, while both may import model/."""

from __future__ import annotations

import base64
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request

UNREACHABLE = (urllib.error.URLError, OSError, ValueError)  # what server_get() raises for a server it cannot reach


def health(uri: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """(HTTP status, start of the body) of ``<uri>/health``; raises one of :data:`UNREACHABLE` when no answer."""
    return server_get(uri, "/health", timeout_s)


def server_get(uri: str, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """(HTTP status, start of the body) of a GET of ``<uri><path>``; raises one of :data:`UNREACHABLE`.

    Sent with the credentials and TLS settings the MLflow client would use (user:password in the URI or
    MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH), so the probe sees what the client will see.
    """
    parsed = urllib.parse.urlsplit(uri)
    netloc = parsed.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"  # IPv6 literal
    if parsed.port:
        netloc = f"{netloc}:{parsed.port}"
    base = urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path.rstrip("/"), "", ""))
    user, password = parsed.username, parsed.password
    if user is None and os.environ.get("MLFLOW_TRACKING_USERNAME"):
        user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    headers = {}
    if user is not None:
        token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    context = None
    if parsed.scheme == "https":
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
            context = ssl._create_unverified_context()
        else:
            context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    req = urllib.request.Request(base + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as r:
            return r.status, r.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(2000).decode(errors="replace")
