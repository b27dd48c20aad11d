"""Locks that hold across nodes (sweep.slurm.locks): lock files created with os.link that name their holder, with stale
holders found through SLURM or their pid. ``fcntl.flock`` is disabled in the contending processes, as on a Lustre
mount with localflock, so flock cannot be what excludes."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from sweep.slurm import locks
from tests.slurm_fixture import slurm_cluster  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

NO_FLOCK = "import fcntl; fcntl.flock = lambda *a, **k: None; fcntl.lockf = lambda *a, **k: None\n"
CONTEND = NO_FLOCK + """
import os, sys, time
sys.path.insert(0, {repo!r})
from sweep.slurm import locks
lock, log, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(rounds):
    with locks.locked(lock, timeout_s=60, poll_s=0.001):
        with open(log, "a") as fh:
            fh.write(f"enter {{os.getpid()}}\\n")
        time.sleep(0.002)
        with open(log, "a") as fh:
            fh.write(f"exit {{os.getpid()}}\\n")
"""


def _contenders(tmp_path: Path, n: int, rounds: int) -> list[str]:
    script = tmp_path / "contend.py"
    script.write_text(CONTEND.format(repo=str(REPO)))
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "x.lock"), str(log), str(rounds)])
             for _ in range(n)]
    assert [p.wait(timeout=120) for p in procs] == [0] * n
    return log.read_text().split("\n")[:-1]


def _assert_exclusive(lines: list[str], n: int, rounds: int) -> None:
    assert len(lines) == 2 * n * rounds
    for enter, exit_ in zip(lines[::2], lines[1::2]):  # never two holders: every enter is followed by its exit
        assert enter.startswith("enter ") and exit_ == "exit " + enter.split()[1], (enter, exit_)


def test_two_processes_without_flock_never_hold_the_lock_together(tmp_path):
    _assert_exclusive(_contenders(tmp_path, 2, 150), 2, 150)
    assert not (tmp_path / "x.lock").exists() and not list(tmp_path.glob(".x.lock*"))  # nothing left behind


def test_four_waiters_on_a_stale_lock_take_it_over_one_at_a_time(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "x.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "token": "old"}))
    _assert_exclusive(_contenders(tmp_path, 4, 20), 4, 20)


def _lease_round(args: tuple[str, str, int]) -> list[bool]:
    """One contender of the lease: its own SLURM job id, SLURM says every job is alive; flock disabled."""
    import fcntl

    fcntl.flock = lambda *a, **k: None  # node-local flock: it excludes nothing between "nodes"
    folder, job, rounds = args
    os.environ["SLURM_JOB_ID"] = job
    from sweep.slurm import lease, queue as slurm_state

    slurm_state.is_alive = lambda job_id: (True, "RUNNING")
    won = []
    for r in range(rounds):
        try:
            lease.acquire(Path(folder) / f"r{r}", f"run{r}")
            won.append(True)
        except lease.LeaseHeld:
            won.append(False)
    return won


def test_the_lease_excludes_across_nodes_without_flock(tmp_path):
    rounds = 60
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        a, b = pool.map(_lease_round, [(str(tmp_path), "1001", rounds), (str(tmp_path), "1002", rounds)])
    assert all(x != y for x, y in zip(a, b)), "exactly one job holds each lease"
    holders = {json.loads((tmp_path / f"r{r}" / "lease.json").read_text())["slurm_job_id"] for r in range(rounds)}
    assert holders <= {"1001", "1002"}


def test_a_lock_of_a_dead_pid_is_taken_over_and_a_corrupt_one_after_a_while(tmp_path, monkeypatch, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "token": "old"}))
    mine = locks.acquire(path, timeout_s=5)
    assert locks.read_holder(path)["token"] == mine["token"] and "taking over" in caplog.text
    locks.release(path, {"token": "someone else"})  # not ours to remove
    assert path.exists()
    locks.release(path, mine)
    assert not path.exists()
    path.write_text("{not json")
    monkeypatch.setattr(locks, "UNREADABLE_S", 0.3)
    locks.acquire(path, timeout_s=5, poll_s=0.05)
    assert locks.read_holder(path)["pid"] == os.getpid()


def test_a_live_holder_is_waited_for_a_bounded_time_and_named(tmp_path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path.write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "token": "t"}))
        t0 = time.monotonic()
        with pytest.raises(locks.LockTimeout, match=rf"x\.lock is held by process {holder.pid} on .* for more than"):
            locks.acquire(path, timeout_s=1, poll_s=0.05)
        assert 1 <= time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait()


def test_a_requeued_job_retakes_its_own_lock_and_slurm_decides_for_other_jobs(tmp_path, slurm_cluster):
    done = slurm_cluster.sbatch("--time=1", wrap="true", name="lock-done")
    slurm_cluster.wait_state(done, "COMPLETED")
    live = slurm_cluster.sbatch("--time=2", wrap="sleep 60", name="lock-live")
    try:
        slurm_cluster.wait_state(live, "RUNNING")
        path = tmp_path / "x.lock"
        path.write_text(json.dumps({"host": "node-b", "pid": 7, "slurm_job_id": live, "token": "t"}))
        with pytest.raises(locks.LockTimeout, match=f"SLURM job {live}"):
            locks.acquire(path, timeout_s=1, poll_s=0.2)
        # The same job after a requeue (new pid, maybe another node): its earlier attempt, not a live rival.
        me = {"host": "node-c", "pid": 8, "slurm_job_id": live, "token": "new"}
        assert locks.acquire(path, timeout_s=5, me=me)["token"] == "new"
        path.write_text(json.dumps({"host": "node-b", "pid": 7, "slurm_job_id": done, "token": "t"}))
        assert locks.acquire(path, timeout_s=5)["pid"] == os.getpid()  # SLURM says the holder is gone
    finally:
        slurm_cluster.run("scancel", live, check=False)


def test_an_optuna_slot_gives_up_a_duplicate_after_lease_wait_s_and_shows_the_wait(tmp_path, capsys):
    from hydra.core.utils import JobReturn, JobStatus

    from sweep.orchestration import trials
    from sweep.slurm.lease import LeaseHeld

    spec = trials.StudySpec(study_name="s", storage=f"journal:{tmp_path}/s.journal", directions=["maximize"],
                            n_trials=2, n_slots=1, distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                            fixed_params={"fold": 0}, sampler=None, folder=str(tmp_path / "s"),
                            poll_interval_s=0.1, lease_wait_s=0.5)
    optuna.create_study(study_name="s", storage=trials.open_storage(spec.storage), direction="maximize")
    trials.write_record(spec)
    runs = []

    class Worker(trials.TrialWorker):
        def __init__(self):
            self.spec, self.base_overrides = spec, []

        def _run_job(self, number, overrides):
            runs.append(number)
            ret = JobReturn()
            if number == 0:  # the first trial's params train in another slot, whose job lives on
                ret.status, ret._return_value = JobStatus.FAILED, LeaseHeld("c2-d1-is64-fold0: already trained by "
                                                                            "SLURM job 77, RUNNING")
            else:
                ret.status, ret._return_value = JobStatus.COMPLETED, 0.5
            return ret

    t0 = time.monotonic()
    assert Worker()(0) == {"slot": 0, "complete": 1, "fail": 0, "pruned": 0, "given_up": 1}
    assert 0.5 <= time.monotonic() - t0 < 10 and runs.count(0) >= 3 and runs[-1] == 1
    study = optuna.load_study(study_name="s", storage=trials.open_storage(spec.storage))
    assert [t.state.name for t in study.trials] == ["PRUNED", "COMPLETE"]
    assert study.trials[0].user_attrs["given_up"].startswith("duplicate of a trial another slot trains")
    events = trials.read_timelines(spec.path)
    (gave_up,) = [e for e in events if e["event"] == "end" and e["state"] == "PRUNED"]
    assert gave_up["error"].startswith("duplicate of a trial another slot trains; waited") and \
        "(lease_wait_s): c2-d1-is64-fold0: already trained by SLURM job 77" in gave_up["error"]
    # While a slot waits, sweep.trials says so.
    waiting = [*events[:-2], {"t": max(e["t"] for e in events) + 0.001, "slot": 0, "event": "lease_wait", "trial": 3,
                              "holder": "already trained by SLURM job 77"}]
    (line,) = trials.lease_waits(waiting)
    assert line.startswith("slot 0: trial 3 waits since") and "on a lease: already trained by SLURM job 77" in line
    assert trials.lease_waits(events) == []
