"""What a run used, not only what it was given: MLflow's system metrics, and the run's cost in core-, GPU-hours and kWh.

:class:`SystemMetrics` samples with MLflow's own monitors (``system/cpu_utilization_percentage``,
``system/system_memory_usage_megabytes``, ``system/gpu_<i>_utilization_percentage``, ``..._memory_usage_megabytes``,
``..._power_usage_watts``; psutil, and NVML through nvidia-ml-py where NVIDIA GPUs exist) in a thread, and keeps the
samples until the training thread hands them to the run's outbox (:meth:`SystemMetrics.drain`): so they carry their
own time stamps and wait out a server outage like every other metric (MLflow's monitor thread would log them
directly, and lose them while the server is away). It also integrates what the run used: GPU-seconds weighted by
utilisation, energy from the reported power, and this process's CPU time.

Only the job's own GPUs count (:func:`job_gpus`): NVML reports every GPU of the node, and on a shared node
(no ``ConstrainDevices``) the others belong to other jobs; their samples are dropped before they are logged.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import typing as tp

log = logging.getLogger(__name__)

PREFIX = "system/"
_GPU_KEY = re.compile(r"gpu_(\d+)_")  # GPUMonitor's keys: gpu_<NVML index>_<what>
_NO_GPU = ("", "-1", "NoDevFiles")  # CUDA_VISIBLE_DEVICES / SLURM's values for "no GPU"


def _monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    monitors: list = [CPUMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())  # raises where NVML finds no NVIDIA driver
    except Exception as exc:  # noqa: BLE001 - no GPU here: CPU and memory only
        log.debug("no GPU metrics: %s", exc)
    return monitors


def visible_gpus(env: tp.Mapping[str, str]) -> tp.Optional[list[str]]:
    """The GPU ids the job may use, as its environment names them (indices, ``GPU-``/``MIG-`` UUIDs):
    CUDA_VISIBLE_DEVICES, else SLURM's SLURM_STEP_GPUS / SLURM_JOB_GPUS; None: not restricted (every GPU)."""
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = env.get(name)
        if value is None:
            continue
        ids = []
        for token in (t.strip() for t in value.split(",")):
            if token in _NO_GPU or token.startswith("-"):
                break  # CUDA ignores an invalid id and every id after it
            ids.append(token)
        return ids
    return None


def nvml_devices() -> list[tuple[int, str]]:
    """(NVML index, UUID) of every GPU NVML sees, and (parent's index, UUID) of each MIG device on it."""
    import pynvml

    def text(value: tp.Union[str, bytes]) -> str:
        return value.decode() if isinstance(value, bytes) else value  # older nvidia-ml-py returns bytes

    pynvml.nvmlInit()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            out.append((i, text(pynvml.nvmlDeviceGetUUID(handle))))
            try:
                n_mig = pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)
            except pynvml.NVMLError:
                n_mig = 0  # no MIG on this GPU (or this driver)
            for j in range(n_mig):
                try:
                    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
                except pynvml.NVMLError:
                    continue  # an empty MIG slot
                out.append((i, text(pynvml.nvmlDeviceGetUUID(mig))))
        return out
    finally:
        pynvml.nvmlShutdown()


def job_gpus(visible: tp.Optional[tp.Sequence[str]], devices: tp.Sequence[tuple[int, str]]) -> tp.Optional[set[int]]:
    """The NVML indices of the job's GPUs among ``devices`` (:func:`nvml_devices`); None: all of them.

    An integer id is an NVML index (nvidia-smi's order); a UUID (or a unique prefix, as CUDA accepts) is looked up,
    a MIG device counts its whole GPU (NVML reports use and power per GPU). Ids NVML does not list while it sees no
    more GPUs than the job names: NVML sees only the job's GPUs already (a cgroup renumbers them from 0)."""
    if visible is None:
        return None
    indices = {i for i, _ in devices}
    found: set[int] = set()
    for token in visible:
        if token.isdigit():
            hit = {int(token)} & indices
        else:
            # Pre-R470 MIG ids name their GPU: MIG-GPU-<uuid>/<gi>/<ci>.
            uuid = token[len("MIG-"):].split("/")[0] if token.startswith("MIG-GPU-") else token
            hit = {i for i, u in devices if u.startswith(uuid)}
        found |= hit
        if not hit and len(indices) <= len(visible):
            return None
    return found


def _job_gpus_from_nvml(env: tp.Mapping[str, str]) -> tp.Optional[set[int]]:
    visible = visible_gpus(env)
    if not visible:  # not restricted, or no GPU at all: NVML need not be asked
        return None if visible is None else set()
    try:
        return job_gpus(visible, nvml_devices())
    except Exception as exc:  # noqa: BLE001 - NVML unusable here: GPUMonitor failed the same way, nothing to filter
        log.debug("NVML devices not listed: %s", exc)
        return None


def only_gpus(values: tp.Mapping[str, float], keep: tp.Optional[tp.Collection[int]]) -> dict[str, float]:
    """``values`` without the GPU keys of GPUs not in ``keep`` (None: every GPU kept)."""
    if keep is None:
        return dict(values)
    out = {}
    for k, v in values.items():
        m = _GPU_KEY.match(k)
        if m is None or int(m.group(1)) in keep:
            out[k] = v
    return out


TOTALS = ("gpu_busy_s", "gpu_s", "energy_j", "cpu_core_s", "wall_s", "gpus", "power_reported", "system_step")


