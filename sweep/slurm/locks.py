"""Locks that hold across nodes: a lock file created atomically (``os.link``), naming its holder.

``fcntl.flock`` excludes processes on one node only where a shared file system is mounted with Lustre's
``localflock`` or on some NFS set-ups: two nodes could both hold a lease. A hard link to a fully written
temporary file is atomic on local file systems, NFS and Lustre alike: exactly one creator succeeds, and the
file it made already names its holder (SLURM job and array task, host, pid, since).

A lock whose holder is gone is taken over: the holder is asked about through SLURM (a SLURM job that is no longer
pending, running or requeued) or, on this host, through its pid (:func:`sweep.slurm.lease.holder_alive`), never by age.
A holder that cannot be checked (another host, outside SLURM) counts as alive. Taking over is race-free: the stale
file is renamed to a unique name first (one rename wins) and put back if it turns out not to be the stale one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import typing as tp
import uuid
from pathlib import Path

from sweep.slurm.holders import describe, holder_alive

log = logging.getLogger(__name__)

UNREADABLE_S = 10.0  # a lock file that stays unreadable this long (corrupt) is taken over


class LockTimeout(RuntimeError):
    """A lock stayed held by a live holder longer than the caller would wait; the message names file and holder."""


def holder() -> dict[str, tp.Any]:
    """Who this process is: SLURM job id and array task when present, host, pid, since, and a unique token."""
    env = os.environ
    me: dict[str, tp.Any] = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                             "token": uuid.uuid4().hex}
    if env.get("SLURM_JOB_ID"):
        me["slurm_job_id"] = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID"):
            me["slurm_task"] = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return me


def read_holder(path: Path) -> tp.Optional[dict[str, tp.Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(lock: tp.Mapping[str, tp.Any]) -> tuple[bool, str]:

    return holder_alive(lock)


def _describe(lock: tp.Optional[tp.Mapping[str, tp.Any]]) -> str:
    if not lock:
        return "an unreadable holder"

    return describe(lock)


def try_acquire(path: Path, me: tp.Mapping[str, tp.Any]) -> bool:
    """Create the lock file naming ``me`` if nobody holds it; False when it exists."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{me['token']}.tmp")
    tmp.write_text(json.dumps(dict(me), sort_keys=True))
    try:
        os.link(tmp, path)  # atomic, and the lock is complete the moment it exists
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _take_over_if_stale(path: Path, seen: tp.Mapping[str, tp.Any], why: str) -> None:
    """Remove the stale lock ``seen`` (not whatever lock replaced it meanwhile): rename, check, put back if wrong."""
    aside = path.with_name(f".{path.name}.stale.{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)  # of several waiters, one renames the file; the others find it gone
    except FileNotFoundError:
        return
    taken = read_holder(aside)
    if taken is not None and taken.get("token") != seen.get("token"):
        # A fresh lock was made between our read and our rename: give it back (nobody else can have made one,
        # since the path was free only for this instant; if one was, both stay and the later waiter retries).
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    else:
        log.warning("lock %s: taking over from %s (%s)", path.name, _describe(seen), why)
    with contextlib.suppress(OSError):
        aside.unlink()


def acquire(path: Path, *, timeout_s: float = 300.0, poll_s: float = 0.1,
            me: tp.Optional[tp.Mapping[str, tp.Any]] = None) -> dict[str, tp.Any]:
    """Hold ``path`` (created next to what it protects); returns the holder record to :func:`release` with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = dict(me or holder())
    mine.setdefault("token", uuid.uuid4().hex)
    deadline = time.monotonic() + timeout_s
    unreadable_since: tp.Optional[float] = None
    while True:
        if try_acquire(path, mine):
            return mine
        seen = read_holder(path)
        if seen is None:
            # A lock is complete when it appears (link of a written file): unreadable means just removed, or
            # corrupt (a disk fault, a hand edit); the latter is taken over after a while.
            if not path.exists():
                continue
            unreadable_since = unreadable_since or time.monotonic()
            if time.monotonic() - unreadable_since > UNREADABLE_S:
                _take_over_if_stale(path, {}, f"unreadable for {UNREADABLE_S:.0f} s")
                unreadable_since = None
                continue
            time.sleep(poll_s)
            continue
        unreadable_since = None
        alive, why = _holder_alive(seen, mine)
        if not alive:
            _take_over_if_stale(path, seen, why)
            continue
        if time.monotonic() > deadline:
            raise LockTimeout(f"lock {path} is held by {_describe(seen)} ({why}) for more than {timeout_s:.0f} s")
        time.sleep(poll_s)


def _holder_alive(seen: tp.Mapping[str, tp.Any], mine: tp.Mapping[str, tp.Any]) -> tuple[bool, str]:
    job = seen.get("slurm_job_id")
    if job and job == mine.get("slurm_job_id") and (seen.get("pid"), seen.get("host")) != (mine.get("pid"),
                                                                                           mine.get("host")):
        return False, "an earlier attempt of this SLURM job (requeued)"  # SLURM would call it alive: it is us
    return _alive(seen)


def release(path: Path, mine: tp.Mapping[str, tp.Any]) -> None:
    """Remove the lock if it is still ours (a taken-over lock belongs to its new holder)."""
    path = Path(path)
    held = read_holder(path)
    if held is not None and held.get("token") == mine.get("token"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def locked(path: Path, *, timeout_s: float = 300.0, poll_s: float = 0.1) -> tp.Iterator[dict[str, tp.Any]]:
    """``with locked(folder / ".lock.held"):`` — held across nodes for the block."""
    mine = acquire(path, timeout_s=timeout_s, poll_s=poll_s)
    try:
        yield mine
    finally:
        release(path, mine)
