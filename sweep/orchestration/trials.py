"""Asynchronous Optuna: N worker slots, each asking the shared study for a trial as soon as its last one ended.

hydra-optuna-sweeper asks ``n_jobs`` trials, launches them as one batch and waits for the slowest
before it asks again (hydra #2257, #2435, PR #2461): with trials of uneven length most slots idle.
Here the sweeper (hydra_plugins.scaling_unet.optuna_async) starts ``n_jobs`` long-lived workers, one
SLURM job array of that many tasks (or as many local processes). Each worker, in a loop:

1. claims a trial under a file lock beside the study, so the study never holds more than ``n_trials``:
   its own RUNNING trial first (a requeued job resumes the trial it was preempted in; the training
   resumes from its checkpoint), then a RUNNING trial whose worker is dead (adopted), then a new one;
2. runs it as a Hydra job through the same task function as every sweep (MLflow run, lease, checks);
3. tells the study the objectives (or FAIL), and claims the next trial, until none is left.

With a pruner (``hydra.sweeper.pruner``), the training reports its validation objective at every checkpoint
(:func:`trial_reporter`); when the pruner says so it stops at once, the trial is PRUNED and its MLflow run KILLED.

Every slot appends its trials' start and end to ``<study folder>/slots/<slot>.jsonl``; :func:`idle_share`
turns such intervals into the idle slot-time (``python -m sweep.trials`` reports it for a study).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import time
import typing as tp
from pathlib import Path

from data.atomic import atomic_write_json
from sweep.core import trial_report
from sweep.jobs.train import checkpoint_before_requeue
from sweep.slurm import locks
from sweep.slurm.holders import _same_holder, holder_alive
from sweep.slurm.lease import LeaseHeld, my_lease
from sweep.slurm.queue import SlurmQueryError, live_tasks

log = logging.getLogger(__name__)

TRIAL_WORKER_ATTR = "worker"  # user attr of a trial: JSON of the claiming worker (sweep.slurm.lease.my_lease)
STUDY_RECORD = "study.json"


class StudyError(ValueError):
    """A bad study setting (storage, sampler); names the field."""


def open_storage(spec: str):
    """``journal:<file>`` → Optuna's JournalStorage on that file (safe on NFS, no server); else an RDB URL.

    SQLite on a shared file system corrupts under writers on several nodes: the journal file is what
    Optuna recommends for workers that share nothing but the file system.
    """
    import optuna

    spec = check_storage(spec)
    if spec.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = Path(spec[len("journal:"):].removeprefix("//")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    return spec


def check_storage(spec: tp.Any) -> str:
    """The storage setting, checked before anything is written: ``journal:<file>`` or an RDB URL."""
    spec = str(spec)
    if spec.startswith("journal:") and spec[len("journal:"):].removeprefix("//").strip():
        path = Path(spec[len("journal:"):].removeprefix("//")).expanduser()
        if path.is_dir():
            raise StudyError(f"hydra.sweeper.storage: {path} is a folder, not a journal file")
        for parent in path.parents:  # a journal under a regular file cannot be made: say so before any check
            if parent.exists():
                if not parent.is_dir():
                    raise StudyError(f"hydra.sweeper.storage: {parent} is a file, so the journal {path} cannot be "
                                     "made under it")
                break
        return spec
    if not spec.startswith("journal:") and "://" in spec:
        return spec
    raise StudyError(f"hydra.sweeper.storage: expected journal:<file> or an RDB URL (sqlite:///…), got {spec!r}")


@dataclasses.dataclass
class StudySpec:
    """What every worker needs to ask, run and tell trials of one study."""

    study_name: str
    storage: str
    directions: list[str]
    n_trials: int
    n_slots: int
    distributions: dict[str, tp.Any]  # name → optuna distribution
    fixed_params: dict[str, tp.Any]
    sampler: tp.Any  # DictConfig of the sampler (instantiated per worker, with its own seed)
    folder: str  # lock file and slot timelines (on the file system the workers share)
    max_failure_rate: float = 0.0
    poll_interval_s: float = 10.0
    lease_wait_s: float = 600.0  # a trial whose params another slot trains: waited for this long, then given up
    pruner: tp.Any = None  # DictConfig of an Optuna pruner (instantiated per worker), or None

    @property
    def path(self) -> Path:
        return Path(self.folder)


def study_folder(work: Path, study_name: str) -> Path:
    return Path(work) / "optuna" / study_name


@contextlib.contextmanager
def claim_lock(folder: Path) -> tp.Iterator[None]:
    """One claimer at a time: counting the trials and asking for a new one must not interleave."""

    folder.mkdir(parents=True, exist_ok=True)
    with locks.locked(folder / "claim.lock.held", timeout_s=600.0, poll_s=0.05):  # slots on any nodes: not flock
        yield


@dataclasses.dataclass
class Claim:
    number: int
    params: dict[str, tp.Any]
    how: str  # new | resumed | adopted


def _worker_of(trial) -> tp.Optional[dict]:
    try:
        w = json.loads(trial.user_attrs.get(TRIAL_WORKER_ATTR, ""))
    except ValueError:
        return None
    return w if isinstance(w, dict) else None


def claim(study, spec: StudySpec, me: tp.Mapping[str, tp.Any]) -> tp.Optional[Claim]:
    """The next trial for worker ``me`` (sweep.slurm.lease.my_lease), or None when the study has ``n_trials``."""
    import optuna


    with claim_lock(spec.path):
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        for t in running:  # a requeued job (a later attempt of the same job) takes back the trial it was running
            w = _worker_of(t)
            if w is not None and _same_holder(w, me):
                return Claim(t.number, dict(t.params), "resumed")
        for t in running:
            w = _worker_of(t)
            if w is not None and not holder_alive(w, me)[0]:
                study._storage.set_trial_user_attr(t._trial_id, TRIAL_WORKER_ATTR, json.dumps(dict(me)))
                return Claim(t.number, dict(t.params), "adopted")
        if len(trials) >= spec.n_trials:
            return None
        trial = study.ask(spec.distributions)
        trial.set_user_attr(TRIAL_WORKER_ATTR, json.dumps(dict(me)))
        for k, v in spec.fixed_params.items():
            trial.set_user_attr(k, v)
        return Claim(trial.number, dict(trial.params), "new")


def trial_overrides(claim_: Claim, fixed_params: tp.Mapping[str, tp.Any]) -> list[str]:
    """Hydra overrides of a trial, as hydra-optuna-sweeper writes them (``name=value``)."""
    return [f"{k}={v}" for k, v in {**claim_.params, **dict(fixed_params)}.items()]


def objective_list(value: tp.Any, n: int) -> list[float]:
    values = [float(value)] if n == 1 and not isinstance(value, (list, tuple)) else [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"the job returned {len(values)} objective values, the study has {n} directions")
    return values


def failure_share(study) -> tuple[int, int]:
    import optuna

    ended = [t for t in study.get_trials(deepcopy=False)
             if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]
    return sum(t.state == optuna.trial.TrialState.FAIL for t in ended), len(ended)


class SlotLog:
    """Append-only timeline of one slot: claims, trial starts and ends (one JSON object per line)."""

    def __init__(self, folder: Path, slot: int):
        self.path = folder / "slots" / f"{slot}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.slot = slot

    def write(self, event: str, **fields: tp.Any) -> None:
        line = json.dumps({"t": time.time(), "slot": self.slot, "event": event, "host": socket.gethostname(),
                           "job": os.environ.get("SLURM_JOB_ID"), **fields})
        with open(self.path, "a") as fh:  # O_APPEND: lines of a requeued job follow its earlier ones
            fh.write(line + "\n")


def read_timelines(folder: Path) -> list[dict]:
    events = []
    for path in sorted((Path(folder) / "slots").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:  # a line cut by a killed job
                continue
    return events


def trial_intervals(events: tp.Sequence[tp.Mapping[str, tp.Any]]) -> list[tuple[float, float]]:
    """(start, end) of every trial run in the timelines; a start without an end (preempted) ends at the
    slot's next event, so the time a requeue costs counts as idle, not as work."""
    out: list[tuple[float, float]] = []
    by_slot: dict[int, list] = {}
    for e in sorted(events, key=lambda e: e["t"]):
        by_slot.setdefault(int(e["slot"]), []).append(e)
    for evs in by_slot.values():
        start = None
        for e in evs:
            if e["event"] == "start":
                start = e["t"]
            elif start is not None:
                if e["event"] == "end":
                    out.append((start, e["t"]))
                start = None
    return out


