"""One process trains a (config, fold) at a time: a lease file in its checkpoint folder.

The lease names the SLURM job (or, outside SLURM, the host and process) that trains the run. A job
that finds the lease of another job that SLURM still runs or will run (pending, running, requeued)
exits before touching the checkpoint or the MLflow run. The lease of a dead job is taken over, and
a requeued job finds its own job id in the lease, so it resumes its own run.
"""

from __future__ import annotations

import json
import logging
import typing as tp
from pathlib import Path

from data.atomic import atomic_write_json
from sweep.slurm import locks
from sweep.slurm.holders import _same_holder, describe, holder_alive, process_record

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
LOCK_FILE = ".lease.lock.held"  # a lock file (sweep.slurm.locks); the old flock file .lease.lock is not read
LOCK_TIMEOUT_S = 120.0  # the lease's lock is held for a read and a write: a live holder for minutes is a fault


class LeaseHeld(RuntimeError):
    """Another live job trains this (config, fold); the message names it."""


def my_lease() -> dict[str, tp.Any]:
    """This process as a lease's holder (sweep.slurm.holders.process_record)."""
    return process_record()


def read_lease(ckpt_dir: Path) -> tp.Optional[dict[str, tp.Any]]:
    try:
        lease = json.loads((Path(ckpt_dir) / LEASE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return lease if isinstance(lease, dict) else None


def _write(path: Path, lease: tp.Mapping[str, tp.Any]) -> None:
    atomic_write_json(path, dict(lease), sort_keys=True)


def acquire(ckpt_dir: Path, run_name: str) -> dict[str, tp.Any]:
    """Take the lease of this run's checkpoint folder for this process, or raise LeaseHeld."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    mine = my_lease()
    # Two jobs starting together, on any nodes: one decides after the other (a lock file, not flock: sweep.slurm.locks).
    with locks.locked(ckpt_dir / LOCK_FILE, timeout_s=LOCK_TIMEOUT_S):
        held = read_lease(ckpt_dir)
        if held and not _same_holder(held, mine):
            alive, why = holder_alive(held, mine)
            if alive:
                raise LeaseHeld(f"{run_name}: already trained by {describe(held)}, {why} (lease "
                                f"{ckpt_dir.name}/{LEASE_FILE}); this job exits without training")
            log.warning("%s: taking over the lease of %s (%s)", run_name, describe(held), why)
        _write(ckpt_dir / LEASE_FILE, mine)
    return mine


def release(ckpt_dir: Path, mine: tp.Mapping[str, tp.Any]) -> None:
    """Remove the lease if it is still ours (a run that ended; a requeued job keeps it by not calling this)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        with locks.locked(ckpt_dir / LOCK_FILE, timeout_s=LOCK_TIMEOUT_S):
            held = read_lease(ckpt_dir)
            if held and _same_holder(held, mine):
                (ckpt_dir / LEASE_FILE).unlink()
    except (OSError, locks.LockTimeout) as exc:  # a leftover lease of a finished job is harmless: it is taken over
        log.warning("could not remove the lease in %s: %s", ckpt_dir, exc)


def live_holders(ckpt_dirs: tp.Mapping[tp.Any, Path]) -> dict[tp.Any, str]:
    """The keys of ``ckpt_dirs`` whose lease a live holder has (what the run would refuse with LeaseHeld), and who:
    a sweep leaves those pairs alone before queueing them."""
    live: dict[tp.Any, str] = {}
    mine = my_lease()
    for key, ckpt in ckpt_dirs.items():
        held = read_lease(ckpt)
        if held and not _same_holder(held, mine):
            alive, why = holder_alive(held)
            if alive:
                live[key] = f"{describe(held)} {why}"
    return live
