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
        # Another process of the same attempt of that job (a pool worker of the same allocation, on another node):
        # a live rival, not us (before 2026-12-06 the job id alone made it "an earlier attempt" and took it over).
        sibling = {"host": "node-c", "pid": 8, "slurm_job_id": live, "slurm_restart": 0, "token": "sibling"}
        with pytest.raises(locks.LockTimeout, match="another process of this SLURM job on another node"):
            locks.acquire(path, timeout_s=1, poll_s=0.2, me=sibling)
        # The same job after a requeue (SLURM_RESTART_COUNT 1, new pid, maybe another node): its earlier attempt.
        me = {"host": "node-c", "pid": 8, "slurm_job_id": live, "slurm_restart": 1, "token": "new"}
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


def _threaded_contender(path: Path, name: str, results: dict, timeout_s: float):
    me = {"host": os.uname().nodename, "pid": os.getpid(), "since": time.time(), "token": name}
    try:
        results[name] = locks.acquire(path, timeout_s=timeout_s, poll_s=0.01, me=me)
    except locks.LockTimeout as exc:
        results[name] = exc


def test_a_waiter_paused_between_reading_a_stale_lock_and_taking_it_over_never_removes_a_live_one(tmp_path,
                                                                                                monkeypatch):
    """Issue 29, item 1, forced: B reads the dead holder and stops; A takes the lock over and holds it; B goes on;
    C arrives. Before, B renamed A's live lock aside, C acquired in the gap, B's put-back failed and A's file was
    deleted: A and C both held it. Now B's claim finds A's lock, not the dead one, and leaves it."""
    import threading

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "token": "dead"}))
    b_read, b_go = threading.Event(), threading.Event()
    results: dict = {}
    c = threading.Thread(target=_threaded_contender, args=(path, "C", results, 1.0), name="C")

    def hook(step):
        if threading.current_thread().name != "B":
            return
        if step == "read" and not b_read.is_set():
            b_read.set()
            b_go.wait(10)
        elif step == "claimed" and not c.is_alive() and "C" not in results:  # B is about to remove what it took:
            c.start()  # C tries in that gap (where the old rename-aside left the path free)
            c.join(20)

    monkeypatch.setattr(locks, "TAKEOVER_HOOK", hook)
    b = threading.Thread(target=_threaded_contender, args=(path, "B", results, 1.0), name="B")
    b.start()
    assert b_read.wait(10)  # B has read the dead holder, its take-over not begun
    _threaded_contender(path, "A", results, 5.0)
    assert results["A"]["token"] == "A" and locks.read_holder(path)["token"] == "A"
    b_go.set()
    b.join(20)
    if "C" not in results:  # B never got to a second step: C comes now
        c.start()
        c.join(20)
    assert isinstance(results["B"], locks.LockTimeout) and isinstance(results["C"], locks.LockTimeout)
    assert locks.read_holder(path)["token"] == "A"  # A's lock was never moved or removed
    assert not list(tmp_path.glob(".x.lock.takeover.*"))  # no claim left behind


def test_while_one_waiter_claims_a_stale_lock_the_others_wait_and_exactly_one_gets_it(tmp_path, monkeypatch):
    import threading

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "token": "dead"}))
    claimed, go = threading.Event(), threading.Event()

    def hook(step):
        if threading.current_thread().name == "B" and step == "claimed" and not claimed.is_set():
            claimed.set()
            go.wait(10)

    monkeypatch.setattr(locks, "TAKEOVER_HOOK", hook)
    results: dict = {}
    threads = [threading.Thread(target=_threaded_contender, args=(path, n, results, 2.0), name=n) for n in "BAC"]
    threads[0].start()
    assert claimed.wait(10)  # B holds the claim on the dead lock and stops before removing it
    for t in threads[1:]:
        t.start()
    time.sleep(0.3)
    assert locks.read_holder(path)["token"] == "dead" and not results  # A and C wait: B's claim is in progress
    go.set()
    for t in threads:
        t.join(20)
    winners = [n for n, r in results.items() if isinstance(r, dict)]
    assert len(winners) == 1 and locks.read_holder(path)["token"] == winners[0]
    assert all(isinstance(r, locks.LockTimeout) for n, r in results.items() if n != winners[0])


