"""``models:/`` URIs of MLflow's Model Registry for model.predict: the version's artifact URI, resolved in the registry
of the given tracking URI, and the order of the fold models a version holds.

Why not ``mlflow.artifacts.download_artifacts(models:/…, tracking_uri=…)`` alone: MLflow 3.17 looks the version up in
the process-wide registry URI (``mlflow.get_registry_uri()``), ignoring its ``tracking_uri`` and ``registry_uri``
arguments; with an explicit ``--tracking-uri`` it asked the wrong store (even creating ``./mlflow.db``).
"""

from __future__ import annotations

import re
import typing as tp
from pathlib import Path

_FOLD_RE = re.compile(r"fold[_-]?(\d+)", re.IGNORECASE)


def is_registry_uri(spec: str) -> bool:
    return str(spec).startswith("models:/")


def resolve_model_uri(spec: str, tracking_uri: tp.Optional[str]) -> str:
    """``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``models:/<name>/latest`` (each optionally followed
    by ``/<path>``) or a LoggedModel ``models:/<model id>`` → the artifact URI it stands for (e.g.
    ``runs:/<id>/model``). Raises MLflow's exception for an unknown name, version or alias."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    base, sub = ModelsArtifactRepository.split_models_uri(spec)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = get_model_name_and_version(client, base)
    if len(found) == 1:  # models:/<model id>: an MLflow 3 LoggedModel
        uri = client.get_logged_model(found[0]).artifact_location
    else:
        uri = client.get_model_version_download_uri(*found)
    return uri.rstrip("/") + (f"/{sub}" if sub else "")


def fold_order(path: Path) -> tuple[int, int, str]:
    """Sort key: ``fold0.keras`` < ``fold1.keras`` < ``fold10.keras``, then files without a fold number by name."""
    m = _FOLD_RE.search(Path(path).stem)
    return (0, int(m.group(1)), str(path)) if m else (1, 0, str(path))
