"""A sweep's identity, kept where later commands find it without the process that submitted it.

The sweep id is a hash of the MLflow experiment and the (config_key, fold) pairs of the sweep, so
the same command (same overrides) always names the same sweep. Its record, one JSON file
``<paths.work>/sweeps/<id>/sweep.json``, lists every pair (run name, predicted cost) and every
submitted array with the pair of each task index; the hydra sweep folder gets a ``sweep.json``
pointer to it, and the experiment gets one MLflow run per sweep (tag ``is_sweep``) tagged with
the sweep id and the array ids, with the record as its artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import typing as tp
from pathlib import Path

from data.atomic import atomic_write_text
from sweep.slurm import lease, locks
from sweep.slurm import queue as slurm_state
from sweep.tracking import client as tracking

log = logging.getLogger(__name__)

RECORD = "sweep.json"
TAG_IS_SWEEP = "is_sweep"
TAG_SWEEP_ID = "sweep_id"
TAG_ARRAYS = "slurm_array_ids"
Pair = tp.Tuple[str, int]


def pair_name(pair: Pair) -> str:
    return f"{pair[0]}/{pair[1]}"


def parse_pair(name: str) -> Pair:
    key, _, fold = name.rpartition("/")
    return key, int(fold)


def sweep_id(experiment: str, pairs: tp.Iterable[Pair]) -> str:
    text = json.dumps([experiment, sorted(pair_name(p) for p in set(pairs))])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def sweeps_dir(work: tp.Union[str, Path]) -> Path:
    return Path(work) / "sweeps"


@dataclasses.dataclass
class Submission:
    array_id: str
    tasks: list[str]  # pair name of each array task index
    time_min: int
    submitit_folder: str  # with %j, as submitit names each task's folder
    submitted_at: float
    group: str = ""


@dataclasses.dataclass
class SweepRecord:
    sweep_id: str
    experiment: str
    experiment_id: str
    tracking_uri: str  # redacted
    num_folds: int
    pairs: dict[str, dict[str, tp.Any]]  # pair name -> run_name, cost, config_key, fold
    submissions: list[Submission] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # pair name -> why not queued
    halved: dict[str, str] = dataclasses.field(default_factory=dict)  # pair name -> why its batch was halved
    parallelism: tp.Optional[int] = None
    mlflow_run_id: tp.Optional[str] = None
    max_num_timeout: tp.Optional[int] = None  # submitit's requeue limit of the arrays (sweep.status names it)
    created_at: float = dataclasses.field(default_factory=time.time)

    @property
    def array_ids(self) -> list[str]:
        return [s.array_id for s in self.submissions]

    def task_pairs(self) -> dict[tuple[str, int], Pair]:
        """(array id, task index) -> (config_key, fold) over every submission."""
        return {(s.array_id, i): parse_pair(name) for s in self.submissions for i, name in enumerate(s.tasks)}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SweepRecord:
        data = json.loads(text)
        data["submissions"] = [Submission(**s) for s in data.get("submissions", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def record_path(work: tp.Union[str, Path], sid: str) -> Path:
    return sweeps_dir(work) / sid / RECORD


def load(work: tp.Union[str, Path], sid: str) -> tp.Optional[SweepRecord]:
    path = record_path(work, sid)
    if not path.is_file():
        return None
    return SweepRecord.from_json(path.read_text())


def all_records(work: tp.Union[str, Path], experiment: tp.Optional[str] = None) -> list[SweepRecord]:
    """Every sweep recorded under this work folder (of one experiment); unreadable records are skipped loudly."""
    out = []
    for path in sorted(sweeps_dir(work).glob(f"*/{RECORD}")):
        try:
            rec = SweepRecord.from_json(path.read_text())
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable sweep record %s: %s", path, exc)
            continue
        if experiment is None or rec.experiment == experiment:
            out.append(rec)
    return out


def update(work: tp.Union[str, Path], fresh: SweepRecord,
           change: tp.Callable[[SweepRecord], None] = lambda r: None) -> SweepRecord:
    """Merge ``fresh`` (pairs, skipped) into the stored record of its id, apply ``change``, write atomically."""
    path = record_path(work, fresh.sweep_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two commands on one sweep (any nodes) must not drop each other's arrays: a lock file (sweep.slurm.locks), not flock.
    with locks.locked(path.parent / ".lock.held", timeout_s=300.0):
        rec = load(work, fresh.sweep_id) or fresh
        if rec is not fresh:
            rec.pairs.update(fresh.pairs)
            rec.skipped.update(fresh.skipped)
            rec.halved.update(fresh.halved)
            rec.parallelism = fresh.parallelism or rec.parallelism
            rec.max_num_timeout = fresh.max_num_timeout if fresh.max_num_timeout is not None else rec.max_num_timeout
        change(rec)
        atomic_write_text(path, rec.to_json())
    return rec


def write_pointer(sweep_dir: Path, rec: SweepRecord, record_file: Path) -> None:
    """``sweep.json`` in the hydra sweep folder: which sweep its arrays belong to."""
    atomic_write_text(Path(sweep_dir) / RECORD, json.dumps({"sweep_id": rec.sweep_id, "record": str(record_file),
                                                        "arrays": rec.array_ids}, indent=1))


def sync_mlflow(uri: str, rec: SweepRecord, *, status: tp.Optional[str] = None) -> str:
    """Create or update the sweep's MLflow run (tags: sweep id, array ids; artifact: the record)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = rec.mlflow_run_id
    if run_id is None:
        found = tracking._retry(lambda: client.search_runs(
            [rec.experiment_id], filter_string=f"tags.{TAG_SWEEP_ID} = '{rec.sweep_id}'", max_results=5),
            f"find sweep run {rec.sweep_id}", uri, 3, 0.5)
        run_id = found[0].info.run_id if found else None
    tags = {TAG_IS_SWEEP: "true", TAG_SWEEP_ID: rec.sweep_id, TAG_ARRAYS: ",".join(rec.array_ids),
            "n_pairs": str(len(rec.pairs)), "experiment": "sweep"}
    recorder = tracking.RunRecorder(uri, rec.experiment_id, run_id=run_id, run_name=f"sweep-{rec.sweep_id}", tags=tags)
    run_id = recorder.start()
    recorder.set_tags(tags)
    recorder.log_text(rec.to_json(), RECORD)
    if status is not None:
        recorder.finish(status)
    return run_id