def test_a_claim_left_by_a_waiter_that_died_mid_take_over_expires(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "token": "dead"}))
    os.link(path, tmp_path / ".x.lock.takeover.dead")  # the claim of a waiter killed between its two steps
    monkeypatch.setattr(locks, "CLAIM_STALE_S", 0.5)
    t0 = time.monotonic()
    assert locks.acquire(path, timeout_s=5, poll_s=0.05)["pid"] == os.getpid()
    assert 0.5 <= time.monotonic() - t0 < 5


def test_pool_workers_of_one_allocation_are_rivals_and_a_requeued_attempt_takes_its_own_back(tmp_path, monkeypatch):
    """Issue 29, item 2: a holder is the job AND its attempt and process, not the job id alone."""
    from sweep.slurm import holders, lease, queue as slurm_state

    monkeypatch.setattr(slurm_state, "is_alive", lambda job_id: (True, "RUNNING"))  # SLURM: the job runs (ours)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a sibling pool worker
    try:
        sibling = {"host": os.uname().nodename, "pid": worker.pid, "slurm_job_id": "700", "slurm_restart": 0}
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / lease.LEASE_FILE).write_text(json.dumps(sibling))
        monkeypatch.setenv("SLURM_JOB_ID", "700")
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
        monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
        assert holders.relation(sibling, holders.process_record()) == "sibling"
        with pytest.raises(lease.LeaseHeld, match="already trained by SLURM job 700, process running"):
            lease.acquire(tmp_path / "run", "c2-d1-is64-fold0")
        path = tmp_path / "x.lock"
        path.write_text(json.dumps({**sibling, "token": "w"}))
        with pytest.raises(locks.LockTimeout, match="process running"):
            locks.acquire(path, timeout_s=0.5, poll_s=0.05)
        # The same job requeued: its lease and lock from before the requeue are its own, however alive SLURM says.
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        assert holders.relation(sibling, holders.process_record()) == "earlier_attempt"
        assert lease.acquire(tmp_path / "run", "c2-d1-is64-fold0")["slurm_restart"] == 1
        assert locks.acquire(path, timeout_s=2, poll_s=0.05)["pid"] == os.getpid()
    finally:
        worker.kill()
        worker.wait()
    # A sibling whose process is gone is taken over like any dead holder.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    gone = {"host": os.uname().nodename, "pid": worker.pid, "slurm_job_id": "700", "slurm_restart": 0}
    (tmp_path / "run" / lease.LEASE_FILE).write_text(json.dumps(gone))
    assert lease.acquire(tmp_path / "run", "c2-d1-is64-fold0")["pid"] == os.getpid()


def test_an_optuna_slot_never_resumes_a_sibling_workers_running_trial(tmp_path, monkeypatch):
    from sweep.orchestration import trials
    from sweep.slurm import queue as slurm_state

    monkeypatch.setattr(slurm_state, "is_alive", lambda job_id: (True, "RUNNING"))
    spec = trials.StudySpec(study_name="s", storage=f"journal:{tmp_path}/s.journal", directions=["maximize"],
                            n_trials=4, n_slots=2, distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                            fixed_params={}, sampler=None, folder=str(tmp_path / "s"), poll_interval_s=0.1,
                            lease_wait_s=0.5)
    study = optuna.create_study(study_name="s", storage=trials.open_storage(spec.storage), direction="maximize")
    (tmp_path / "s").mkdir()
    a = {"host": os.uname().nodename, "pid": os.getpid(), "slurm_job_id": "800", "slurm_restart": 0}
    first = trials.claim(study, spec, a)
    assert first.how == "new"
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        b = {**a, "pid": worker.pid}  # another worker of the same allocation
        second = trials.claim(study, spec, b)
        assert second.how == "new" and second.number != first.number  # not a "resumed" copy of a's trial
        requeued = {**a, "pid": worker.pid, "slurm_restart": 1}  # a's job after a requeue takes a's trial back
        again = trials.claim(study, spec, requeued)
        assert again.how == "resumed" and again.number == first.number
    finally:
        worker.kill()
        worker.wait()
