"""What a run used (sweep.tracking.cost): only the job's own GPUs count on a shared node, and a requeued run logs its
system metrics at steps after the earlier attempt's."""

from __future__ import annotations

import json

import pytest

from sweep.tracking import cost
from sweep.tracking.cost import SystemMetrics, job_gpus, visible_gpus

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

