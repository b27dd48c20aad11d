"""Atomic writes: a temporary file or folder beside the target, renamed onto it only when complete.

The bottom layer of the package (only :mod:`data.errors` below it), so that data/, model/, analysis/ and
sweep/ all write results the same way: a reader never sees a half-written file, a failed write leaves
the old file (or nothing) and no temporary behind, an output never replaces one of its own inputs, and
a new file gets the permissions of any file the user creates (umask), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import typing as tp
from pathlib import Path

from data.errors import DataError

PathLike = tp.Union[str, Path]


def _check_inputs(final: Path, inputs: tp.Iterable[PathLike]) -> None:
    for src in inputs:
        if Path(src).resolve() == final:
            raise DataError(final, None, "output would overwrite an input file")


@contextlib.contextmanager
def atomic_path(final: PathLike, *, inputs: tp.Iterable[PathLike] = (), suffix: str = ".tmp") -> tp.Iterator[Path]:
    """Yield a temp path beside ``final``; rename it onto ``final`` only if the block succeeds.

    Refuses to write over any of ``inputs`` so an output can never replace its own source. ``suffix``
    ends the temporary name (writers such as Keras check the extension of the path they are given).
    """
    final = Path(final).resolve()
    _check_inputs(final, inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results should be as readable as any new file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final: PathLike, *, inputs: tp.Iterable[PathLike] = ()) -> tp.Iterator[Path]:
    """:func:`atomic_path` for a folder (a Zarr store): built beside ``final``, swapped in only on success."""
    final = Path(final).resolve()
    _check_inputs(final, inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a result folder should be as readable as any new folder
    try:
        yield tmp
        if final.exists():  # --overwrite: move the old store aside first, so a failed swap loses nothing
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`); returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: tp.Any, **dumps: tp.Any) -> Path:
    """Write ``json.dumps(obj, **dumps)`` to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(obj, **dumps))
