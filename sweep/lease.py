"""One process trains a (config, fold) at a time: a lease file in its checkpoint folder.

The lease names the SLURM job (or, outside SLURM, the host and process) that trains the run. A job
that finds the lease of another job that SLURM still runs or will run (pending, running, requeued)
exits before touching the checkpoint or the MLflow run. The lease of a dead job is taken over, and
a requeued job finds its own job id in the lease, so it resumes its own run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import typing as tp
from pathlib import Path

from sweep import locks

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
LOCK_FILE = ".lease.lock.held"  # a lock file (sweep.locks); the old flock file .lease.lock is not read
LOCK_TIMEOUT_S = 120.0  # the lease's lock is held for a read and a write: a live holder for minutes is a fault


class LeaseHeld(RuntimeError):
    """Another live job trains this (config, fold); the message names it."""


def my_lease() -> dict[str, tp.Any]:
    env = os.environ
    lease: dict[str, tp.Any] = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    if env.get("SLURM_JOB_ID"):
        lease["slurm_job_id"] = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID"):
            lease["slurm_task"] = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return lease


def describe(lease: tp.Mapping[str, tp.Any]) -> str:
    if lease.get("slurm_job_id"):
        task = lease.get("slurm_task")
        return f"SLURM job {lease['slurm_job_id']}" + (f" (array task {task})" if task else "")
    return f"process {lease.get('pid')} on {lease.get('host')}"


def read_lease(ckpt_dir: Path) -> tp.Optional[dict[str, tp.Any]]:
    try:
        lease = json.loads((Path(ckpt_dir) / LEASE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return lease if isinstance(lease, dict) else None


def holder_alive(lease: tp.Mapping[str, tp.Any]) -> tuple[bool, str]:
    """(alive, why) for the holder of a lease; a holder we cannot check counts as alive (no duplicate run)."""
    if lease.get("slurm_job_id"):
        from sweep.slurm_state import SlurmQueryError, is_alive

        try:
            alive, state = is_alive(str(lease["slurm_job_id"]))
        except SlurmQueryError as exc:
            return True, f"SLURM could not be asked ({exc})"
        return alive, state
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease.get("pid", -1)), 0)
        except ProcessLookupError:
            return False, "process gone"
        except (PermissionError, ValueError, TypeError):
            return True, "process exists"
        try:  # a killed child its parent has not reaped yet still answers kill(pid, 0)
            if Path(f"/proc/{int(lease['pid'])}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False, "process gone (zombie)"
        except (OSError, IndexError, KeyError, ValueError):
            pass
        return True, "process running"
    return True, "on another host, not a SLURM job: cannot be checked"


def _same_holder(a: tp.Mapping[str, tp.Any], b: tp.Mapping[str, tp.Any]) -> bool:
    if a.get("slurm_job_id") or b.get("slurm_job_id"):
        return a.get("slurm_job_id") == b.get("slurm_job_id")  # a requeued job keeps its id, not its pid
    return a.get("host") == b.get("host") and a.get("pid") == b.get("pid")


def _write(path: Path, lease: tp.Mapping[str, tp.Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(lease), sort_keys=True))
    os.replace(tmp, path)


def acquire(ckpt_dir: Path, run_name: str) -> dict[str, tp.Any]:
    """Take the lease of this run's checkpoint folder for this process, or raise LeaseHeld."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    mine = my_lease()
    # Two jobs starting together, on any nodes: one decides after the other (a lock file, not flock: sweep.locks).
    with locks.locked(ckpt_dir / LOCK_FILE, timeout_s=LOCK_TIMEOUT_S):
        held = read_lease(ckpt_dir)
        if held and not _same_holder(held, mine):
            alive, why = holder_alive(held)
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
