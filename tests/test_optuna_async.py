"""Asynchronous Optuna (sweep.trials, hydra/sweeper=optuna_async): the slot-time arithmetic, claims on a real
journal study from several processes, and a sweep on the real local SLURM cluster with a preempted worker."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from sweep.orchestration.trials import StudySpec, claim, idle_share, read_timelines, trial_intervals
from tests.slurm_fixture import checkpoint_at, slurm_cluster  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def test_idle_share_of_a_barrier_and_of_back_to_back_slots():
    back_to_back = [(0, 10), (0, 4), (4, 10)]  # slot B runs a second trial as soon as its first ends
    assert idle_share(back_to_back, 2)["idle"] == pytest.approx(0.0)
    # Batches of 2: the short trial's slot waits for the long one twice.
    batches = [(0, 10), (0, 2), (10, 12), (10, 20)]
    res = idle_share(batches, 2)
    assert res["busy_s"] == 24 and res["window_s"] == 20
    assert res["idle"] == pytest.approx(1 - 24 / 40)
    assert res["tail"] == pytest.approx((2 * 10 - 12) / 40)  # after t=10 nothing was left to start


def test_trial_intervals_drop_the_preempted_attempt():
    events = [{"t": 0, "slot": 0, "event": "start"}, {"t": 5, "slot": 0, "event": "preempted"},
              {"t": 9, "slot": 0, "event": "start"}, {"t": 12, "slot": 0, "event": "end"},
              {"t": 1, "slot": 1, "event": "start"}, {"t": 3, "slot": 1, "event": "end"}]
    assert sorted(trial_intervals(events)) == [(1, 3), (9, 12)]


def _spec(tmp: Path, n_trials: int) -> StudySpec:
    return StudySpec(study_name="s", storage=f"journal:{tmp}/s.journal", directions=["maximize"], n_trials=n_trials,
                     n_slots=4, distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                     fixed_params={"fold": 0}, sampler=None, folder=str(tmp / "s"))


def _claim_all(tmp: str, n_trials: int) -> list[int]:
    from sweep.slurm.lease import my_lease
    from sweep.orchestration.trials import open_storage

    spec = _spec(Path(tmp), n_trials)
    study = optuna.load_study(study_name="s", storage=open_storage(spec.storage))
    got = []
    while (c := claim(study, spec, my_lease())) is not None:
        got.append(c.number)
        study.tell(c.number, [c.params["x"]])
    return got


def test_claims_from_four_processes_never_exceed_n_trials(tmp_path):
    from sweep.orchestration.trials import open_storage

    optuna.create_study(study_name="s", storage=open_storage(f"journal:{tmp_path}/s.journal"), direction="maximize")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        per_process = pool.starmap(_claim_all, [(str(tmp_path), 9)] * 4)
    numbers = sorted(n for got in per_process for n in got)
    assert numbers == list(range(9))
    study = optuna.load_study(study_name="s", storage=open_storage(f"journal:{tmp_path}/s.journal"))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 9


def test_a_worker_resumes_its_own_trial_and_adopts_a_dead_workers_trial(tmp_path):
    from sweep.orchestration.trials import TRIAL_WORKER_ATTR, open_storage

    spec = _spec(tmp_path, 3)
    study = optuna.create_study(study_name="s", storage=open_storage(spec.storage), direction="maximize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask(spec.distributions)
    orphan.set_user_attr(TRIAL_WORKER_ATTR, json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    live = study.ask(spec.distributions)  # another live process holds this one
    live.set_user_attr(TRIAL_WORKER_ATTR, json.dumps({"host": os.uname().nodename, "pid": os.getppid()}))
    me = {"slurm_job_id": "4242", "slurm_restart": 1, "host": "node7", "pid": 1}
    mine = study.ask(spec.distributions)
    # Before my requeue: the same job, its first attempt (SLURM_RESTART_COUNT unset), another pid.
    mine.set_user_attr(TRIAL_WORKER_ATTR, json.dumps({**me, "pid": 99, "slurm_restart": 0}))
    first = claim(study, spec, me)
    assert (first.number, first.how) == (mine.number, "resumed")
    study.tell(first.number, [0.5])
    second = claim(study, spec, me)
    assert (second.number, second.how) == (orphan.number, "adopted")
    assert second.params == orphan.params
    study.tell(second.number, [0.6])  # job 4242 is not in SLURM: ended, or its trial would be adoptable again
    assert claim(study, spec, {"host": "other", "pid": 5}) is None  # 3 trials exist; the live one is not taken


# ----------------------------------------------------------------------------- the sweep on SLURM

TINY = ["model.width=32", "model.depth=1", "model.input_size=384", "data.synth.size=32", "data.synth.n_train=4",
        "data.synth.n_test=1", "train.batch_size=2", "train.val_crop=32", "train.val_slice_step=8",
        "train.final_slice_step=8", "train.open_slabs=2", "train.early_stop_patience_iters=100000"]
# The test cluster's 4 fake V100s train the laptop profile on synthetic data: a stand-in, allowed explicitly.
# The slots are the subject here, not multi-replica training (test_sweep_slurm.py's compound test, test_distributed):
# one replica, ~10 CPU-s less per job than 4 logical CPU devices; each job still asks SLURM for 4 GPUs.
STAND_IN = ["allow_stand_in=true", "train.cpu_replicas=1", "train.batch_size=4"]


def test_async_optuna_on_slurm_one_array_of_slots_a_preempted_worker_resumes_its_trial(
        tmp_path, slurm_cluster, mlflow_server):
    work = tmp_path / "work"
    work.mkdir()
    log = tmp_path / "sweep.log"
    # Single objective with a pruner that reports and judges at every checkpoint but cannot stop 3 trials (median of
    # at least 4 finished ones): the preempted trial's requeued job must judge it again without a second report.
    cmd = [sys.executable, "-m", "sweep", "+experiment=optuna_asha", "hydra/sweeper/pruner=median",
           "hydra.sweeper.pruner.n_startup_trials=4", "hydra/launcher=slurm_v100", *TINY, *STAND_IN,
           "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
           "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=20", "hydra.launcher.poll_interval_s=1",
           "hydra.launcher.name=su-test-optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2",
           "train.max_iters=300", "train.checkpoint_every=100",
           f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=slurm-optuna", "-m"]
    env = dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3", MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        state = slurm_cluster.wait_for("a first checkpoint", checkpoint_at(work, 100), timeout=240, interval=0.5)
        lease = json.loads((state.parent / "lease.json").read_text())
        victim = lease["slurm_task"]  # array_task: the numeric id of one task can be the whole array's id
        slurm_cluster.run("scancel", "--signal=USR2", victim)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "started 2 worker slots as ONE SLURM job array" in out and "Best value" in out
    folder = work / "optuna" / "scaling-unet-asha-laptop"
    rec = json.loads((folder / "study.json").read_text())
    (array_id,) = rec["array_ids"]
    tasks = slurm_cluster.run("sacct", "-j", array_id, "-X", "-n", "-P", "--format=JobID,State,AllocTRES%60").stdout
    rows = [r.split("|") for r in tasks.splitlines() if r.strip()]
    assert {r[0] for r in rows} == {f"{array_id}_0", f"{array_id}_1"}, tasks
    assert all("gres/gpu=4" in r[2] for r in rows), tasks
    # Exactly n_trials trials, all COMPLETE, one FINISHED MLflow run each; the preempted one resumed.
    from sweep.orchestration.trials import open_storage

    study = optuna.load_study(study_name="scaling-unet-asha-laptop", storage=open_storage(rec["storage"]))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [sorted(t.intermediate_values) for t in study.trials] == [[100, 200, 300]] * 3  # every checkpoint, once
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("slurm-optuna")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "fold" in r.data.tags]
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    # Each run names its trial (MLflow tags); the trial link is not a parameter and not part of the config key.
    assert sorted(int(r.data.tags["optuna_trial"]) for r in runs) == [0, 1, 2]
    assert {r.data.tags["optuna_study"] for r in runs} == {"scaling-unet-asha-laptop"}
    assert not any(k.startswith("optuna_trial") for r in runs for k in r.data.params)
    assert sum("resumed_from_iteration" in r.data.tags for r in runs) == 1
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*_log.*"))
    assert "the resumed trial is judged again at iteration" in logs
    assert "is already reported" not in logs  # Optuna's warning for a step reported twice
    events = read_timelines(folder)
    pre = [e for e in events if e["event"] == "preempted"]
    assert len(pre) == 1
    after = [e for e in events if e["slot"] == pre[0]["slot"] and e["t"] > pre[0]["t"] and e["event"] == "start"]
    assert after and after[0]["how"] == "resumed"
    assert "idle slot-time:" in out