class SystemMetrics:
    """Sample every ``interval_s`` seconds while the block runs (``interval_s`` 0: off, only the CPU time is kept).

    ``prior``: the totals of the run's earlier attempts (:meth:`totals`, kept beside its checkpoint), so a requeued
    run reports what all its attempts used, as SLURM's accounting counts what all of them were given, and logs its
    samples at the steps after theirs. ``gpus``: the NVML indices of the job's GPUs (None: from the environment,
    :func:`job_gpus`)."""

    def __init__(self, interval_s: float, prior: tp.Optional[tp.Mapping[str, tp.Any]] = None,
                 gpus: tp.Optional[tp.Collection[int]] = None) -> None:
        self.interval_s = float(interval_s)
        self._pending: list[tuple[float, int, dict[str, float]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: tp.Optional[threading.Thread] = None
        self.prior = {k: prior[k] for k in TOTALS if k in prior} if prior else {}
        self._step = int(self.prior.get("system_step", 0))  # after the earlier attempts' samples: no step twice
        self._gpus_given = gpus is not None
        self.job_gpus: tp.Optional[set[int]] = set(gpus) if gpus is not None else None
        self.gpu_busy_s = 0.0  # Σ over GPUs of utilisation × time
        self.gpu_s = 0.0  # Σ over GPUs of time seen
        self.energy_j = 0.0  # Σ over GPUs of power × time
        self.gpus = 0
        self.power_reported = False
        self._cpu0 = 0.0
        self._t0 = 0.0
        self.cpu_core_s = 0.0
        self.wall_s = 0.0

    @staticmethod
    def _cpu_time() -> float:
        import psutil

        t = psutil.Process().cpu_times()
        return float(t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0))

    def __enter__(self) -> SystemMetrics:
        self._cpu0, self._t0 = self._cpu_time(), time.monotonic()
        if self.interval_s > 0:
            monitors = _monitors()
            if not self._gpus_given:
                self.job_gpus = _job_gpus_from_nvml(os.environ)
            self._thread = threading.Thread(target=self._loop, args=(monitors,), name="system-metrics", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
            self._thread = None
        if self._t0 and not self.wall_s:
            self.cpu_core_s = self._cpu_time() - self._cpu0
            self.wall_s = time.monotonic() - self._t0

    def _loop(self, monitors: list) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                values: dict[str, float] = {}
                for m in monitors:
                    m.collect_metrics()
                    values.update({k: float(v) for k, v in m.aggregate_metrics().items()})
                    m.clear_metrics()
            except Exception as exc:  # noqa: BLE001 - a failed sample must never stop the training
                log.debug("system metrics sample failed: %s", exc)
                continue
            self.record(values, now - last)
            last = now

    def record(self, values: tp.Mapping[str, float], dt: float) -> None:
        """One sample (``dt`` seconds since the last): the job's GPUs only, integrated and queued for the outbox."""
        mine = only_gpus(values, self.job_gpus)
        self._integrate(mine, dt)
        with self._lock:
            self._pending.append((time.time(), self._step, {PREFIX + k: v for k, v in mine.items()}))
            self._step += 1

    def _integrate(self, values: tp.Mapping[str, float], dt: float) -> None:
        utils = [v for k, v in values.items() if k.startswith("gpu_") and k.endswith("_utilization_percentage")]
        watts = [v for k, v in values.items() if k.startswith("gpu_") and k.endswith("_power_usage_watts")]
        self.gpus = max(self.gpus, len(utils))
        self.gpu_busy_s += sum(utils) / 100.0 * dt
        self.gpu_s += len(utils) * dt
        if watts:
            self.power_reported = True
            self.energy_j += sum(watts) * dt

    def drain(self) -> list[tuple[float, int, dict[str, float]]]:
        """The samples taken since the last call: (time, step, metrics)."""
        with self._lock:
            out, self._pending = self._pending, []
        return out

    def totals(self) -> dict[str, float]:
        """What this attempt and the earlier ones used so far (the CPU time and wall time up to now)."""
        live = self._t0 and not self.wall_s
        mine = {"gpu_busy_s": self.gpu_busy_s, "gpu_s": self.gpu_s, "energy_j": self.energy_j,
                "cpu_core_s": self._cpu_time() - self._cpu0 if live else self.cpu_core_s,
                "wall_s": time.monotonic() - self._t0 if live else self.wall_s}
        out = {k: float(self.prior.get(k, 0.0)) + v for k, v in mine.items()}
        out["gpus"] = float(max(self.gpus, self.prior.get("gpus", 0)))
        out["power_reported"] = float(self.power_reported or bool(self.prior.get("power_reported")))
        # No lock: the USR2 handler calls this on the main thread, which may hold the lock (drain) when interrupted.
        out["system_step"] = float(self._step)  # the next attempt's first sample step
        return out

    def summary(self) -> dict[str, float]:
        """What the run used, every attempt, as MLflow metrics (GPU figures only where GPUs reported them)."""
        t = self.totals()
        out = {"cpu_core_hours_used": t["cpu_core_s"] / 3600.0, "system_metrics_wall_s": t["wall_s"]}
        if t["gpus"]:
            out.update({"gpus_seen": t["gpus"], "used_gpu_hours": t["gpu_busy_s"] / 3600.0,
                        "seen_gpu_hours": t["gpu_s"] / 3600.0})
        if t["power_reported"]:
            out["gpu_energy_kwh"] = t["energy_j"] / 3.6e6
        return out