def idle_share(intervals: tp.Sequence[tuple[float, float]], n_slots: int) -> dict[str, float]:
    """Idle slot-time of ``n_slots`` slots that ran ``intervals`` (trial start, end), from the first start to
    the last end. ``tail`` is the part after the last trial started, when no trial was left to run
    (the least any scheduler leaves); ``idle - tail`` is what batching, job start-up and claims cost."""
    if not intervals or n_slots < 1:
        return {"trials": 0, "slots": n_slots, "window_s": 0.0, "busy_s": 0.0, "idle": 0.0, "tail": 0.0}
    t0 = min(a for a, _ in intervals)
    t1 = max(b for _, b in intervals)
    last_start = max(a for a, _ in intervals)
    window = max(t1 - t0, 1e-9)
    busy = sum(b - a for a, b in intervals)
    busy_tail = sum(max(0.0, b - max(a, last_start)) for a, b in intervals)
    tail_idle = n_slots * (t1 - last_start) - busy_tail
    return {"trials": len(intervals), "slots": n_slots, "window_s": window, "busy_s": busy,
            "idle": 1.0 - busy / (n_slots * window), "tail": max(0.0, tail_idle) / (n_slots * window)}


def format_idle(res: tp.Mapping[str, float]) -> str:
    return (f"{res['trials']} trials on {res['slots']} slots: busy {res['busy_s']:.0f} s of "
            f"{res['slots']} × {res['window_s']:.0f} s slot-time, idle {100 * res['idle']:.1f} % "
            f"({100 * res['tail']:.1f} % after the last trial started, {100 * (res['idle'] - res['tail']):.1f} % before)")


