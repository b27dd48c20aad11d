"""``python -m sweep.status``: where a sweep stands, from SLURM (squeue, sacct) and MLflow together.

    python -m sweep.status +experiment=compound hydra/launcher=slurm_v100 profile=paper   # the sweep's overrides
    python -m sweep.status --sweep-id 3f2a9c0d51e7 [--watch 60]                            # or its id

Per config and in total, the (config, fold) runs FINISHED (in MLflow) / RUNNING / PENDING /
REQUEUED (waiting to run again after a preemption or time-out) / FAILED (the SLURM state, e.g.
OUT_OF_MEMORY, TIMEOUT, NODE_FAIL, CANCELLED, and the last lines of the task's stderr) / never
queued; GPU-hours spent (sacct elapsed × GPUs, every attempt); time left, estimated from the
finished runs' wall time per predicted FLOP and the plan. It builds the parent run of every config
whose folds are all FINISHED, so parents need no waiting process. ``--watch N`` refreshes every N
seconds until nothing is alive. Exit status: 0 finished, 3 running (something is alive), 1 failed
(nothing alive and some runs not FINISHED), 2 bad input.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import typing as tp
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

from sweep.core.fold_pruning import TAG_FOLD_PRUNED
from sweep.core.trial_report import TAG_PRUNED_AT
from sweep.orchestration.planning import compose_jobs, expand_sweep
from sweep.orchestration.prepare import check_jobs
from sweep.resources.memory import (
    TAG_HALVED,
    TAG_SKIPPED,
    apply_memory_policy,
    halved_reason,
)
from sweep.slurm import queue as slurm_state
from sweep.slurm import record as sweep_record
from sweep.tracking import client as tracking
from sweep.tracking.client import TAG_IS_PARENT
from sweep.tracking.parents import link_parent_runs

EXIT_FINISHED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_RUNNING = 0, 1, 2, 3
# REQUEUED: alive again after a preemption or time-out (running or waiting), with its number of requeues;
# UNKNOWN: not FINISHED in MLflow and SLURM could not be asked (never called FAILED on a guess).
# PRUNED: not trained to the end by choice: fold pruning (its config's finished folds were significantly worse than the
# best's) or an Optuna pruner (the trial stopped at a checkpoint).
STATES = ("FINISHED", "PRUNED", "RUNNING", "PENDING", "REQUEUED", "FAILED", "NEVER_QUEUED", "UNKNOWN")
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING", "SUSPENDED"}
REQUEUE_STATES = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED"}


@dataclasses.dataclass
class PairStatus:
    pair: sweep_record.Pair
    run_name: str
    state: str
    detail: str = ""  # SLURM state, task, stderr tail


@dataclasses.dataclass
class Cost:
    """What a config (or the sweep) was given and what it used: allocated GPU-hours from SLURM's accounting (elapsed ×
    GPUs, every attempt), used GPU-hours and energy from the runs' system metrics (sweep.tracking.cost), where GPUs
    reported them, and the CPU core-hours of the training processes."""

    allocated_gpu_h: float = 0.0
    used_gpu_h: tp.Optional[float] = None
    energy_kwh: tp.Optional[float] = None
    cpu_core_h: tp.Optional[float] = None

    def add(self, other: Cost) -> None:
        self.allocated_gpu_h += other.allocated_gpu_h
        for f in ("used_gpu_h", "energy_kwh", "cpu_core_h"):
            v = getattr(other, f)
            if v is not None:
                setattr(self, f, (getattr(self, f) or 0.0) + v)


RUN_COST = {"used_gpu_h": "used_gpu_hours", "energy_kwh": "gpu_energy_kwh", "cpu_core_h": "cpu_core_hours_used"}


@dataclasses.dataclass
class SweepStatus:
    rec: sweep_record.SweepRecord
    pairs: list[PairStatus]
    gpu_hours: float
    time_left_s: tp.Optional[float]
    parents_built: list[str]
    slurm_note: str = ""
    halved: dict[str, str] = dataclasses.field(default_factory=dict)  # pair name -> why its batch was halved
    cost: dict[str, Cost] = dataclasses.field(default_factory=dict)  # config key -> what its runs were given and used

    def counts(self, pairs: tp.Optional[tp.Iterable[PairStatus]] = None) -> collections.Counter:
        return collections.Counter(p.state for p in (self.pairs if pairs is None else pairs))

    @property
    def exit_code(self) -> int:
        c = self.counts()
        if c["RUNNING"] + c["PENDING"] + c["REQUEUED"] + c["UNKNOWN"]:
            return EXIT_RUNNING
        queued = [p for p in self.pairs if not (p.state == "NEVER_QUEUED" and sweep_record.pair_name(p.pair)
                                                 in self.rec.skipped)]
        return EXIT_FINISHED if all(p.state in ("FINISHED", "PRUNED") for p in queued) else EXIT_FAILED


def stderr_tail(sub: sweep_record.Submission, task: int, lines: int = 5) -> str:
    """Last lines of a task's stderr, where submitit writes it (folder with %j → <array>_<task>)."""
    files: list[Path] = []
    for name in (f"{sub.array_id}_{task}", sub.array_id):  # an array task; a plain job (a sweep of one run)
        files = files or sorted(Path(sub.submitit_folder.replace("%j", name)).glob(f"{name}_*_log.err"))
    if not files:
        return ""
    try:
        text = files[0].read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def collect(rec: sweep_record.SweepRecord, uri: str, *, build_parents: bool = True) -> SweepStatus:

    runs = tracking.find_runs(uri, rec.experiment_id)
    finished: dict[sweep_record.Pair, tp.Any] = {}
    pruned: dict[sweep_record.Pair, str] = {}
    cost: dict[str, Cost] = collections.defaultdict(Cost)
    parents_complete = set()
    halved = dict(rec.halved)
    for r in runs:
        tags = r.data.tags
        if tags.get(TAG_HALVED) and tracking.TAG_CONFIG_KEY in tags and tracking.TAG_FOLD in tags:  # the run says so
            name = sweep_record.pair_name((tags[tracking.TAG_CONFIG_KEY], int(tags[tracking.TAG_FOLD])))
            if name in rec.pairs:
                halved.setdefault(name, tags[TAG_HALVED])
        if tags.get(TAG_IS_PARENT) != "true" and tags.get(tracking.TAG_CONFIG_KEY):  # every attempt's run, any end
            used = {f: r.data.metrics.get(m) for f, m in RUN_COST.items()}
            cost[tags[tracking.TAG_CONFIG_KEY]].add(Cost(0.0, **used))
        if tags.get(TAG_IS_PARENT) == "true":
            if tags.get("complete") == "true":
                parents_complete.add((tags.get(tracking.TAG_CONFIG_KEY), tags.get("n_folds")))
            continue
        if r.info.status == "FINISHED" and tracking.TAG_CONFIG_KEY in tags and tracking.TAG_FOLD in tags:
            finished.setdefault((tags[tracking.TAG_CONFIG_KEY], int(tags[tracking.TAG_FOLD])), r)
        elif tags.get(TAG_FOLD_PRUNED) == "true" and tracking.TAG_CONFIG_KEY in tags and tracking.TAG_FOLD in tags:
            pruned.setdefault((tags[tracking.TAG_CONFIG_KEY], int(tags[tracking.TAG_FOLD])), tags.get(TAG_SKIPPED, ""))
        elif (r.info.status == "KILLED" and TAG_PRUNED_AT in tags and tracking.TAG_CONFIG_KEY in tags
              and tracking.TAG_FOLD in tags):  # an Optuna trial its pruner stopped
            pruned.setdefault((tags[tracking.TAG_CONFIG_KEY], int(tags[tracking.TAG_FOLD])),
                              f"trial {tags.get('optuna_trial', '?')} stopped by its pruner at iteration "
                              f"{tags[TAG_PRUNED_AT]}")
    live: dict = {}
    hist: dict = {}
    note = ""
    if rec.submissions:
        try:
            live = slurm_state.live_tasks(rec.array_ids)
            hist = slurm_state.task_history(rec.array_ids)
        except slurm_state.SlurmQueryError as exc:
            note = f"SLURM could not be asked ({exc}): states from MLflow only"
    # Latest task of each pair (a rerun's array after an earlier one), and every live one.
    latest: dict[sweep_record.Pair, tuple[sweep_record.Submission, int]] = {}
    alive_of: dict[sweep_record.Pair, list] = collections.defaultdict(list)
    for sub in rec.submissions:
        for i, name in enumerate(sub.tasks):
            pair = sweep_record.parse_pair(name)
            latest[pair] = (sub, i)
            if (sub.array_id, i) in live:
                alive_of[pair].append(live[(sub.array_id, i)])
    out = []
    for name, info in sorted(rec.pairs.items(), key=lambda kv: kv[1]["run_name"]):
        pair = sweep_record.parse_pair(name)
        run_name = info["run_name"]
        if pair in finished:
            out.append(PairStatus(pair, run_name, "FINISHED"))
        elif pair in pruned and not alive_of.get(pair):
            out.append(PairStatus(pair, run_name, "PRUNED", pruned[pair]))
        elif alive_of.get(pair):
            task = alive_of[pair][0]
            h = hist.get((task.array_id, task.task))
            requeues = requeue_count(h, task)
            if task.state in REQUEUE_STATES or requeues:
                state = "REQUEUED"  # running again or waiting to: shown apart from first attempts, with its count
            elif task.state in RUNNING_STATES:
                state = "RUNNING"
            else:
                state = "PENDING"
            extra = f", {len(alive_of[pair])} live tasks" if len(alive_of[pair]) > 1 else ""
            extra += f", requeued {requeues} time(s)" if requeues else ""
            out.append(PairStatus(pair, run_name, state, f"task {task.name} {task.state}{extra}"))
        elif pair in latest and note:
            sub, i = latest[pair]
            out.append(PairStatus(pair, run_name, "UNKNOWN", f"task {sub.array_id}_{i}: {note}"))
        elif pair in latest:
            sub, i = latest[pair]
            h = hist.get((sub.array_id, i))
            slurm = f"{h.state} exit {h.exit_code}" if h is not None else "no accounting record"
            if h is not None and h.state == "COMPLETED":
                slurm += " (no FINISHED MLflow run)"
            if h is not None and h.attempts > 1:  # e.g. submitit gave up after max_num_timeout requeues
                slurm += f" after {h.attempts - 1} requeue(s)" + (
                    f": the requeue limit (max_num_timeout={rec.max_num_timeout}) is used up"
                    if getattr(rec, "max_num_timeout", None) is not None and h.attempts - 1 >= rec.max_num_timeout
                    else "")
            tail = stderr_tail(sub, i)
            out.append(PairStatus(pair, run_name, "FAILED",
                                  f"task {sub.array_id}_{i} {slurm}" + (f"; stderr: {tail}" if tail else "")))
        else:
            out.append(PairStatus(pair, run_name, "NEVER_QUEUED", rec.skipped.get(name, "")))
    gpu_hours = sum(h.gpu_seconds for h in hist.values()) / 3600.0
    for sub in rec.submissions:
        for i, name in enumerate(sub.tasks):
            h = hist.get((sub.array_id, i))
            if h is not None:
                cost[sweep_record.parse_pair(name)[0]].add(Cost(h.gpu_seconds / 3600.0))
    time_left = _time_left(rec, out, finished, live)
    built: list[str] = []
    if build_parents:
        built = _build_parents(rec, uri, out, parents_complete)
    keys = {p.pair[0] for p in out}
    return SweepStatus(rec, out, gpu_hours, time_left, built, note, halved, {k: c for k, c in cost.items() if k in keys})


