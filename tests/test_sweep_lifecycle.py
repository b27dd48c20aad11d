"""Sweeps that outlive the submitting process, on the real local SLURM cluster with a real MLflow server:
submit and exit, ``python -m sweep.status``, a rerun while the array runs, and never two jobs on one run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweep.slurm import lease
from tests.slurm_fixture import slurm_cluster  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.width=32", "model.depth=1", "model.input_size=384", "data.synth.size=32", "data.synth.n_train=4",
        "data.synth.n_test=1", "train.batch_size=2", "train.val_crop=32", "train.val_slice_step=8",
        "train.final_slice_step=8", "train.open_slabs=2"]
# The test cluster's 4 fake V100s train the laptop profile on synthetic data: a stand-in, allowed explicitly.
# The login node's lifecycle is the subject here, not multi-replica training (test_sweep_slurm.py's compound test,
# test_distributed): one replica, ~10 CPU-s less per job than 4 logical CPU devices; each job still asks for 4 GPUs.
STAND_IN = ["allow_stand_in=true", "train.cpu_replicas=1", "train.batch_size=4"]


def _env(work: Path) -> dict:
    return dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3", MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")


def _sweep_args(uri: str, experiment: str, name: str, *overrides: str) -> list[str]:
    return ["+experiment=compound", "hydra/launcher=slurm_v100", *TINY, *STAND_IN, "hydra.launcher.partition=gpu",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
            "hydra.launcher.signal_delay_s=20", "hydra.launcher.poll_interval_s=1",
            "hydra.launcher.array_parallelism=4", f"hydra.launcher.name=su-test-{name}",
            f"mlflow.tracking_uri={uri}", f"mlflow.experiment={experiment}", *overrides]


def _sweep(work: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "sweep", *args, "-m"], cwd=work.parent, env=_env(work),
                          capture_output=True, text=True, timeout=timeout)


def _status(work: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep.status", *args], cwd=work.parent, env=_env(work),
                          capture_output=True, text=True, timeout=timeout)


def _tasks(cluster, name: str) -> list[tuple[str, str]]:
    out = cluster.run("squeue", "-h", "-r", "-n", f"su-test-{name}", "-o", "%i|%T", check=False).stdout
    return [tuple(line.split("|")) for line in out.split()]


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_killed_sweep_rerun_queues_nothing_for_live_pairs_and_status_builds_the_parent(
        tmp_path, slurm_cluster, mlflow_server):
    work = tmp_path / "work"
    args = _sweep_args(mlflow_server.uri, "lifecycle", "life", "fold=range(4)", "train.max_iters=60",
                       "train.checkpoint_every=30", "train.early_stop_patience_iters=1000")
    log = tmp_path / "first.log"
    work.mkdir(parents=True)
    first = subprocess.Popen([sys.executable, "-m", "sweep", *args, "-m"], cwd=tmp_path, env=_env(work),
                             stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        slurm_cluster.wait_for("the array queued and recorded", lambda: len(_tasks(slurm_cluster, "life")) == 4
                               and list((work / "sweeps").glob("*/sweep.json")), timeout=180, interval=0.5)
    finally:
        first.send_signal(signal.SIGKILL)  # the login node's process dies; its array lives on
        first.wait()
    (record,) = (work / "sweeps").glob("*/sweep.json")
    rec = json.loads(record.read_text())
    (array_id,) = [s["array_id"] for s in rec["submissions"]]
    slurm_cluster.submitted.append(array_id)

    again = _sweep(work, [*args, "hydra.launcher.wait=false"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "4 runs left to live jobs (not queued again)" in out and "0 runs queued" in out
    assert f"cancel:  scancel {array_id}" in out and f"--sweep-id {rec['sweep_id']}" in out
    assert {t.split("_")[0] for t, _ in _tasks(slurm_cluster, "life")} <= {array_id}  # no second array

    running = _status(work, "--sweep-id", rec["sweep_id"])
    assert running.returncode in (0, 3), running.stdout + running.stderr
    done = _status(work, *args, "--watch", "2")  # the same overrides find the same sweep
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    totals = [line.split() for line in done.stdout.splitlines() if line.startswith("total")]
    renders = [t for t in totals if len(t) == 9]  # the state table (8 states); the cost table's total has 6 fields
    assert len(renders) >= 1
    total = renders[-1]  # --watch printed one table per refresh: the last is the final state
    assert total[1:] == ["4", "0", "0", "0", "0", "0", "0", "0"], done.stdout
    # Allocated (4 fake GPUs × elapsed, from sacct) beside used: no GPU reports utilisation here, so "-", not a guess.
    cost = [t for t in totals if len(t) == 6][-1]
    assert float(cost[1]) > 0 and cost[2:4] == ["-", "-"] and cost[5] != "-", done.stdout
    assert "parent runs built for 1 config(s)" in done.stdout and "status: finished" in done.stdout
    assert "GPU-hours spent: 0.00" not in done.stdout  # 4 tasks × 4 fake GPUs × their elapsed time

    runs = _runs(mlflow_server.uri, "lifecycle")
    folds = [r for r in runs if "fold" in r.data.tags]
    finished = [r for r in folds if r.info.status == "FINISHED"]
    assert len(finished) == 4 and len({r.data.tags["fold"] for r in finished}) == 4 and len(folds) == 4
    assert {r.data.tags["slurm_array_job_id"] for r in finished} == {array_id}
    (parent,) = [r for r in runs if r.data.tags.get("is_parent") == "true"]
    assert parent.data.tags["complete"] == "true" and parent.data.metrics["n_folds"] == 4
    (sweep_run,) = [r for r in runs if r.data.tags.get("is_sweep") == "true"]
    assert sweep_run.data.tags["slurm_array_ids"] == array_id and sweep_run.data.tags["sweep_id"] == rec["sweep_id"]
    assert sweep_run.info.status == "FINISHED"
    assert not list((work / "checkpoints").glob("*/fold*/lease.json"))  # released by the jobs that finished


def test_two_jobs_on_one_pair_one_trains_the_other_exits_naming_the_holder(tmp_path, slurm_cluster, mlflow_server):
    work = tmp_path / "work"
    work.mkdir(parents=True)
    overrides = [*TINY, "fold=0", "train.max_iters=300", "train.checkpoint_every=150",
                 "train.early_stop_patience_iters=1000",
                 f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=lease"]
    # Data and experiment first, as the sweep launcher does, so both jobs race only for the run itself.
    prep = subprocess.run([sys.executable, "-c", "import sys; from sweep.orchestration.planning import compose_jobs; "
                           "from sweep.jobs.train import ensure_dataset; from sweep.tracking.client import ensure_experiment; "
                           "(_, _, c), = compose_jobs([sys.argv[1:]]); ensure_dataset(c); "
                           "ensure_experiment(str(c.mlflow.tracking_uri), 'lease')", *overrides],
                          cwd=REPO, env=_env(work), capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr[-2000:]
    cmd = " ".join([sys.executable, "-m", "sweep", *overrides])
    env = f"cd {REPO} && SCALING_UNET_WORK={work} TF_CPP_MIN_LOG_LEVEL=3 "
    jobs = [slurm_cluster.sbatch("--time=10", "--cpus-per-task=1", wrap=env + cmd, output=tmp_path / f"job{i}.out",
                                 name=f"lease{i}") for i in range(2)]
    for j in jobs:
        slurm_cluster.wait_for(f"job {j} ended", lambda j=j: slurm_cluster.sacct(j).get(j, ("",))[0]
                               in ("COMPLETED", "FAILED"), timeout=300, interval=1)
    states = {j: slurm_cluster.sacct(j)[j] for j in jobs}
    outs = {j: (tmp_path / f"job{i}.out").read_text() for i, j in enumerate(jobs)}
    winners = [j for j in jobs if states[j] == ("COMPLETED", "0:0")]
    losers = [j for j in jobs if states[j] == ("FAILED", "3:0")]
    assert len(winners) == 1 and len(losers) == 1, (states, outs)
    assert f"already trained by SLURM job {winners[0]}" in outs[losers[0]], outs[losers[0]][-2000:]
    folds = [r for r in _runs(mlflow_server.uri, "lease") if r.data.tags.get("fold") == "0"]
    assert [r.info.status for r in folds] == ["FINISHED"], [(r.info.status, r.data.tags) for r in folds]
    assert folds[0].data.tags["slurm_job_id"] == winners[0]


def test_lease_of_a_live_job_is_respected_a_dead_ones_taken_over_and_a_requeued_job_keeps_its_own(
        tmp_path, slurm_cluster, monkeypatch):
    ckpt = tmp_path / "ckpt" / "fold0"
    holder = slurm_cluster.sbatch("--time=2", wrap="sleep 100", name="lease-holder")
    slurm_cluster.wait_running(holder)
    ckpt.mkdir(parents=True)
    (ckpt / lease.LEASE_FILE).write_text(json.dumps({"slurm_job_id": holder, "host": "elsewhere", "pid": 1}))
    monkeypatch.setenv("SLURM_JOB_ID", "424242")
    with pytest.raises(lease.LeaseHeld, match=f"run-x: already trained by SLURM job {holder}, RUNNING"):
        lease.acquire(ckpt, "run-x")
    slurm_cluster.cancel(holder)
    slurm_cluster.wait_for("holder gone from squeue or ended", lambda: not lease.holder_alive(
        {"slurm_job_id": holder})[0], timeout=30)
    mine = lease.acquire(ckpt, "run-x")  # the holder is dead: taken over
    assert json.loads((ckpt / lease.LEASE_FILE).read_text())["slurm_job_id"] == "424242" == mine["slurm_job_id"]
    # Another live process of the same attempt of this job (a pool worker of the allocation; pid 1 is alive): a rival.
    (ckpt / lease.LEASE_FILE).write_text(json.dumps({**mine, "pid": 1}))
    with pytest.raises(lease.LeaseHeld, match="already trained by SLURM job 424242, process running"):
        lease.acquire(ckpt, "run-x")
    # The same job requeued (SLURM sets SLURM_RESTART_COUNT=1): a new process, its own lease.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert lease.acquire(ckpt, "run-x")["pid"] == os.getpid()
    lease.release(ckpt, mine)
    assert not (ckpt / lease.LEASE_FILE).exists()


def test_status_reports_a_cancelled_task_as_failed_with_its_slurm_state(tmp_path, slurm_cluster, mlflow_server):
    work = tmp_path / "work"
    args = _sweep_args(mlflow_server.uri, "status-failed", "stfail", "fold=0", "train.max_iters=2000",
                       "train.checkpoint_every=1000", "hydra.launcher.wait=false")
    res = _sweep(work, args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (task, _), = _tasks(slurm_cluster, "stfail")
    slurm_cluster.submitted.append(task.split("_")[0])
    slurm_cluster.wait_running(task, timeout=120)
    slurm_cluster.run("scancel", task)
    slurm_cluster.wait_state(task, "CANCELLED", timeout=60)
    st = _status(work, *args, "--no-parents")
    assert st.returncode == 1, st.stdout + st.stderr
    assert "status: failed" in st.stdout
    line = next(line for line in st.stdout.splitlines() if line.strip().startswith("FAILED"))
    # submitit queues a sweep of one run as a plain job: task 0 of its own id in the record
    assert "c32-d1-is384-fold0" in line and f"task {task.split('_')[0]}_0 CANCELLED" in line, st.stdout