def make_pruner(cfg: tp.Any, n_objectives: int) -> tp.Any:
    """``hydra.sweeper.pruner`` (a ``_target_`` node, like the sampler) → an Optuna pruner, or None.

    Pruning compares one objective across trials, as in Optuna: a multi-objective study with a pruner is refused.
    """
    import optuna
    from hydra.utils import instantiate

    if cfg is None:
        return None
    if n_objectives > 1:
        raise StudyError(f"hydra.sweeper.pruner: pruning needs a single-objective study; this one has "
                         f"{n_objectives} directions (drop the pruner or keep one objective)")
    try:
        pruner = instantiate(cfg)
    except Exception as exc:  # noqa: BLE001 - a bad _target_ or argument: one line naming the field
        raise StudyError(f"hydra.sweeper.pruner: cannot be made: {' '.join(str(exc).split())[:300]}") from None
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise StudyError(f"hydra.sweeper.pruner: {type(pruner).__name__} is not an Optuna pruner")
    return pruner


def trial_reporter(study, number: int) -> trial_report.Reporter:
    """Report (value, iteration) to trial ``number`` and ask its pruner. A step the trial already holds (a requeued
    job re-reports its last checkpoint) is not reported twice; the trial is judged again all the same."""
    import optuna

    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    trial = optuna.trial.Trial(study, trial_id)

    def judge(value: float, iteration: int) -> bool:
        if iteration not in study._storage.get_trial(trial_id).intermediate_values:
            trial.report(value, iteration)
        return bool(trial.should_prune())

    return judge


