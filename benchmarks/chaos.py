"""Chaos run on the local SLURM cluster: a 16-run sweep survives a preemption, a 60 s tracking-server outage and the
death of the submitting process, and a rerun of the same command completes it with exactly one FINISHED run per
(config, fold).

    bash slurm/install.sh && bash slurm/start.sh        # once (root); the script starts both again (idempotent)
    .venv/bin/python benchmarks/chaos.py                # ~8 min on 2 cores; JSON in benchmarks/results/chaos_<date>.json

What it does (docs/benchmarks.md, "Chaos run"):

1. a real ``mlflow server`` on a fresh PostgreSQL database (slurm/postgres.sh, tests/mlflow_server.py);
2. ``python -m sweep ... -m`` with the SLURM launcher, in the background: 4 tiny configs (model.width × model.depth)
   × 4 folds = 16 array tasks, at most ``--parallel`` (2) at a time, each validating every
   ``train.checkpoint_every`` iterations;
3. once a task has checkpointed, ``scancel --signal=USR2`` on it, until its log shows the signal caught (submitit)
   and the hook's answer ("USR2: checkpoint saved; requeueing"); never a second signal once one landed. Here
   scancel answers "Job can not be altered now" for an array task even when it delivered the signal, and retries
   for minutes: it is stopped once the log has spoken. Then the requeue is checked (sacct -D: REQUEUED;
   scontrol: Restarts >= 1);
4. once ``--parallel`` tasks train, the tracking server stopped for ``--outage-s`` (60), then started on the same
   port and database;
5. the sweep process SIGKILLed (its whole process group): the submitted array is NOT cancelled, as a user who
   loses the login shell would find it;
6. the same command run again, to its end: it queues what is neither FINISHED nor alive and waits for the
   tasks the first command left;
7. MLflow read back: per (config, fold) the FINISHED / RUNNING / other runs, each FINISHED run's validation
   history (``val_mean_iou``, ``val_loss``, ``train_loss`` at every multiple of ``checkpoint_every``), and every
   run of the experiment by status (the sweep's own run and the parent runs included);
8. ``python -m sweep.status`` with the same overrides (what a user runs next: it syncs offline stores, builds
   parents and closes the sweep's own run), and MLflow read back again.

Passes (exit 0) when the USR2 landed and was requeued, the server was away at least ``--outage-s``, the rerun and
sweep.status exit 0, and when the rerun ends every pair has exactly one FINISHED run with all its validation points,
no fold run is RUNNING, no pair has a second run and no point was logged twice; after sweep.status no run of any
kind is RUNNING (the sweep's own run is closed by sweep.status, docs/cluster.md). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.mlflow_server import postgres_database, start_mlflow_server  # noqa: E402

JOB_NAME = "su-chaos"
EXPERIMENT = "chaos"
USR2_LINE = "USR2: checkpoint saved; requeueing"  # sweep.jobs.train.checkpoint_before_requeue
USR2_CAUGHT = "Caught signal SIGUSR2"  # submitit's handler
USR2_FAILED = "USR2: saving the checkpoint failed"
USR2_CHUNK_AGAIN = "USR2 after the steps of the chunk"  # model.training: the last whole checkpoint stays
# tests/test_outage.py's tiny runs: no BN recalibration, no early stop, so every run trains to max_iters.
TINY = ["data.synth.size=32", "data.synth.n_train=4", "data.synth.n_test=1", "train.batch_size=2",
        "train.val_crop=32", "train.val_slice_step=8", "train.final_slice_step=8", "train.open_slabs=2",
        "train.bn_recalibration_batches=0", "train.early_stop_patience_iters=1000000",
        "train.lr_patience_iters=1000000"]
VAL_METRICS = ("val_mean_iou", "val_loss", "train_loss")


def log(msg: str, t0: list[float] = [time.monotonic()]) -> None:  # noqa: B006 (the start, once)
    print(f"[{time.monotonic() - t0[0]:7.1f} s] {msg}", flush=True)


def sweep_command(args, uri: str) -> list[str]:
    return [sys.executable, "-m", "sweep", *TINY, f"model.width={args.widths}", f"model.depth={args.depths}",
            "model.input_size=384", f"fold=range({args.folds})", f"train.max_iters={args.max_iters}",
            f"train.checkpoint_every={args.checkpoint_every}", f"mlflow.tracking_uri={uri}",
            f"mlflow.experiment={EXPERIMENT}",
            # The laptop profile on the cluster's placeholder GPUs: a stand-in on one CPU replica, allowed explicitly.
            "hydra/launcher=slurm_v100", "allow_stand_in=true", "train.cpu_replicas=1",
            "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=30", "hydra.launcher.signal_delay_s=60", "hydra.launcher.poll_interval_s=2",
            f"hydra.launcher.array_parallelism={args.parallel}", f"hydra.launcher.name={JOB_NAME}", "-m"]


def slurm(*cmd: str, check: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def start_cluster() -> None:
    for script in ("install.sh", "start.sh"):
        p = subprocess.run(["bash", str(REPO / "slurm" / script)], capture_output=True, text=True, timeout=900)
        if p.returncode:
            raise SystemExit(f"slurm/{script} failed:\n{p.stdout}\n{p.stderr}")
        if script == "start.sh":
            conf = next(l.split("=", 1)[1] for l in p.stdout.splitlines() if l.startswith("export SLURM_CONF="))
            os.environ["SLURM_CONF"] = conf


def tasks_alive() -> dict[str, str]:
    """{array task (e.g. 12_3): state} of this benchmark's jobs that SLURM still holds."""
    out = slurm("squeue", "-h", "-r", "-n", JOB_NAME, "-o", "%i|%T").stdout
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def training_tasks(work: Path, checkpoint_every: int) -> list[tuple[str, Path]]:
    """(array task, checkpoint folder) of runs that checkpointed at least once and are not finished, whose lease
    names a RUNNING task: candidates for a preemption."""
    running = {t for t, s in tasks_alive().items() if s == "RUNNING"}
    out = []
    for state in sorted((work / "checkpoints").glob("*/fold*/state.json")):
        try:
            st = json.loads(state.read_text())
            lease = json.loads((state.parent / "lease.json").read_text())
        except (OSError, ValueError):
            continue
        task = lease.get("slurm_task")
        if st.get("iteration", 0) >= checkpoint_every and not st.get("finished") and task in running:
            out.append((task, state.parent))
    return out