def close_mlflow(uri: str, rec: SweepRecord, status: str) -> None:
    """End the sweep's MLflow run with ``status`` once nothing of it is alive (a no-op when it already has it)."""
    from mlflow.tracking import MlflowClient

    if rec.mlflow_run_id and MlflowClient(uri).get_run(rec.mlflow_run_id).info.status != status:
        tracking.end_run(uri, rec.mlflow_run_id, status)


def live_pairs(work: tp.Union[str, Path], experiment: str, ckpt_dirs: tp.Mapping[Pair, Path], *,
               leases: bool = True) -> dict[Pair, str]:
    """Pairs among ``ckpt_dirs`` that a live SLURM job holds: a pending/running/requeued task of any array
    recorded for this experiment (this sweep or an earlier one), or the live holder of the run's lease.

    Raises slurm_state.SlurmQueryError when SLURM cannot say (then nothing may be queued).
    """

    task_map: dict[tuple[str, int], Pair] = {}
    for rec in all_records(work, experiment):
        task_map.update(rec.task_pairs())
    live: dict[Pair, str] = {}
    if task_map:
        for tid, task in slurm_state.live_tasks({a for a, _ in task_map}).items():
            pair = task_map.get(tid)
            if pair in ckpt_dirs and pair not in live:
                live[pair] = f"array task {task.name} {task.state}"
    if leases:  # a job started some other way (single run, another work folder's record)
        others = lease.live_holders({p: c for p, c in ckpt_dirs.items() if p not in live})
        live.update(others)
    return live
