"""Config values as MLflow sees them: the config key of a (config, fold) pair, flattened params, and values
sanitised (no absolute home or working-directory paths) and truncated to MLflow's limits."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import typing as tp
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

log = logging.getLogger("sweep.tracking")

DEFAULT_CONFIG_KEY_EXCLUDE = ("fold", "mlflow", "hydra", "paths")
TRUNCATED_SUFFIX = "...[truncated]"



def _plain(obj: tp.Any) -> tp.Any:
    """Mappings/sequences (OmegaConf containers included) as dicts/lists, for canonical JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _drop(tree: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return
    if not rest:
        del tree[head]
    elif isinstance(tree[head], dict):
        _drop(tree[head], rest)


def config_key(cfg: Mapping, exclude: tp.Iterable[str] = DEFAULT_CONFIG_KEY_EXCLUDE) -> str:
    """12-hex sha256 of the canonical JSON of ``cfg`` without ``fold`` and the (dotted) keys in ``exclude``.

    The folds of one configuration share the key; bookkeeping sections (mlflow, hydra, paths) do not change it.
    """
    tree = _plain(cfg)
    if not isinstance(tree, dict):
        raise TypeError(f"config_key needs a mapping, got {type(cfg).__name__}")
    for key in ("fold", *exclude):
        _drop(tree, key)
    text = json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _flat_items(d: Mapping, sep: str, prefix: str = "") -> tp.Iterator[tuple[str, tp.Any]]:
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            yield from _flat_items(v, sep, key)
        else:
            yield key, v


def flatten(d: Mapping, sep: str = ".") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}``, values as strings (a list stays one JSON value)."""
    out = {}
    for key, v in _flat_items(d, sep):
        plain = _plain(v)
        out[key] = json.dumps(plain, default=str) if isinstance(plain, list) else str(plain)
    return out


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    log.warning("MLflow value truncated from %d to %d characters", len(text), limit)
    return text[: limit - len(TRUNCATED_SUFFIX)] + TRUNCATED_SUFFIX


_PATH_START = r"(?<![\w.~/-])"  # the root must start a path, not sit inside a longer one
_PATH_END = r"(?=$|[\s,;:'\"\]\)}=])"


def _replace_root(text: str, root: str, as_prefix: str, as_whole: str) -> str:
    root = root.rstrip("/")
    if not root:
        return text  # "/" as home or cwd would rewrite every path
    text = re.sub(_PATH_START + re.escape(root) + "/", lambda _: as_prefix, text)
    return re.sub(_PATH_START + re.escape(root) + _PATH_END, lambda _: as_whole, text)


def sanitize(value: tp.Any, limit: int | None = MAX_PARAM_VAL_LENGTH) -> str:
    """``str(value)`` with cwd-absolute paths made relative and the home prefix as ``~``, truncated to ``limit``.

    ``limit=None`` keeps the whole text (for artifacts such as a config YAML, which have no length limit).
    """
    text = value if isinstance(value, str) else str(value)
    home = os.path.expanduser("~")
    homes = {home, os.path.realpath(home)} if home not in ("", "/", "~") else set()
    cwd = os.getcwd()
    # cwd first: it usually lies under home, and the relative form is the shorter one (cwd == home stays "~").
    for root in sorted({cwd, os.path.realpath(cwd)} - homes, key=len, reverse=True):
        text = _replace_root(text, root, "", ".")
    for root in sorted(homes, key=len, reverse=True):
        text = _replace_root(text, root, "~/", "~")
    return text if limit is None else _truncate(text, limit)