def task_logs(work: Path, task: str) -> list[Path]:
    return [Path(p) for p in glob.glob(str(work / "multirun" / "*" / ".submitit" / task / "*_log.*"))]


def usr2_seen(work: Path, task: str) -> dict[str, bool]:
    """What the task's log says: the signal caught (submitit), the checkpoint hook's answer."""
    text = "".join(p.read_text(errors="replace") for p in task_logs(work, task))
    return {"caught": USR2_CAUGHT in text, "saved": USR2_LINE in text, "failed": USR2_FAILED in text,
            "chunk_again": USR2_CHUNK_AGAIN in text}


def preempt(work: Path, args, deadline_s: float = 240.0) -> dict:
    """USR2 to one task that trains, retried (another task, if need be) until its log shows the handler ran."""
    t_end = time.monotonic() + deadline_s
    tries: list[dict] = []
    while time.monotonic() < t_end:
        cands = training_tasks(work, args.checkpoint_every)
        if not cands:
            time.sleep(0.5)
            continue
        task, ckpt = cands[0]
        t_sig = time.time()
        # scancel answers "Job can not be altered now, try again later" for an array task here even when the signal
        # was delivered, and then retries on its own, for minutes: its answer proves nothing either way, the log does.
        sc = subprocess.Popen(["scancel", "--signal=USR2", task], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        seen: dict[str, bool] = {}
        wait_until = time.monotonic() + 20
        while time.monotonic() < wait_until:
            seen = usr2_seen(work, task)
            if seen["caught"] and (seen["saved"] or seen["failed"]):
                break
            time.sleep(0.5)
        landed = seen.get("caught", False)
        rc = sc.poll()
        if rc is None:
            sc.kill()
        err = sc.communicate()[1].strip()
        tries.append({"task": task, "scancel_rc": rc if rc is not None else "still retrying, stopped",
                      "scancel_stderr": err[-300:], "log": seen, "at": t_sig})
        log(f"scancel --signal=USR2 {task}: {'rc %s' % rc if rc is not None else 'still retrying after the check'}"
            f"{' (' + err.splitlines()[-1] + ')' if err else ''}; its log: {seen}")
        if landed:  # once caught, never a second signal: the task is being requeued
            log(f"USR2 landed on {task} ({ckpt.parent.name}/{ckpt.name}): "
                + (f"its log says '{USR2_LINE}'" if seen["saved"] else "but the checkpoint hook did not save"))
            return {"task": task, "run": f"{ckpt.parent.name}/{ckpt.name}", "tries": tries, "landed": True,
                    "handler": "failed" if seen["failed"] or not seen["saved"] else
                    "kept the last whole checkpoint (the chunk is trained again)" if seen["chunk_again"] else
                    "wrote a mid-chunk checkpoint", "landed_after_s": round(time.time() - t_sig, 1)}
        log(f"USR2 to {task} did not land (no '{USR2_CAUGHT}' in its log within 20 s): trying again")
    return {"task": None, "tries": tries, "landed": False}


def requeue_seen(task: str, timeout_s: float = 120.0) -> dict:
    """sacct -D shows the task's REQUEUED attempt; scontrol shows Restarts (SLURM_RESTART_COUNT of the next run)."""
    t_end = time.monotonic() + timeout_s
    info: dict[str, tp.Any] = {}
    while time.monotonic() < t_end:
        hist = slurm("sacct", "-j", task, "-D", "-X", "-n", "-P", "--format=JobID,State,Start,End").stdout
        show = slurm("scontrol", "-o", "show", "job", task).stdout
        m = re.search(r"\bRestarts=(\d+)", show)
        info = {"sacct_states": [l.split("|")[1] for l in hist.splitlines() if "|" in l],
                "restarts": int(m.group(1)) if m else None,
                "state_now": (re.search(r"\bJobState=(\S+)", show) or [None, None])[1]}
        if "REQUEUED" in info["sacct_states"] and (info["restarts"] or 0) >= 1:
            return {**info, "requeued": True}
        time.sleep(1)
    return {**info, "requeued": False}


def verify(uri: str, args, outage: tuple[float, float]) -> dict:
    """Every run of the experiment read back; per (config, fold) its runs, each FINISHED run's validation points."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=5000)
    by_status: dict[str, int] = {}
    kinds: dict[str, dict[str, int]] = {}
    pairs: dict[tuple[str, int], list] = {}
    for r in runs:
        tags = r.data.tags
        kind = "sweep" if tags.get("is_sweep") == "true" else "parent" if tags.get("is_parent") == "true" else \
            "fold" if "fold" in tags and "config_key" in tags else "other"
        by_status[r.info.status] = by_status.get(r.info.status, 0) + 1
        kinds.setdefault(kind, {}).setdefault(r.info.status, 0)
        kinds[kind][r.info.status] += 1
        if kind == "fold":
            pairs.setdefault((tags["config_key"], int(tags["fold"])), []).append(r)
    expected_steps = list(range(args.checkpoint_every, args.max_iters + 1, args.checkpoint_every))
    rows = []
    for (key, fold), rs in sorted(pairs.items()):
        fin = [r for r in rs if r.info.status == "FINISHED"]
        row = {"config_key": key, "fold": fold, "finished": len(fin),
               "running": sum(r.info.status == "RUNNING" for r in rs),
               "other": sorted(r.info.status for r in rs if r.info.status not in ("FINISHED", "RUNNING")),
               "runs": len(rs), "points": {}, "missing_points": {}, "extra_values": {}}
        for r in fin:
            for name in VAL_METRICS:
                hist = client.get_metric_history(r.info.run_id, name)
                steps = [m.step for m in hist]
                row["points"][name] = len(set(steps))
                missing = sorted(set(expected_steps) - set(steps))
                if missing:
                    row["missing_points"][name] = missing
                if len(steps) > len(set(steps)):  # two values at one step: a point logged twice, differently
                    row["extra_values"][name] = len(steps) - len(set(steps))
                if name == "val_mean_iou":  # made while the server was away, logged later with their own time
                    row["points_made_during_outage"] = sum(outage[0] * 1000 <= m.timestamp <= outage[1] * 1000
                                                           for m in hist)
            row["run_s"] = round((r.info.end_time - r.info.start_time) / 1000, 1)
            row["train_time_s"] = r.data.metrics.get("train_time_s")
            row["resumed_from_iteration"] = r.data.tags.get("resumed_from_iteration")
            row["tracking_outages"] = r.data.tags.get("tracking_outages")
            row["slurm_job_id"] = r.data.tags.get("slurm_job_id")
        rows.append(row)
    n_pairs = len(args.widths.split(",")) * len(args.depths.split(",")) * args.folds
    summary = {
        "pairs_expected": n_pairs, "pairs_seen": len(rows),
        "pairs_finished_exactly_once": sum(r["finished"] == 1 for r in rows),
        "pairs_with_all_points": sum(r["finished"] == 1 and not r["missing_points"] for r in rows),
        "expected_points_per_run": len(expected_steps),
        "fold_runs_running": sum(r["running"] for r in rows),
        "pairs_with_duplicate_runs": sum(r["runs"] > 1 for r in rows),
        "pairs_with_duplicate_finished": sum(r["finished"] > 1 for r in rows),
        "points_logged_twice": sum(sum(r["extra_values"].values()) for r in rows),
        "runs_by_status": by_status, "runs_by_kind": kinds,
        "runs_running_any_kind": by_status.get("RUNNING", 0),
        "resumed_runs": [f"{r['config_key']}/{r['fold']}: from {r['resumed_from_iteration']}"
                         for r in rows if r.get("resumed_from_iteration")],
        "runs_with_outage_tag": sum(bool(r.get("tracking_outages")) for r in rows),
        "points_made_during_outage": sum(r.get("points_made_during_outage", 0) for r in rows),
        "run_s_min_median_max": _spread([r["run_s"] for r in rows if "run_s" in r]),
        "train_time_s_min_median_max": _spread([r["train_time_s"] for r in rows if r.get("train_time_s")]),
    }
    # The (config, fold) runs: exactly one FINISHED each with every point, none RUNNING, no second run of a pair.
    summary["fold_runs_ok"] = (summary["pairs_seen"] == n_pairs and summary["pairs_finished_exactly_once"] == n_pairs
                               and summary["pairs_with_all_points"] == n_pairs and summary["fold_runs_running"] == 0
                               and summary["pairs_with_duplicate_runs"] == 0 and summary["points_logged_twice"] == 0)
    summary["ok"] = summary["fold_runs_ok"] and summary["runs_running_any_kind"] == 0
    return {"summary": summary, "pairs": rows}


def launch(cmd: list[str], env: dict, logfile: Path, cwd: Path) -> subprocess.Popen:
    # Its own session: the whole process group is killed at once later, as a lost login shell would end it.
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(logfile, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="32,64", help="model.width values (comma-separated)")
    ap.add_argument("--depths", default="1,2", help="model.depth values (comma-separated)")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--max-iters", type=int, default=1000)
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=2, help="array_parallelism: tasks at once (2 cores here)")
    ap.add_argument("--outage-s", type=float, default=60.0)
    ap.add_argument("--kill-after-restart-s", type=float, default=15.0,
                    help="the sweep process is killed this long after the server is back")
    ap.add_argument("--rerun-timeout-s", type=float, default=1200.0)
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/chaos_<date>.json")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, checkpoints)")
    args = ap.parse_args()
    date = dt.date.today().isoformat()
    out_json = args.json or REPO / "benchmarks" / "results" / f"chaos_{date}.json"
    if os.geteuid() != 0:
        print("error: the local SLURM cluster needs root (slurm/start.sh)", file=sys.stderr)
        return 2
    t_start = time.time()
    start_cluster()
    leftovers = [t for t in tasks_alive()]
    if leftovers:
        slurm("scancel", "-n", JOB_NAME)
        log(f"cancelled {len(leftovers)} leftover {JOB_NAME} tasks of an earlier run")
    root = Path(tempfile.mkdtemp(prefix="chaos-"))
    work = root / "work"
    work.mkdir()
    db = postgres_database()
    server = start_mlflow_server(root / "server", backend_store_uri=db)
    log(f"mlflow server {server.uri} on PostgreSQL ({db.rsplit('/', 1)[-1]}), up in {server.started_in_s:.1f} s; "
        f"work {work}")
    env = dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = sweep_command(args, server.uri)
    result: dict[str, tp.Any] = {
        "date": date, "machine": f"{os.cpu_count()} cores, local single-node SLURM (slurm/), CPU only",
        "command": " ".join(cmd[1:]), "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "mlflow": {"backend": "postgresql", "server_start_s": round(server.started_in_s, 1)}}
    first = second = None
    try:
        t_a = time.monotonic()
        first = launch(cmd, env, root / "sweep_first.log", root)
        log(f"first sweep command started (pid {first.pid}): {len(args.widths.split(','))}×"
            f"{len(args.depths.split(','))} configs × {args.folds} folds")
        # 3. Preemption of one task that trains.
        pre = preempt(work, args)
        pre["at_s"] = round(pre["tries"][-1]["at"] - t_start, 1) if pre.get("tries") else None
        result["preemption"] = pre
        if pre["landed"]:
            pre.update(requeue_seen(pre["task"]))
            log(f"requeue of {pre['task']}: sacct {pre.get('sacct_states')}, Restarts={pre.get('restarts')}")
        # 4. Server outage while tasks train: once as many tasks as may run at once have checkpointed.
        t_end = time.monotonic() + 180
        while len(training_tasks(work, args.checkpoint_every)) < args.parallel and time.monotonic() < t_end:
            time.sleep(0.5)
        training_at_stop = [t for t, _ in training_tasks(work, args.checkpoint_every)]
        alive_before = tasks_alive()
        server.stop()
        down = time.time()
        log(f"server stopped; tasks training: {training_at_stop}; alive: {alive_before}")
        time.sleep(args.outage_s)
        alive_during = tasks_alive()
        server = start_mlflow_server(root / "server", port=server.port, backend_store_uri=db)
        up = time.time()
        log(f"server started again on the same port and database after {up - down:.1f} s "
            f"(start {server.started_in_s:.1f} s); tasks alive at the end of the outage: {alive_during}")
        result["outage"] = {"down_at_s": round(down - t_start, 1), "up_at_s": round(up - t_start, 1),
                            "down_s": round(up - down, 1), "restart_s": round(server.started_in_s, 1),
                            "tasks_training_at_stop": training_at_stop,
                            "tasks_alive_at_stop": alive_before, "tasks_alive_at_restart": alive_during,
                            "first_sweep_alive_at_restart": first.poll() is None}
        # 5. The submitting process dies (SIGKILL to its process group); its array goes on.
        time.sleep(args.kill_after_restart_s)
        alive_at_kill = tasks_alive()
        first_rc = first.poll()
        if first_rc is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        killed = time.time()
        log(f"first sweep command {'SIGKILLed' if first_rc is None else f'had already exited ({first_rc})'}; "
            f"{len(alive_at_kill)} tasks alive: {alive_at_kill}")
        time.sleep(3)
        result["kill"] = {"at_s": round(killed - t_start, 1), "already_exited_rc": first_rc,
                          "tasks_alive_at_kill": alive_at_kill, "tasks_alive_3s_after": tasks_alive(),
                          "first_command_s": round(time.monotonic() - t_a, 1)}
        # 6. The same command again, to its end.
        t_b = time.monotonic()
        second = launch(cmd, env, root / "sweep_second.log", root)
        log(f"same command started again (pid {second.pid}); waiting for it to end")
        try:
            rc = second.wait(timeout=args.rerun_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)
            rc = None
        text = (root / "sweep_second.log").read_text(errors="replace")
        result["rerun"] = {"rc": rc, "wall_s": round(time.monotonic() - t_b, 1), "ended_at_s": round(time.time() - t_start, 1),
                           "lines": [l for l in text.splitlines() if re.search(
                               r"sweep: \d+ jobs|left to live jobs|submitted \d+ runs|all \d+ runs completed|FAILED|"
                               r"offline stores synced|error:", l)][:40]}
        log(f"second command exited {rc} after {result['rerun']['wall_s']:.0f} s")
        for line in result["rerun"]["lines"]:
            print("    " + line)
        # The array's tasks: every attempt, from accounting.
        arrays = sorted({sub["array_id"] for rec in work.glob("sweeps/*/sweep.json")
                         for sub in json.loads(rec.read_text())["submissions"]})
        acct = slurm("sacct", "-n", "-X", "-D", "-P", "-j", ",".join(arrays),
                     "--format=JobID,State,ExitCode,Elapsed").stdout if arrays else ""
        rows = [l.split("|") for l in acct.splitlines() if "|" in l]
        requeued = _count(r[0] for r in rows if r[1] in ("REQUEUED", "PREEMPTED"))
        result["slurm"] = {"arrays": arrays, "attempts": len(rows), "states": _count(r[1] for r in rows),
                           "requeues": sum(requeued.values()), "requeued_tasks": requeued,
                           "offline_stores": len(list(work.glob("checkpoints/*/fold*/mlflow/mlflow.db")))}
        # 7. MLflow after the rerun alone; 8. after python -m sweep.status (what a user runs next).
        window = (down, up)
        result["after_rerun"] = verify(server.uri, args, window)
        status = subprocess.run([sys.executable, "-m", "sweep.status", *cmd[3:-1]], cwd=root, env=env,
                                capture_output=True, text=True, timeout=600)
        result["sweep_status"] = {"rc": status.returncode, "tail": status.stdout.splitlines()[-25:],
                                  "stderr": status.stderr.strip().splitlines()[-5:]}
        result["after_status"] = verify(server.uri, args, window)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        server.stop()
        result["wall_s"] = round(time.time() - t_start, 1)
        result["work"] = str(root)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1, default=str))
    report(result, out_json)
    # The sweep's own MLflow run (is_sweep) is closed by sweep.status, not by the waiting sweep (docs/cluster.md):
    # the fold runs must be right when the rerun ends, every run (parents, sweep run) after sweep.status.
    ok = (result["after_rerun"]["summary"]["fold_runs_ok"] and result["after_status"]["summary"]["ok"]
          and result["preemption"]["landed"] and result["preemption"].get("requeued")
          and result["outage"]["down_s"] >= args.outage_s and result["rerun"]["rc"] == 0
          and result["sweep_status"]["rc"] == 0)
    result["ok"] = ok
    out_json.write_text(json.dumps(result, indent=1, default=str))
    if not args.keep and ok:
        subprocess.run(["rm", "-rf", str(root)])
    print(f"\nchaos run: {'PASS' if ok else 'FAIL'} (logs and checkpoints in {root})" if not ok or args.keep
          else "\nchaos run: PASS")
    return 0 if ok else 1


def _spread(values: list[float]) -> list[float]:
    v = sorted(values)
    return [round(v[0], 1), round(v[len(v) // 2], 1), round(v[-1], 1)] if v else []


def _count(items: tp.Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def report(res: dict, path: Path) -> None:
    pre, out, kill, rerun = res.get("preemption", {}), res.get("outage", {}), res.get("kill", {}), res.get("rerun", {})
    print("\nChaos run", res["date"], "-", res["machine"])
    print(f"  preemption: USR2 to {pre.get('task')} landed={pre.get('landed')} after {len(pre.get('tries', []))} "
          f"scancel call(s), handler: {pre.get('handler')}; requeued={pre.get('requeued')} "
          f"(sacct {pre.get('sacct_states')}, Restarts={pre.get('restarts')})")
    print(f"  outage: server down {out.get('down_s')} s (from {out.get('down_at_s')} s to {out.get('up_at_s')} s), "
          f"restart {out.get('restart_s')} s")
    print(f"  sweep process killed at {kill.get('at_s')} s with {len(kill.get('tasks_alive_at_kill') or {})} tasks "
          f"alive; rerun exited {rerun.get('rc')} after {rerun.get('wall_s')} s")
    sl = res.get("slurm", {})
    print(f"  SLURM: {sl.get('attempts')} task attempts {sl.get('states')}, requeues {sl.get('requeues')}, "
          f"offline stores {sl.get('offline_stores')}")
    print(f"\n{'':24} {'after the rerun':>16} {'after sweep.status':>19}")
    a = res.get("after_rerun", {}).get("summary", {})
    b = res.get("after_status", {}).get("summary", {})
    n = a.get("pairs_expected")
    for label, key, fmt in (
            ("FINISHED exactly once", "pairs_finished_exactly_once", lambda v: f"{v}/{n}"),
            ("all validation points", "pairs_with_all_points",
             lambda v: f"{v}/{n} ×{a.get('expected_points_per_run')}"),
            ("fold runs RUNNING", "fold_runs_running", str),
            ("any run RUNNING", "runs_running_any_kind", str),
            ("pairs with >1 run", "pairs_with_duplicate_runs", str),
            ("points logged twice", "points_logged_twice", str),
            ("runs resumed", "resumed_runs", lambda v: str(len(v))),
            ("runs with outage tag", "runs_with_outage_tag", str),
            ("points made in outage", "points_made_during_outage", str)):
        print(f"  {label:22} {fmt(a.get(key, '-')) if key in a else '-':>16} "
              f"{fmt(b.get(key, '-')) if key in b else '-':>19}")
    print(f"  runs by kind/status     {a.get('runs_by_kind')}  ->  {b.get('runs_by_kind')}")
    print(f"  run time s (MLflow start→end, min/median/max) {a.get('run_s_min_median_max')}, "
          f"training steps s {a.get('train_time_s_min_median_max')}")
    print(f"  wall time {res.get('wall_s')} s; JSON {path}")


if __name__ == "__main__":
    sys.exit(main())