def requeue_count(h: tp.Optional[slurm_state.TaskHistory], task: tp.Optional[slurm_state.LiveTask] = None) -> int:
    """Requeues of a task so far: sacct's earlier records of it (-D), or squeue's restart count."""
    from_sacct = max(0, h.attempts - 1) if h is not None else 0
    return max(from_sacct, int(getattr(task, "restarts", 0) or 0))


def _time_left(rec, pairs: list[PairStatus], finished: dict, live: dict) -> tp.Optional[float]:
    """Remaining predicted cost × seconds per cost unit of the finished runs, over the slots that run them."""
    done = [(rec.pairs[sweep_record.pair_name(p.pair)]["cost"], finished[p.pair].data.metrics.get("wall_time_s"))
            for p in pairs if p.state == "FINISHED" and p.pair in finished]
    done = [(c, w) for c, w in done if w and c]
    todo = [rec.pairs[sweep_record.pair_name(p.pair)]["cost"] for p in pairs
            if p.state in ("RUNNING", "PENDING", "REQUEUED")]
    if not todo:
        return 0.0
    if not done:
        return None
    per_cost = sum(w for _, w in done) / sum(c for c, _ in done)
    slots = max(1, min(len(todo), rec.parallelism or len(todo)))
    # Longest-first: the makespan is at least the longest run and at least the total over the slots.
    return max(max(todo) * per_cost, sum(todo) * per_cost / slots)


