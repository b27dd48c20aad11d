"""Locks that hold across nodes: a lock file created atomically (``os.link``), naming its holder.

``fcntl.flock`` excludes processes on one node only where a shared file system is mounted with Lustre's
``localflock`` or on some NFS set-ups: two nodes could both hold a lease. A hard link to a fully written
temporary file is atomic on local file systems, NFS and Lustre alike: exactly one creator succeeds, and the
file it made already names its holder (SLURM job and array task, host, pid, since).

A lock whose holder is gone is taken over: the holder is asked about through SLURM (a SLURM job that is no longer
pending, running or requeued) or, on this host, through its pid (:func:`sweep.slurm.lease.holder_alive`), never by age.
A holder that cannot be checked (another host, outside SLURM) counts as alive.

Taking over is safe under any interleaving (:func:`_take_over_if_stale`): a waiter never moves or removes the lock
path blind. It hard-links the path to a claim named after the stale holder's token (one claim per stale lock: of
several waiters, one link wins), reads the claimed file, and only if it is the stale lock it saw removes the path;
a claim of a fresh lock (made since the waiter read the stale one) is dropped and the waiter starts again. No one
but the claim's winner may remove a stale lock, and no one can create a lock while the stale one exists, so the path
it removes is the stale one. (Before 2026-12-06 the stale file was renamed aside and put back when it was not the
stale one: with three contenders the put-back could fail and a live holder's lock be deleted, two then held it.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import typing as tp
import uuid
from pathlib import Path

from sweep.slurm.holders import describe, holder_alive, process_record

log = logging.getLogger(__name__)

UNREADABLE_S = 10.0  # a lock file that stays unreadable this long (corrupt) is taken over
CLAIM_STALE_S = 30.0  # a take-over claim this old belongs to a waiter that died between its two steps


class LockTimeout(RuntimeError):
    """A lock stayed held by a live holder longer than the caller would wait; the message names file and holder."""


def holder() -> dict[str, tp.Any]:
    """Who this process is (sweep.slurm.holders.process_record: SLURM job, array task and attempt when present,
    host, pid, since) and a unique token."""
    return {**process_record(), "token": uuid.uuid4().hex}


def read_holder(path: Path) -> tp.Optional[dict[str, tp.Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(lock: tp.Optional[tp.Mapping[str, tp.Any]]) -> str:
    if not lock:
        return "an unreadable holder"

    return describe(lock)


#: Tests set this to a function called with the name of a step of a take-over ("read": a waiter has read a holder it
#: will take over from; "claimed": it holds the claim and is about to remove the stale lock), to force interleavings.
TAKEOVER_HOOK: tp.Optional[tp.Callable[[str], None]] = None


def _hook(step: str) -> None:
    if TAKEOVER_HOOK is not None:
        TAKEOVER_HOOK(step)


def _link(source: Path, target: Path, *, private: bool) -> bool:
    """``os.link``: True when ``target`` was created. NFS can answer "exists" to a retransmitted link that did succeed:
    a ``private`` source (a file only this process links) then has two links, both names of one file (issue 29).
    A shared source (a take-over's claim on the lock) cannot tell: a lost claim expires (CLAIM_STALE_S)."""
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        if not private:
            return False
        try:
            return os.stat(source).st_nlink == 2 and os.path.samefile(source, target)
        except OSError:
            return False


def try_acquire(path: Path, me: tp.Mapping[str, tp.Any]) -> bool:
    """Create the lock file naming ``me`` if nobody holds it; False when it exists."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{me['token']}.tmp")
    tmp.write_text(json.dumps(dict(me), sort_keys=True))
    try:
        # Atomic, and the lock is complete the moment it exists; read back: a holder knows its own token.
        return _link(tmp, path, private=True) and (read_holder(path) or {}).get("token") == me["token"]
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _take_over_if_stale(path: Path, seen: tp.Mapping[str, tp.Any], why: str) -> bool:
    """Remove the stale lock ``seen`` and nothing else, whatever the other waiters do (module docstring); False
    while another waiter's claim on it is in progress (the caller waits a poll)."""
    token = str(seen.get("token") or "unreadable")
    claim = path.with_name(f".{path.name}.takeover.{token}")
    _hook("read")
    try:
        if not _link(path, claim, private=False):  # another waiter claims this stale lock and removes it, within milliseconds
            with contextlib.suppress(OSError):
                if time.time() - os.stat(claim).st_ctime > CLAIM_STALE_S:  # ctime: when the claim's link was made
                    claim.unlink()  # its waiter died mid-claim: unblock (removing a claim never removes a lock)
            return False
    except FileNotFoundError:
        return True  # gone already
    try:
        claimed = read_holder(claim)
        if (claimed or {}).get("token") != seen.get("token"):
            return True  # a fresh lock came in since we read the stale one: ours is a claim on it, dropped below
        _hook("claimed")
        # The path still names the stale file: only this claim's holder may remove it, and nobody can create a lock
        # while it exists. (A holder judged dead that is alive could release it now: the inode check narrows that.)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samefile(path, claim):
                os.unlink(path)
                log.warning("lock %s: taking over from %s (%s)", path.name, _describe(seen), why)
        return True
    finally:
        with contextlib.suppress(OSError):
            claim.unlink()


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
                if _take_over_if_stale(path, {}, f"unreadable for {UNREADABLE_S:.0f} s"):
                    unreadable_since = None
                    continue
            time.sleep(poll_s)
            continue
        unreadable_since = None
        alive, why = _holder_alive(seen, mine)
        if not alive:
            if not _take_over_if_stale(path, seen, why):
                time.sleep(poll_s)  # another waiter is taking it over
            continue
        if time.monotonic() > deadline:
            raise LockTimeout(f"lock {path} is held by {_describe(seen)} ({why}) for more than {timeout_s:.0f} s")
        time.sleep(poll_s)


def _holder_alive(seen: tp.Mapping[str, tp.Any], mine: tp.Mapping[str, tp.Any]) -> tuple[bool, str]:
    """An earlier attempt of this SLURM job is gone (SLURM would call it alive: it is us, requeued); another process
    of the same attempt (a pool worker of one allocation) is a rival, alive while its process is."""
    return holder_alive(seen, mine)


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
