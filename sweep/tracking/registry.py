"""MLflow's Model Registry: a folder of model files as ONE version of a registered model, found again by a tag (a
registration is idempotent), and an alias moved to it.

What MLflow 3 (checked on 3.17) needs for plain artifact folders: no LoggedModel. The files go into a run of their own
(``log_artifacts``) and the version's source is that run's ``runs:/<run id>/<path>`` with the same ``run_id``: the
server refuses a source outside the given run's artifacts. ``models:/<name>/<version>`` and ``models:/<name>@<alias>``
then resolve to that source; note that ``mlflow.artifacts.download_artifacts`` looks a ``models:/`` URI up in the
process-wide registry URI, not in its ``tracking_uri`` argument (model.predict resolves the version itself).
"""

from __future__ import annotations

import dataclasses
import re
import typing as tp
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from sweep.tracking.client import RunRecorder, _client, _quote, _retry, ensure_experiment, sanitize
from sweep.tracking.store import TrackingError, redact_uri

MAX_TAG_CHARS = 5000  # MLflow accepts far more; a registry tag is read by people
_ALIAS_RE = re.compile(r"^[\w\-]+$")
_RESERVED_ALIAS_RE = re.compile(r"^(latest|[vV]\d+)$", re.IGNORECASE)


def check_model_name(name: str, field: str) -> str:
    """A registered-model name that a ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` URI can carry."""
    if not name or not name.strip():
        raise ValueError(f"{field}: give a registered model name")
    if any(c in name for c in "/:@") or name != name.strip():
        raise ValueError(f"{field}: {name!r} cannot name a registered model (no '/', ':', '@', leading or trailing "
                         "blanks: models:/<name>/<version> must parse)")
    return name


def check_alias(alias: str, field: str) -> str:
    """MLflow's alias rule (letters, digits, ``_``, ``-``; not ``latest`` or ``v<digits>``, which name versions)."""
    if not _ALIAS_RE.match(alias or "") or len(alias) > 255:
        raise ValueError(f"{field}: {alias!r} is not an alias (letters, digits, '_' and '-', at most 255)")
    if _RESERVED_ALIAS_RE.match(alias):
        raise ValueError(f"{field}: {alias!r} is reserved by MLflow (it names a version)")
    return alias


def _tags(tags: Mapping[str, tp.Any]) -> dict[str, str]:
    return {str(k): sanitize(v, MAX_TAG_CHARS) for k, v in tags.items() if v is not None}


def find_version(uri: str, name: str, tag: str, value: str, *, retries: int = 3,
                 backoff_s: float = 0.5) -> tp.Optional[ModelVersion]:
    """The newest version of ``name`` tagged ``tag=value``; None when there is none (or no such registered model)."""
    client = _client(uri)
    flt = f"name = {_quote(name)} AND tags.{tag} = {_quote(value)}"
    found = _retry(lambda: client.search_model_versions(flt, max_results=200), f"search model versions ({flt})",
                   uri, retries, backoff_s)
    return max(found, key=lambda v: int(v.version)) if found else None


def version_aliases(uri: str, name: str, version: str, *, retries: int = 3, backoff_s: float = 0.5) -> list[str]:
    """The aliases on one version (``search_model_versions`` leaves them out; ``get_model_version`` has them)."""
    client = _client(uri)
    mv = _retry(lambda: client.get_model_version(name, str(version)), f"get model version {name}/{version}", uri,
                retries, backoff_s)
    return list(mv.aliases or [])


def move_alias(uri: str, name: str, alias: str, version: str, *, retries: int = 3, backoff_s: float = 0.5) -> None:
    """Point ``models:/<name>@<alias>`` at ``version`` (MLflow moves an alias that points elsewhere)."""
    client = _client(uri)
    _retry(lambda: client.set_registered_model_alias(name, alias, str(version)),
           f"set alias {alias} of {name} to version {version}", uri, retries, backoff_s)


def ensure_registered_model(uri: str, name: str, tags: Mapping[str, tp.Any], description: str, *,
                            retries: int = 3, backoff_s: float = 0.5) -> None:
    """Create registered model ``name`` if it is missing; set its tags and description either way."""
    client = _client(uri)

    def get_or_create() -> None:
        try:
            client.create_registered_model(name, tags=_tags(tags), description=description)
        except MlflowException as e:
            if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            # It exists (an earlier registration, or a lost creation race): keep it, refresh what it says.
            for k, v in _tags(tags).items():
                client.set_registered_model_tag(name, k, v)
            client.update_registered_model(name, description=description)

    _retry(get_or_create, f"create registered model {name!r}", uri, retries, backoff_s)


@dataclasses.dataclass(frozen=True)
class Registration:
    """What :func:`register_folder` made: the version, the run that holds its files, their artifact folder."""

    name: str
    version: str
    run_id: str
    artifact_path: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_folder(uri: str, *, experiment: str, name: str, folder: Path, artifact_path: str,
                    version_tags: Mapping[str, tp.Any], model_tags: Mapping[str, tp.Any],
                    run_tags: Mapping[str, tp.Any], description: str, run_name: str) -> Registration:
    """The files of ``folder`` as one new version of registered model ``name``.

    They are copied into a new run of ``experiment`` (under ``artifact_path``), which ends FINISHED only once the
    version exists (FAILED otherwise: a rerun makes a fresh one); the version's source is that run's
    ``runs:/<run id>/<artifact_path>``, its tags ``version_tags``; the registered model is created if missing and
    tagged with ``model_tags``.
    """
    if not any(Path(folder).iterdir()):
        raise TrackingError(f"MLflow at {redact_uri(uri)}: nothing to register in {sanitize(folder)}")
    experiment_id = ensure_experiment(uri, experiment)
    client = _client(uri)
    with RunRecorder(uri, experiment_id, run_name=run_name, tags=run_tags) as run:
        run.log_artifact(folder, artifact_path)
        ensure_registered_model(uri, name, model_tags, description)
        source = f"runs:/{run.run_id}/{artifact_path}"
        tags = _tags(version_tags)
        mv = _retry(lambda: client.create_model_version(name, source, run_id=run.run_id, tags=tags,
                                                        description=description),
                    f"create a version of {name!r} from {source}", uri, 1, 0.0)  # a retry could add a 2nd version
        run.set_tags({"registered_model": name, "registered_version": mv.version})
        run.finish()
    return Registration(name, str(mv.version), tp.cast(str, run.run_id), artifact_path)
