"""What a run used (sweep.tracking.cost): only the job's own GPUs count on a shared node, and a requeued run keeps the
time its preempted attempt ran up to the signal and logs its system metrics at steps after the earlier attempt's."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweep.core import trial_report
from sweep.tracking import cost
from sweep.tracking.cost import SystemMetrics, job_gpus, visible_gpus

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.width=32", "model.depth=1", "model.input_size=384", "data.synth.size=32", "data.synth.n_train=4",
        "data.synth.n_test=1", "train.batch_size=2", "train.val_crop=32", "train.val_slice_step=8",
        "train.final_slice_step=8", "train.open_slabs=2", "train.early_stop_patience_iters=100000"]
# A node's four GPUs as NVML lists them (index, UUID); GPU 3 carries a MIG device.
NODE = [(0, "GPU-aaaa-0000"), (1, "GPU-bbbb-1111"), (2, "GPU-cccc-2222"), (3, "GPU-dddd-3333"), (3, "MIG-eeee-4444")]


def _sample() -> dict[str, float]:
    """One sample of MLflow's monitors on that node: GPU i at 10·(i+1) % and 100·(i+1) W."""
    out = {"cpu_utilization_percentage": 50.0, "system_memory_usage_megabytes": 1000.0}
    for i in range(4):
        out.update({f"gpu_{i}_utilization_percentage": 10.0 * (i + 1), f"gpu_{i}_power_usage_watts": 100.0 * (i + 1),
                    f"gpu_{i}_memory_usage_megabytes": 500.0})
    return out


@pytest.mark.parametrize(("env", "mine"), [
    ({}, None),  # not restricted: every GPU NVML sees
    ({"CUDA_VISIBLE_DEVICES": "1,3"}, {1, 3}),
    ({"CUDA_VISIBLE_DEVICES": "GPU-dddd-3333,GPU-bbbb"}, {1, 3}),  # UUIDs, or a unique prefix as CUDA takes
    ({"CUDA_VISIBLE_DEVICES": "MIG-eeee-4444"}, {3}),  # a MIG slice: its GPU
    ({"CUDA_VISIBLE_DEVICES": "MIG-GPU-bbbb-1111/1/0"}, {1}),  # the pre-R470 MIG id names its GPU
    ({"CUDA_VISIBLE_DEVICES": "2", "SLURM_JOB_GPUS": "0"}, {2}),  # CUDA's own list first
    ({"SLURM_STEP_GPUS": "0", "SLURM_JOB_GPUS": "0,1"}, {0}),
    ({"SLURM_JOB_GPUS": "2"}, {2}),
    ({"CUDA_VISIBLE_DEVICES": ""}, set()),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, set()),
    ({"SLURM_JOB_GPUS": "NoDevFiles"}, set()),
    ({"CUDA_VISIBLE_DEVICES": "0,-1,2"}, {0}),  # CUDA ignores an invalid id and every id after it
])
def test_the_jobs_gpus_come_from_its_environment(env, mine):
    assert job_gpus(visible_gpus(env), NODE) == mine


def test_a_cgroup_that_renumbers_the_gpus_keeps_all_nvml_sees():
    # ConstrainDevices: NVML sees the job's two GPUs as 0 and 1; SLURM names them by their physical numbers.
    assert job_gpus(visible_gpus({"SLURM_JOB_GPUS": "5,6"}), [(0, "GPU-x"), (1, "GPU-y")]) is None


def test_only_the_jobs_gpus_are_logged_and_counted():
    usage = SystemMetrics(10.0, gpus={1, 3})
    usage.record(_sample(), 10.0)
    ((_, step, logged),) = usage.drain()
    gpu_keys = {k for k in logged if k.startswith("system/gpu_")}
    assert gpu_keys == {f"system/gpu_{i}_{what}" for i in (1, 3)
                        for what in ("utilization_percentage", "power_usage_watts", "memory_usage_megabytes")}
    assert logged["system/cpu_utilization_percentage"] == 50.0 and step == 0
    t = usage.totals()
    assert t["gpus"] == 2 and t["gpu_s"] == pytest.approx(20.0)
    assert t["gpu_busy_s"] == pytest.approx((0.2 + 0.4) * 10.0)  # GPUs 1 and 3 at 20 % and 40 % for 10 s
    assert t["energy_j"] == pytest.approx((200.0 + 400.0) * 10.0)


