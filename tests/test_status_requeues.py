"""sweep.status shows preemption: requeued pairs apart from RUNNING with their number of requeues, a pair that used up
max_num_timeout as such, and, with no SLURM to ask, UNKNOWN instead of FAILED. SLURM's answers are recorded squeue
and sacct output (the real cluster's requeue path is tested in tests/test_sweep_slurm.py); MLflow is a real store."""

from __future__ import annotations

import os
from pathlib import Path

from sweep.slurm import record as sweep_record
from sweep.slurm import queue as slurm_state
from sweep.orchestration import status
from sweep.tracking import client as tracking

SQUEUE = "500|1|501|RUNNING|500_1\n500|2|500|PENDING|500_2\n"
# -D: every attempt of a task; task 1 ran and was requeued twice, task 3 gave up after 3 requeues (limit 3).
SACCT = """500_0|COMPLETED|60|billing=1,cpu=1,gres/gpu=4|0:0
500_1|REQUEUED|30|billing=1,cpu=1,gres/gpu=4|0:0
500_1|PREEMPTED|30|billing=1,cpu=1,gres/gpu=4|0:0
500_1|RUNNING|10|billing=1,cpu=1,gres/gpu=4|0:0
500_3|PREEMPTED|30|billing=1,cpu=1,gres/gpu=4|0:0
500_3|PREEMPTED|30|billing=1,cpu=1,gres/gpu=4|0:0
500_3|PREEMPTED|30|billing=1,cpu=1,gres/gpu=4|0:0
500_3|TIMEOUT|30|billing=1,cpu=1,gres/gpu=4|0:0
"""


def _record(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "requeues")
    pairs = {f"k{i}/0": {"run_name": f"c{i}-d1-is64-fold0", "cost": 1.0, "config_key": f"k{i}", "fold": 0}
             for i in range(4)}
    sub = sweep_record.Submission("500", list(pairs), 10, str(tmp_path / "%j"), 0.0)
    rec = sweep_record.SweepRecord("sid", "requeues", exp, uri, 4, pairs, [sub], max_num_timeout=3)
    run = tracking.RunRecorder(uri, exp, run_name="c0-d1-is64-fold0", tags={"config_key": "k0", "fold": "0"})
    run.start()
    run.finish()
    return rec, uri


def test_requeued_pairs_are_counted_and_a_used_up_requeue_limit_is_named(tmp_path, monkeypatch):
    rec, uri = _record(tmp_path)
    monkeypatch.setattr(slurm_state, "_run", lambda cmd, timeout=30.0: SQUEUE if cmd[0] == "squeue" else SACCT)
    st = status.collect(rec, uri, build_parents=False)
    by = {p.run_name: p for p in st.pairs}
    assert by["c0-d1-is64-fold0"].state == "FINISHED"
    assert by["c1-d1-is64-fold0"].state == "REQUEUED"  # running again: apart from first attempts
    assert by["c1-d1-is64-fold0"].detail == "task 500_1 RUNNING, requeued 2 time(s)"
    assert by["c2-d1-is64-fold0"].state == "PENDING"
    assert by["c3-d1-is64-fold0"].state == "FAILED"
    assert "TIMEOUT exit 0:0 after 3 requeue(s): the requeue limit (max_num_timeout=3) is used up" in \
        by["c3-d1-is64-fold0"].detail
    text = status.render(st)
    assert "REQUEUED     c1-d1-is64-fold0: task 500_1 RUNNING, requeued 2 time(s)" in text
    assert st.counts()["RUNNING"] == 0 and st.exit_code == status.EXIT_RUNNING


def test_without_slurm_on_path_no_pair_is_called_failed(tmp_path, monkeypatch):
    rec, uri = _record(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no squeue, no sacct
    st = status.collect(rec, uri, build_parents=False)
    assert [p.state for p in st.pairs] == ["FINISHED", "UNKNOWN", "UNKNOWN", "UNKNOWN"]
    text = status.render(st)
    assert "SLURM could not be asked" in text and "FAILED     " not in text
    assert text.endswith("status: unknown (SLURM could not be asked; run again)")
    assert st.exit_code == status.EXIT_RUNNING
    assert os.environ["PATH"] == str(tmp_path / "empty")


def test_an_old_record_without_the_new_fields_still_loads():
    rec = sweep_record.SweepRecord.from_json('{"sweep_id": "s", "experiment": "e", "experiment_id": "1", '
                                             '"tracking_uri": "u", "num_folds": 4, "pairs": {}, "unknown_later": 1}')
    assert rec.max_num_timeout is None


def test_status_shows_allocated_and_used_gpu_hours_and_energy_per_config(tmp_path, monkeypatch):
    rec, uri = _record(tmp_path)
    exp = rec.experiment_id
    # k1's runs: an attempt on GPUs that reported utilisation and power (as sweep.tracking.cost logs them).
    run = tracking.RunRecorder(uri, exp, run_name="c1-d1-is64-fold0", tags={"config_key": "k1", "fold": "0"})
    run.start()
    run.log_metrics({"used_gpu_hours": 0.02, "gpu_energy_kwh": 0.006, "cpu_core_hours_used": 0.01})
    run.finish("KILLED")
    monkeypatch.setattr(slurm_state, "_run", lambda cmd, timeout=30.0: SQUEUE if cmd[0] == "squeue" else SACCT)
    st = status.collect(rec, uri, build_parents=False)
    # sacct: task 1 ran 30 + 30 + 10 s on 4 GPUs; task 0 60 s on 4 GPUs.
    assert st.cost["k1"].allocated_gpu_h == 280 / 3600 and st.cost["k1"].used_gpu_h == 0.02
    assert st.cost["k0"].allocated_gpu_h == 240 / 3600 and st.cost["k0"].used_gpu_h is None
    text = status.render(st)
    cost = text.split("CPU core-h\n", 1)[1].splitlines()  # the cost table, after the state table
    row = next(ln for ln in cost if ln.startswith("c1-d1-is64 k1")).split()
    assert row[2:] == ["0.08", "0.02", "26%", "0.006", "0.010"], text
    k0 = next(ln for ln in cost if ln.startswith("c0-d1-is64 k0")).split()
    assert k0[2:] == ["0.07", "-", "-", "-", "-"], text  # no GPU metrics: used is not guessed
    total = next(ln for ln in cost if ln.startswith("total")).split()
    assert total[1:3] == [f"{(240 + 280 + 480) / 3600:.2f}", "0.02"], text
