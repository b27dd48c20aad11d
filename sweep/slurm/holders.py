"""Who holds a lease or a lock (a SLURM job, or a process on a host) and whether it is alive."""

from __future__ import annotations

import os
import socket
import time
import typing as tp
from pathlib import Path

from sweep.slurm import queue


def describe(lease: tp.Mapping[str, tp.Any]) -> str:
    if lease.get("slurm_job_id"):
        task = lease.get("slurm_task")
        return f"SLURM job {lease['slurm_job_id']}" + (f" (array task {task})" if task else "")
    return f"process {lease.get('pid')} on {lease.get('host')}"


def process_record() -> dict[str, tp.Any]:
    """Who this process is, as leases, locks and Optuna trials record it: host, pid, since and, in a SLURM job, its
    job id, array task and attempt (``SLURM_RESTART_COUNT``: unset on the first run, 1 after the first requeue)."""
    env = os.environ
    record: dict[str, tp.Any] = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    if env.get("SLURM_JOB_ID"):
        record["slurm_job_id"] = env["SLURM_JOB_ID"]
        record["slurm_restart"] = int(env.get("SLURM_RESTART_COUNT") or 0)
        if env.get("SLURM_ARRAY_JOB_ID"):
            record["slurm_task"] = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return record


def relation(held: tp.Mapping[str, tp.Any], mine: tp.Mapping[str, tp.Any]) -> str:
    """How the holder ``held`` relates to this process ``mine``: ``self``; ``earlier_attempt`` (this SLURM job
    before a requeue: a lower restart count); ``sibling`` (another process of the same attempt of this job, e.g.
    a pool worker of one allocation: a rival, not us); ``other``."""
    same_process = (held.get("host"), held.get("pid")) == (mine.get("host"), mine.get("pid"))
    job = held.get("slurm_job_id")
    if job and job == mine.get("slurm_job_id"):
        if int(held.get("slurm_restart") or 0) < int(mine.get("slurm_restart") or 0):
            return "earlier_attempt"
        return "self" if same_process else "sibling"
    if not job and not mine.get("slurm_job_id") and same_process:
        return "self"
    return "other"


def holder_alive(lease: tp.Mapping[str, tp.Any], mine: tp.Optional[tp.Mapping[str, tp.Any]] = None
                 ) -> tuple[bool, str]:
    """(alive, why) for the holder of a lease; a holder we cannot check counts as alive (no duplicate run).

    Given ``mine``: an earlier attempt of this job is gone (SLURM would call it alive: it is us, requeued); a
    sibling of this attempt is alive as long as its process is (SLURM says the job runs: it is ours)."""
    rel = relation(lease, mine) if mine is not None else "other"
    if rel == "earlier_attempt":
        return False, "an earlier attempt of this SLURM job (requeued)"
    if rel == "sibling":
        if lease.get("host") != socket.gethostname():
            return True, "another process of this SLURM job on another node: cannot be checked"
        return _process_alive(lease)
    if lease.get("slurm_job_id"):
        try:
            alive, state = queue.is_alive(str(lease["slurm_job_id"]))  # looked up per call: tests fake SLURM
        except queue.SlurmQueryError as exc:
            return True, f"SLURM could not be asked ({exc})"
        return alive, state
    if lease.get("host") == socket.gethostname():
        return _process_alive(lease)
    return True, "on another host, not a SLURM job: cannot be checked"


def _process_alive(lease: tp.Mapping[str, tp.Any]) -> tuple[bool, str]:
    """Whether the process a record names runs on this host (a zombie counts as gone)."""
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


def _same_holder(held: tp.Mapping[str, tp.Any], mine: tp.Mapping[str, tp.Any]) -> bool:
    """``held`` is this process or an earlier attempt of its SLURM job (whose work it takes back), not a sibling
    worker of the same allocation (before 2026-12-06 the job id alone decided: pool workers took each other's)."""
    return relation(held, mine) in ("self", "earlier_attempt")