class TrialWorker:
    """One slot: claim, run, tell, until the study is full. Picklable; submitit requeues it on USR2."""

    def __init__(self, hydra_context, config, task_function, base_overrides: tp.Sequence[str], spec: StudySpec,
                 singleton_state: tp.Any) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.task_function = task_function
        self.base_overrides = list(base_overrides)
        self.spec = spec
        self.singleton_state = singleton_state

    def _study(self, slot: int):
        import optuna
        from hydra.utils import instantiate

        storage = open_storage(self.spec.storage)
        n_before = len(optuna.load_study(study_name=self.spec.study_name, storage=storage).get_trials(deepcopy=False))
        sampler_cfg = self.spec.sampler
        seed = sampler_cfg.get("seed") if sampler_cfg is not None else None
        # Each worker its own seed (else every slot proposes the same first trials), and a new one after a requeue.
        kwargs = {"seed": int(seed) + 1000 * (slot + 1) + n_before} if seed is not None else {}
        sampler = instantiate(sampler_cfg, **kwargs) if sampler_cfg is not None else None
        if sampler is not None and not isinstance(sampler, optuna.samplers.BaseSampler):
            raise StudyError(f"hydra.sweeper.sampler: {sampler_cfg.get('_target_')} is not supported by the "
                             "asynchronous sweeper (GridSampler needs the whole grid at once)")
        pruner = make_pruner(self.spec.pruner, len(self.spec.directions))
        return optuna.load_study(study_name=self.spec.study_name, storage=storage, sampler=sampler, pruner=pruner)

    def _run_job(self, number: int, overrides: list[str]):
        from hydra.core.singleton import Singleton
        from hydra.core.utils import run_job, setup_globals
        from omegaconf import open_dict

        Singleton.set_state(self.singleton_state)
        setup_globals()
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg.hydra.job) as job:
            job.id = f"trial_{number}"
            job.num = number
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=cfg,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    def __call__(self, slot: int) -> dict[str, tp.Any]:
        import optuna


        study = self._study(slot)
        me = my_lease()
        slog = SlotLog(self.spec.path, slot)
        slog.write("worker_start")
        done = {"complete": 0, "fail": 0, "pruned": 0}
        while True:
            fails, ended = failure_share(study)
            if ended >= self.spec.n_slots and fails / ended > self.spec.max_failure_rate:
                log.error("slot %d: %d of %d trials FAILED (max_failure_rate %.2f); this worker stops", slot, fails,
                          ended, self.spec.max_failure_rate)
                break
            c = claim(study, self.spec, me)
            if c is None:
                break
            overrides = self.base_overrides + trial_overrides(c, self.spec.fixed_params) + [
                f"optuna_trial={{study:'{self.spec.study_name.replace(chr(39), '')}',number:{c.number}}}"]
            log.info("slot %d: trial %d (%s): %s", slot, c.number, c.how, " ".join(trial_overrides(c, {})))
            slog.write("start", trial=c.number, how=c.how)
            waiting_since: tp.Optional[float] = None
            while True:
                if self.spec.pruner is not None:
                    with trial_report.reporting(trial_reporter(study, c.number)):
                        ret = self._run_job(c.number, overrides)
                else:
                    ret = self._run_job(c.number, overrides)
                pruned = getattr(ret, "_return_value", None)
                if isinstance(pruned, trial_report.TrialPruned):  # not an error: read before Hydra's error line
                    study.tell(c.number, state=optuna.trial.TrialState.PRUNED)
                    slog.write("end", trial=c.number, state="PRUNED", iteration=pruned.iteration, value=pruned.value)
                    log.info("slot %d: trial %d %s", slot, c.number, pruned)
                    done["pruned"] += 1
                    break
                try:
                    values = objective_list(ret.return_value, len(self.spec.directions))
                except LeaseHeld as exc:  # the same params run in another slot: its FINISHED run is reused after
                    if waiting_since is None:
                        waiting_since = time.monotonic()
                        slog.write("lease_wait", trial=c.number, holder=str(exc)[:300])
                    if time.monotonic() - waiting_since < self.spec.lease_wait_s:
                        log.warning("slot %d: trial %d waits: %s", slot, c.number, exc)
                        time.sleep(self.spec.poll_interval_s)
                        continue
                    # Bounded: the slot gives this duplicate up and asks for another trial instead of idling. PRUNED,
                    # not FAIL: the config did not fail (its twin trains), and max_failure_rate must not stop slots.
                    why = (f"duplicate of a trial another slot trains; waited {self.spec.lease_wait_s:.0f} s "
                           f"(lease_wait_s): {exc}")[:500]
                    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, c.number)
                    study._storage.set_trial_user_attr(trial_id, "given_up", why)
                    study.tell(c.number, state=optuna.trial.TrialState.PRUNED)
                    slog.write("end", trial=c.number, state="PRUNED", error=why)
                    log.warning("slot %d: trial %d given up: %s", slot, c.number, why)
                    done["given_up"] = done.get("given_up", 0) + 1
                    break
                except Exception as exc:
                    study.tell(c.number, state=optuna.trial.TrialState.FAIL)
                    slog.write("end", trial=c.number, state="FAIL", error=f"{type(exc).__name__}: {exc}"[-500:])
                    log.error("slot %d: trial %d FAILED: %s: %s", slot, c.number, type(exc).__name__, exc)
                    done["fail"] += 1
                    break
                study.tell(c.number, values)
                slog.write("end", trial=c.number, state="COMPLETE", values=values)
                done["complete"] += 1
                break
        slog.write("worker_end")
        return {"slot": slot, **done}

    def checkpoint(self, slot: int) -> tp.Any:
        """submitit calls this on USR2 (preemption, time-out): save the running training, then requeue this
        worker; it takes its RUNNING trial back (same SLURM job id) and the training resumes."""
        import submitit


        checkpoint_before_requeue(f"slot {slot}")
        SlotLog(self.spec.path, slot).write("preempted")
        return submitit.helpers.DelayedSubmission(self, slot)