def _build_parents(rec, uri: str, pairs: list[PairStatus], parents_complete: set) -> list[str]:

    by_key: dict[str, list[PairStatus]] = collections.defaultdict(list)
    for p in pairs:
        by_key[p.pair[0]].append(p)
    ready = [k for k, ps in by_key.items()
             if {p.pair[1] for p in ps if p.state == "FINISHED"} >= set(range(rec.num_folds))
             and (k, str(rec.num_folds)) not in parents_complete]
    if ready:
        link_parent_runs(uri, rec.experiment_id, ready, num_folds=rec.num_folds)
    return ready


def _hms(seconds: tp.Optional[float]) -> str:
    if seconds is None or math.isnan(seconds):
        return "unknown (no finished run yet)"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m"


def render(st: SweepStatus) -> str:
    rec = st.rec
    lines = [f"sweep {rec.sweep_id}: experiment {rec.experiment!r}, {len(rec.pairs)} runs, "
             f"arrays {','.join(rec.array_ids) or '-'}"]
    if st.slurm_note:
        lines.append(f"warning: {st.slurm_note}")
    head = f"{'config':<24} " + " ".join(f"{s:>12}" for s in STATES)
    lines += ["", head]
    by_cfg: dict[str, list[PairStatus]] = collections.defaultdict(list)
    for p in st.pairs:
        by_cfg[p.run_name.rsplit("-fold", 1)[0] + f" {p.pair[0][:6]}"].append(p)
    for name, ps in sorted(by_cfg.items()):
        c = st.counts(ps)
        lines.append(f"{name:<24} " + " ".join(f"{c[s]:>12}" for s in STATES))
    c = st.counts()
    lines.append(f"{'total':<24} " + " ".join(f"{c[s]:>12}" for s in STATES))
    details = [p for p in st.pairs if p.state in ("FAILED", "REQUEUED", "UNKNOWN", "PRUNED") or (  # skipped (on_oom): below, by config
        p.state == "NEVER_QUEUED" and p.detail and sweep_record.pair_name(p.pair) not in rec.skipped)]
    if details:
        lines.append("")
        lines += [f"  {p.state:<12} {p.run_name}: {p.detail}" for p in details]
    lines += _memory_lines(st)
    lines += cost_lines(st)
    lines.append("")
    lines.append(f"GPU-hours spent: {st.gpu_hours:.2f} (sacct elapsed × GPUs, every attempt)")
    lines.append(f"time left (estimate): {_hms(st.time_left_s)}")
    if st.parents_built:
        lines.append(f"parent runs built for {len(st.parents_built)} config(s) with all folds FINISHED")
    verdict = {EXIT_FINISHED: "finished", EXIT_RUNNING: "running", EXIT_FAILED: "failed"}[st.exit_code]
    if st.exit_code == EXIT_RUNNING and c["UNKNOWN"] and not (c["RUNNING"] + c["PENDING"] + c["REQUEUED"]):
        verdict = "unknown (SLURM could not be asked; run again)"
    lines.append(f"status: {verdict}")
    return "\n".join(lines)


