"""What a run used, not only what it was given: MLflow's system metrics, and the run's cost in core-, GPU-hours and kWh.

:class:`SystemMetrics` samples with MLflow's own monitors (``system/cpu_utilization_percentage``,
``system/system_memory_usage_megabytes``, ``system/gpu_<i>_utilization_percentage``, ``..._memory_usage_megabytes``,
``..._power_usage_watts``; psutil, and NVML through nvidia-ml-py where NVIDIA GPUs exist) in a thread, and keeps the
samples until the training thread hands them to the run's outbox (:meth:`SystemMetrics.drain`): so they carry their
own time stamps and wait out a server outage like every other metric (MLflow's monitor thread would log them
directly, and lose them while the server is away). It also integrates what the run used: GPU-seconds weighted by
utilisation, energy from the reported power, and this process's CPU time.
"""

from __future__ import annotations

import logging
import threading
import time
import typing as tp

log = logging.getLogger(__name__)

PREFIX = "system/"


def _monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    monitors: list = [CPUMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())  # raises where NVML finds no NVIDIA driver
    except Exception as exc:  # noqa: BLE001 - no GPU here: CPU and memory only
        log.debug("no GPU metrics: %s", exc)
    return monitors


TOTALS = ("gpu_busy_s", "gpu_s", "energy_j", "cpu_core_s", "wall_s", "gpus", "power_reported")


class SystemMetrics:
    """Sample every ``interval_s`` seconds while the block runs (``interval_s`` 0: off, only the CPU time is kept).

    ``prior``: the totals of the run's earlier attempts (:meth:`totals`, kept beside its checkpoint), so a requeued
    run reports what all its attempts used, as SLURM's accounting counts what all of them were given."""

    def __init__(self, interval_s: float, prior: tp.Optional[tp.Mapping[str, tp.Any]] = None) -> None:
        self.interval_s = float(interval_s)
        self._pending: list[tuple[float, int, dict[str, float]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: tp.Optional[threading.Thread] = None
        self._step = 0
        self.gpu_busy_s = 0.0  # Σ over GPUs of utilisation × time
        self.gpu_s = 0.0  # Σ over GPUs of time seen
        self.energy_j = 0.0  # Σ over GPUs of power × time
        self.gpus = 0
        self.power_reported = False
        self._cpu0 = 0.0
        self._t0 = 0.0
        self.cpu_core_s = 0.0
        self.wall_s = 0.0
        self.prior = {k: prior[k] for k in TOTALS if k in prior} if prior else {}

    @staticmethod
    def _cpu_time() -> float:
        import psutil

        t = psutil.Process().cpu_times()
        return float(t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0))

    def __enter__(self) -> SystemMetrics:
        self._cpu0, self._t0 = self._cpu_time(), time.monotonic()
        if self.interval_s > 0:
            monitors = _monitors()
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
            self._integrate(values, now - last)
            last = now
            with self._lock:
                self._pending.append((time.time(), self._step, {PREFIX + k: v for k, v in values.items()}))
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