def lease_waits(events: tp.Sequence[tp.Mapping[str, tp.Any]]) -> list[str]:
    """One line per slot whose last event is a wait on another slot's lease (the same params trained there)."""
    last: dict[int, tp.Mapping[str, tp.Any]] = {}
    for e in sorted(events, key=lambda e: e["t"]):
        last[int(e["slot"])] = e
    return [f"slot {s}: trial {e.get('trial')} waits since {time.strftime('%H:%M:%S', time.localtime(e['t']))} "
            f"({time.time() - e['t']:.0f} s) on a lease: {e.get('holder', '')}"
            for s, e in sorted(last.items()) if e.get("event") == "lease_wait"]


def write_record(spec: StudySpec, **extra: tp.Any) -> Path:
    """``<study folder>/study.json``: what ``python -m sweep.trials`` needs without the sweep process."""
    path = spec.path / STUDY_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"study_name": spec.study_name, "storage": spec.storage, "n_trials": spec.n_trials,
           "n_slots": spec.n_slots, "directions": spec.directions, **extra}
    old = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(path.read_text())
    if old.get("array_ids") and extra.get("array_ids"):
        rec["array_ids"] = sorted(set(old["array_ids"]) | set(extra["array_ids"]))
    atomic_write_json(path, rec, indent=1, sort_keys=True)
    return path


def print_study(folder: Path) -> int:
    """Trials per state (pruned ones apart from given-up duplicates), worker slots alive, the idle slot-time; exit
    status 0 when the study has all its trials, 3 while some are left, 2 on a bad record or storage."""
    try:
        rec = json.loads((folder / STUDY_RECORD).read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {folder / STUDY_RECORD}: not a study record ({exc})", file=sys.stderr)
        return 2
    missing = [k for k in ("study_name", "storage", "n_trials", "n_slots") if k not in rec] if isinstance(rec, dict) \
        else ["a JSON object"]
    if missing:
        print(f"error: {folder / STUDY_RECORD}: not a study record (no {', '.join(missing)})", file=sys.stderr)
        return 2
    try:
        storage = check_storage(rec["storage"])
        if storage.startswith("journal:"):
            journal = Path(storage[len("journal:"):].removeprefix("//")).expanduser()
            if not journal.is_file():  # never made here: reading it would create an empty journal
                raise StudyError(f"the journal {journal} named by {folder / STUDY_RECORD} does not exist")
        counts = study_summary(storage, rec["study_name"])
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a corrupt journal or an unreadable database: one line
        print(f"error: study {rec.get('study_name')!r} in {rec.get('storage')}: cannot be read: "
              f"{type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        return 2
    arrays = rec.get("array_ids", [])
    workers = ""
    if arrays:

        try:
            live = live_tasks(arrays)
            states = sorted({t.state for t in live.values()})
            workers = f"; {len(live)} worker slot(s) alive in SLURM" + (f" ({', '.join(states)})" if states else "")
        except SlurmQueryError as exc:
            workers = f"; SLURM could not be asked ({exc})"
    shown = {k: v for k, v in counts.items() if k != "given_up"}
    print(f"study {rec['study_name']}: " + (", ".join(f"{v} {k}" for k, v in sorted(shown.items())) or "no trials yet")
          + f" of {rec['n_trials']} trials; arrays {','.join(arrays) or '-'}{workers}")
    events = read_timelines(folder)
    print(format_idle(idle_share(trial_intervals(events), int(rec["n_slots"]))))
    for line in lease_waits(events):
        print(line)
    if counts.get("PRUNED"):
        given_up = counts.pop("given_up", 0)
        print(f"pruned: {counts['PRUNED'] - given_up} by the pruner (stopped early at a checkpoint)"
              + (f", {given_up} given up (duplicates of a trial another slot trained)" if given_up else ""))
    left = rec["n_trials"] - counts.get("COMPLETE", 0) - counts.get("FAIL", 0) - counts.get("PRUNED", 0)
    return 0 if left <= 0 else 3


def study_summary(storage: str, study_name: str) -> dict[str, int]:
    import optuna

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
        if t.state == optuna.trial.TrialState.PRUNED and "given_up" in t.user_attrs:
            counts["given_up"] = counts.get("given_up", 0) + 1
    return counts
