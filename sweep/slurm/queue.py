"""What SLURM says about the tasks of a sweep's arrays: alive now (squeue) and their history (sacct).

An array task is named by (array job id, task index): a pending task has no job id of its own yet
(squeue shows the array's id until it starts), so that pair is the only stable name of a task.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import typing as tp

log = logging.getLogger(__name__)

# squeue lists finished jobs for MinJobAge seconds too: these states hold nothing any more.
DONE_STATES = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                         "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"})
TaskId = tp.Tuple[str, int]  # (array job id, task index)


class SlurmQueryError(RuntimeError):
    """squeue/sacct could not answer (controller or accounting down): liveness is unknown."""


@dataclasses.dataclass(frozen=True)
class LiveTask:
    array_id: str  # the job's own id for a plain (non-array) job
    task: int
    job_id: str  # its own job id once started; the array's id while pending
    state: str  # PENDING, RUNNING, REQUEUED, COMPLETING, ...
    restarts: int = 0

    @property
    def name(self) -> str:
        return f"{self.array_id}_{self.task}"


def _run(cmd: tp.Sequence[str], timeout: float = 30.0) -> str:
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmQueryError(f"{cmd[0]}: {exc}") from exc
    if p.returncode != 0:
        raise SlurmQueryError(f"{' '.join(cmd[:2])} failed ({p.returncode}): {p.stderr.strip()[-300:]}")
    return p.stdout


def live_tasks(array_ids: tp.Optional[tp.Iterable[str]] = None) -> dict[TaskId, LiveTask]:
    """Array tasks SLURM still runs or will run (any state but a finished one), by (array id, task index).

    All jobs are listed and filtered here: ``squeue -j`` fails as a whole if one id was purged already.
    """
    wanted = None if array_ids is None else {str(a) for a in array_ids}
    out = _run(["squeue", "-h", "-r", "-o", "%F|%K|%A|%T|%i"])
    live: dict[TaskId, LiveTask] = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or parts[3] in DONE_STATES:
            continue
        array_id, task, job_id, state, _ = parts
        if not task.isdigit():  # not an array: submitit submits a single run as a plain job, task 0 of "itself"
            array_id, task = job_id, "0"
        if wanted is not None and array_id not in wanted:
            continue
        live[(array_id, int(task))] = LiveTask(array_id, int(task), job_id, state)
    return live


def is_alive(job_id: str) -> tuple[bool, str]:
    """(alive, state) of one job (numeric id or ``array_task``); a job squeue no longer knows is dead ("gone")."""
    try:
        p = subprocess.run(["squeue", "-h", "-o", "%T", "-j", str(job_id)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmQueryError(f"squeue: {exc}") from exc
    if p.returncode != 0:
        if "Invalid job id" in p.stderr:  # purged after MinJobAge: long finished
            return False, "gone"
        raise SlurmQueryError(f"squeue -j {job_id} failed ({p.returncode}): {p.stderr.strip()[-300:]}")
    states = [s.strip() for s in p.stdout.splitlines() if s.strip()]
    if not states:
        return False, "gone"
    return states[0] not in DONE_STATES, states[0]


@dataclasses.dataclass
class TaskHistory:
    """sacct's records of one array task: its last state, every attempt's elapsed time, GPUs."""

    array_id: str
    task: int
    state: str = ""  # of the last record
    exit_code: str = ""
    elapsed_s: float = 0.0  # all attempts (requeues included)
    gpu_seconds: float = 0.0
    attempts: int = 0
    requeued: bool = False


_GPU_RE = re.compile(r"gres/gpu(?::[^=,]+)?=(\d+)")


def task_history(array_ids: tp.Iterable[str]) -> dict[TaskId, TaskHistory]:
    """Every record (``-D``: requeued attempts too) of the tasks of these arrays, from accounting."""
    ids = sorted({str(a) for a in array_ids})
    if not ids:
        return {}
    out = _run(["sacct", "-n", "-P", "-X", "-D", "-j", ",".join(ids),
                "--format=JobID,State,ElapsedRaw,AllocTRES,ExitCode"])
    hist: dict[TaskId, TaskHistory] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) != 5:
            continue
        array_id, _, task = parts[0].partition("_")
        task = task or "0"  # a plain job (a sweep of one run): task 0, as in the record
        if not task.isdigit():  # "12_[3-9]": tasks not started yet, no accounting of their own
            continue
        h = hist.setdefault((array_id, int(task)), TaskHistory(array_id, int(task)))
        state = parts[1].split()[0]  # "CANCELLED by 0"
        elapsed = float(parts[2] or 0)
        gpus = max((int(m) for m in _GPU_RE.findall(parts[3])), default=0)
        h.elapsed_s += elapsed
        h.gpu_seconds += elapsed * gpus
        h.attempts += 1
        h.requeued = h.requeued or state in ("REQUEUED", "PREEMPTED") or (h.attempts > 1)
        h.state, h.exit_code = state, parts[4]
    return hist
