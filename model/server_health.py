"""HTTP probes of an MLflow tracking server (``/health``, an API path), for every command that checks a server before it
works (sweep.tracking.store before a sweep, model.predict before loading ``runs:/`` models, analysis.store before
reading runs), and the one redaction of credentials in URIs. In model/ because model/ may not import sweep/ or
analysis/, while both may import model/."""

from __future__ import annotations

import base64
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request

UNREACHABLE = (urllib.error.URLError, OSError, ValueError)  # what server_get() raises for a server it cannot reach
API_PROBE = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"

_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]*@")


class ServerUnreachable(RuntimeError):
    """The tracking server cannot be used; the message names the redacted URI and why."""


def redact_uri(uri: str) -> str:
    """``uri`` without ``user:pass@`` (also inside longer text such as exception messages)."""
    return _USERINFO_RE.sub(r"\g<scheme>", str(uri))


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`ServerUnreachable` unless the http(s) server at ``uri`` answers ``/health`` with 200 and does
    not refuse API requests (401/403); other schemes (sqlite, file, databases) are not servers: nothing to check."""
    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return
    red = redact_uri(uri)
    try:
        status, body = health(uri, timeout_s)
    except UNREACHABLE as e:
        raise ServerUnreachable(f"MLflow tracking server at {red} is unreachable: {redact_uri(str(e))}") from e
    if status != 200:
        raise ServerUnreachable(f"MLflow tracking server at {red} is unreachable: /health answered {status}: "
                                f"{redact_uri(body[:200])}")
    # /health answers 200 even when the API refuses this Host header (platform-facts), so probe the API too.
    try:
        status, body = server_get(uri, API_PROBE, timeout_s)
    except UNREACHABLE as e:
        raise ServerUnreachable(f"MLflow tracking server at {red} is unreachable: {redact_uri(str(e))}") from e
    if status in (401, 403):
        hint = " (start the server with --allowed-hosts naming this host)" if "Host header" in body else ""
        raise ServerUnreachable(f"MLflow tracking server at {red} refuses API requests: {status} "
                                f"{redact_uri(body[:200])}{hint}")


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
