"""The local single-node SLURM cluster of slurm/ (real daemons, no mocks): GPUs, accounting, arrays,
requeue and partition limits behave as the sweep launcher (hydra-submitit) needs them to."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.slurm_fixture import SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)


@pytest.fixture(autouse=True)
def _cancel_jobs_of_each_test(slurm_cluster: SlurmCluster):
    """Every test leaves the node empty for the next one."""
    yield
    slurm_cluster.cancel_submitted()


def test_cluster_is_up(slurm_cluster: SlurmCluster):
    p = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N|%P|%T|%c|%G|%l")
    node, partition, state, cpus, gres, limit = p.stdout.split("\n")[0].split("|")
    assert (node, partition.rstrip("*"), cpus, limit) == (slurm_cluster.node, "gpu", "8", "2:00:00")
    assert state in {"idle", "mixed", "allocated", "completing"}
    assert gres.startswith("gpu:v100:8")
    assert slurm_cluster.conf == slurm_cluster.state_dir / "slurm.conf"


def test_gpu_job_sees_four_gpus(slurm_cluster: SlurmCluster):
    out = slurm_cluster.out_dir / "gpus.out"
    job = slurm_cluster.sbatch("--gres=gpu:4", "--cpus-per-task=1", "--time=1", output=out, name="gpus",
                               wrap='echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; echo "job=$SLURM_JOB_ID"')
    state, exit_code = slurm_cluster.wait_state(job, "COMPLETED", timeout=30)
    assert exit_code == "0:0"
    lines = out.read_text().splitlines()
    assert lines[1] == f"job={job}"
    devices = lines[0].split("=", 1)[1].split(",")
    assert len(devices) == 4 and len(set(devices)) == 4, lines
    assert all(d.isdigit() for d in devices), lines


def test_two_four_gpu_jobs_run_at_the_same_time(slurm_cluster: SlurmCluster):
    jobs = [slurm_cluster.sbatch("--gres=gpu:4", "--cpus-per-task=1", "--time=1", name=f"pair{i}", wrap="sleep 60")
            for i in range(2)]

    def both_running():
        states = slurm_cluster.squeue_states(",".join(jobs))
        return all(states.get(j) == "RUNNING" for j in jobs)

    slurm_cluster.wait_for("both 4-GPU jobs RUNNING together", both_running, timeout=20)
    # and they got disjoint GPUs
    gres = [slurm_cluster.run("scontrol", "-d", "show", "job", j).stdout for j in jobs]
    idx = [line.split("IDX:")[1].rstrip(")") for g in gres for line in g.split() if "IDX:" in line]
    assert sorted(idx) == ["0-3", "4-7"], idx


def test_sacct_reports_cancelled_and_failed_jobs(slurm_cluster: SlurmCluster):
    sleeper = slurm_cluster.sbatch("--time=1", name="cancelme", wrap="sleep 120")
    failing = slurm_cluster.sbatch("--time=1", name="fail", wrap="echo failing; exit 3")
    slurm_cluster.wait_running(sleeper, timeout=20)
    t0 = time.monotonic()
    slurm_cluster.cancel(sleeper)
    state, _ = slurm_cluster.wait_state(sleeper, "CANCELLED", timeout=20)
    assert time.monotonic() - t0 < 20
    state, exit_code = slurm_cluster.wait_state(failing, "FAILED", timeout=20)
    assert exit_code == "3:0"


def test_job_array_respects_its_parallelism_limit(slurm_cluster: SlurmCluster):
    array = slurm_cluster.sbatch("--array=0-5%2", "--time=1", name="array", wrap="sleep 2")
    max_running = 0
    deadline = time.monotonic() + 45
    while True:
        states = slurm_cluster.squeue_states(array)
        running = sum(s == "RUNNING" for s in states.values())
        max_running = max(max_running, running)
        assert running <= 2, states
        if not states:
            break
        assert time.monotonic() < deadline, f"array not done after 45 s: {states}\n{slurm_cluster.diagnostics()}"
        time.sleep(0.2)
    assert max_running == 2

    def all_tasks_accounted():
        tasks = {k: v for k, v in slurm_cluster.sacct(array).items() if "." not in k}  # no .batch/.extern steps
        return tasks if len(tasks) == 6 and all(state != "RUNNING" for state, _ in tasks.values()) else None

    tasks = slurm_cluster.wait_for("all 6 array tasks ended in sacct", all_tasks_accounted, timeout=20)
    assert sorted(tasks) == [f"{array}_{i}" for i in range(6)]
    assert all(state == "COMPLETED" for state, _ in tasks.values()), tasks


def test_requeued_job_runs_again(slurm_cluster: SlurmCluster):
    job = slurm_cluster.sbatch("--requeue", "--time=1", name="requeue", wrap="sleep 120")
    slurm_cluster.wait_running(job, timeout=20)
    slurm_cluster.run("scontrol", "requeue", job)

    def running_again():
        info = slurm_cluster.show_job(job)
        return info if info.get("JobState") == "RUNNING" and int(info.get("Restarts", "0")) >= 1 else None

    info = slurm_cluster.wait_for(f"requeued job {job} RUNNING again", running_again, timeout=30)
    assert int(info["Restarts"]) >= 1


def test_time_above_partition_limit_is_rejected_at_submission(slurm_cluster: SlurmCluster):
    t0 = time.monotonic()
    p = slurm_cluster.run("sbatch", "--parsable", "--time=3:00:00", f"--output={slurm_cluster.out_dir}/never.out",
                          "--job-name=su-test-toolong", "--wrap", "true", check=False)
    assert p.returncode != 0, p.stdout
    assert "time limit" in p.stderr.lower(), p.stderr
    assert time.monotonic() - t0 < 10
    assert not p.stdout.strip()


def test_where_the_cluster_is_required_a_slurm_test_that_cannot_run_fails_instead_of_skipping(tmp_path):
    """Issue 29, item 7: `make test` (CI) sets SCALING_UNET_REQUIRE_SLURM=1 after starting the cluster."""
    import subprocess
    import sys

    (tmp_path / "test_needs_slurm.py").write_text(
        "import os, sys\nsys.path.insert(0, {repo!r})\nos.geteuid = lambda: 1000  # as a user without root\n"
        "from tests.slurm_fixture import slurm_cluster  # noqa: F401\n\n"
        "def test_x(slurm_cluster):\n    pass\n".format(repo=str(Path(__file__).resolve().parents[1])))
    env = {k: v for k, v in os.environ.items() if k != "SCALING_UNET_REQUIRE_SLURM"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_needs_slurm.py")]
    skipped = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout[-2000:]
    required = subprocess.run(cmd, cwd=tmp_path, env={**env, "SCALING_UNET_REQUIRE_SLURM": "1"}, capture_output=True,
                              text=True)
    assert required.returncode != 0 and "1 error" in required.stdout and "needs root" in required.stdout, \
        required.stdout[-2000:]