def test_the_environment_picks_the_gpus_when_sampling_starts(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-dddd-3333,1")
    monkeypatch.setattr(cost, "nvml_devices", lambda: NODE)  # NVML's list, as on a four-GPU node
    with SystemMetrics(60.0) as usage:
        assert usage.job_gpus == {1, 3}
        usage.record(_sample(), 1.0)
    assert usage.totals()["gpus"] == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a job given no GPU counts none
    with SystemMetrics(60.0) as usage:
        usage.record(_sample(), 1.0)
    assert usage.totals()["gpus"] == 0 and not any("gpu_" in k for _, _, v in usage.drain() for k in v)


def test_system_steps_continue_after_the_earlier_attempts():
    first = SystemMetrics(10.0)
    for _ in range(3):
        first.record({"cpu_utilization_percentage": 1.0}, 1.0)
    saved = json.loads(json.dumps(first.totals()))  # as usage.json keeps it
    second = SystemMetrics(10.0, prior=saved)
    second.record({"cpu_utilization_percentage": 2.0}, 1.0)
    assert [s for _, s, _ in first.drain()] == [0, 1, 2]
    assert [s for _, s, _ in second.drain()] == [3]
    assert second.totals()["system_step"] == 4


# ----------------------------------------------------------------------------- a preempted run, in the job


def _train_cfg(work: Path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"paths.work={work}", "train.max_iters=8", "train.checkpoint_every=4",
                                            "mlflow.system_metrics_interval_s=0.2"])


def test_a_preempted_run_keeps_its_time_up_to_the_signal_and_continues_its_system_steps(tmp_path, monkeypatch):
    """The job is preempted 1.5 s after its first chunk end (submitit's USR2 hook, then SystemExit); the requeued
    attempt adds to what usage.json says at the signal, and logs its samples at steps after the first attempt's."""
    from sweep.jobs.train import checkpoint_before_requeue, run

    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    cfg = _train_cfg(work)
    seen: dict[str, dict] = {}

    def preempted_later(value: float, iteration: int) -> bool:
        usage = next((work / "checkpoints").glob("*/fold0/usage.json"))
        seen["chunk"] = json.loads(usage.read_text())  # written at this chunk end
        t0, c0 = time.monotonic(), time.process_time()
        # the job keeps working after the chunk end: 1.5 s and 0.6 CPU-seconds at least, however loaded the machine
        while time.monotonic() - t0 < 1.5 or time.process_time() - c0 < 0.6:
            pass
        checkpoint_before_requeue("the test's run")
        seen["signal"] = json.loads(usage.read_text())
        raise SystemExit(-1)  # submitit's requeue after USR2

    with trial_report.reporting(preempted_later), pytest.raises(SystemExit):
        run(cfg)
    assert seen["signal"]["wall_s"] >= seen["chunk"]["wall_s"] + 1.5
    assert seen["signal"]["cpu_core_s"] >= seen["chunk"]["cpu_core_s"] + 0.5
    assert seen["signal"]["system_step"] >= 1  # the first attempt sampled

    run(cfg)
    client = MlflowClient(str(cfg.mlflow.tracking_uri))
    (r,) = client.search_runs([client.get_experiment_by_name("scaling-unet").experiment_id])
    assert r.info.status == "FINISHED" and r.data.tags["resumed_from_iteration"] == "4"
    assert r.data.metrics["system_metrics_wall_s"] > seen["signal"]["wall_s"]  # both attempts, the first to its signal
    assert r.data.metrics["cpu_core_hours_used"] * 3600 > seen["signal"]["cpu_core_s"]
    steps = [m.step for m in client.get_metric_history(r.info.run_id, "system/cpu_utilization_percentage")]
    first = [s for s in steps if s < seen["signal"]["system_step"]]
    assert first and len(steps) > len(first), steps  # both attempts logged samples ...
    assert len(steps) == len(set(steps)), steps  # ... never two at one step
