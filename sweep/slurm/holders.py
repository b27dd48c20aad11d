"""Who holds a lease or a lock (a SLURM job, or a process on a host) and whether it is alive."""

from __future__ import annotations

import os
import socket
import typing as tp
from pathlib import Path

from sweep.slurm import queue


def describe(lease: tp.Mapping[str, tp.Any]) -> str:
    if lease.get("slurm_job_id"):
        task = lease.get("slurm_task")
        return f"SLURM job {lease['slurm_job_id']}" + (f" (array task {task})" if task else "")
    return f"process {lease.get('pid')} on {lease.get('host')}"


def holder_alive(lease: tp.Mapping[str, tp.Any]) -> tuple[bool, str]:
    """(alive, why) for the holder of a lease; a holder we cannot check counts as alive (no duplicate run)."""
    if lease.get("slurm_job_id"):
        try:
            alive, state = queue.is_alive(str(lease["slurm_job_id"]))  # looked up per call: tests fake SLURM
        except queue.SlurmQueryError as exc:
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