def cost_lines(st: SweepStatus) -> list[str]:
    """Per config and for the sweep: allocated vs used GPU-hours, energy, CPU core-hours ('-': not reported)."""
    if not st.cost:
        return []
    names = {p.pair[0]: p.run_name.rsplit("-fold", 1)[0] + f" {p.pair[0][:6]}" for p in st.pairs}

    def num(v: tp.Optional[float], fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    total = Cost()
    lines = ["", "cost: allocated GPU-h = sacct elapsed × GPUs (every attempt); used GPU-h = GPU utilisation × time and "
                 "energy = GPU power × time (MLflow system metrics; '-' where no GPU reported them); CPU core-h of the "
                 "training processes",
             f"{'config':<24} {'alloc GPU-h':>12} {'used GPU-h':>12} {'used/alloc':>11} {'energy kWh':>11} "
             f"{'CPU core-h':>11}"]
    for key, c in sorted(st.cost.items(), key=lambda kv: names.get(kv[0], kv[0])):
        total.add(c)
        lines.append(_cost_row(names.get(key, key), c, num))
    lines.append(_cost_row("total", total, num))
    return lines


def _cost_row(name: str, c: Cost, num: tp.Callable[..., str]) -> str:
    share = c.used_gpu_h / c.allocated_gpu_h if c.used_gpu_h is not None and c.allocated_gpu_h else None
    return (f"{name:<24} {c.allocated_gpu_h:>12.2f} {num(c.used_gpu_h):>12} {num(share, '{:.0%}'):>11} "
            f"{num(c.energy_kwh, '{:.3f}'):>11} {num(c.cpu_core_h, '{:.3f}'):>11}")


def _memory_lines(st: SweepStatus) -> list[str]:
    """The configs halved or skipped for GPU memory (on_oom), one line each with the estimate and the folds."""
    by_reason: dict[tuple[str, str, str], list[int]] = collections.defaultdict(list)
    names = {sweep_record.pair_name(p.pair): p.run_name.rsplit("-fold", 1)[0] for p in st.pairs}
    for what, reasons in (("halved", {**st.rec.halved, **st.halved}), ("skipped", st.rec.skipped)):
        for name, why in reasons.items():
            if name in names:
                by_reason[(what, names[name], why)].append(sweep_record.parse_pair(name)[1])
    if not by_reason:
        return []
    n_halved = len({k[1] for k in by_reason if k[0] == "halved"})
    n_skipped = len({k[1] for k in by_reason if k[0] == "skipped"})
    lines = ["", f"GPU memory (on_oom): {n_halved} config(s) trained at a halved batch, {n_skipped} skipped"]
    for (what, cfg, why), folds in sorted(by_reason.items()):
        lines.append(f"  {what}: {cfg} (folds {','.join(map(str, sorted(folds)))}): {why}")
    return lines


def resolve(overrides: tp.Sequence[str], sid: tp.Optional[str]) -> tuple[sweep_record.SweepRecord, str, tp.Any]:
    """The sweep's record, the tracking URI and the base config; raises ValueError naming the problem."""

    base, job_overrides = expand_sweep(list(overrides))
    work = Path(str(base.paths.work))
    uri = str(base.mlflow.tracking_uri)
    if sid:
        rec = sweep_record.load(work, sid)
        if rec is None:
            raise ValueError(f"--sweep-id {sid}: no record {sweep_record.record_path(work, sid)} "
                             f"(paths.work={work}; set SCALING_UNET_WORK or paths.work as for the sweep)")
        return rec, uri, base

    jobs = check_jobs(compose_jobs(job_overrides))
    kept, skipped, _ = apply_memory_policy(jobs)
    all_jobs = kept + [j for j, _ in skipped]
    experiment = str(all_jobs[0].plan.experiment)
    sid = sweep_record.sweep_id(experiment, [j.pair for j in all_jobs])
    rec = sweep_record.load(work, sid)
    if rec is None:  # never submitted: every pair is FINISHED (an earlier sweep) or never queued
        from mlflow.tracking import MlflowClient

        tracking.check_tracking_uri(uri)
        exp = MlflowClient(uri).get_experiment_by_name(experiment)
        rec = sweep_record.SweepRecord(
            sweep_id=sid, experiment=experiment, experiment_id=exp.experiment_id if exp else "", tracking_uri="",
            num_folds=all_jobs[0].plan.num_folds,
            pairs={sweep_record.pair_name(j.pair): {"run_name": j.plan.run_name, "cost": 0.0,
                                                    "config_key": j.plan.config_key, "fold": j.plan.fold}
                   for j in all_jobs},
            skipped={sweep_record.pair_name(j.pair): why for j, why in skipped},
            halved={sweep_record.pair_name(j.pair): halved_reason(j.cfg) for j in kept if halved_reason(j.cfg)})
    return rec, uri, base
