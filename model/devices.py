"""The devices a run trains and predicts on: one tf.distribute strategy per process.

Paper, Training section: "data parallel over the 4 V100-SXM2-32GB GPUs of one node". Every GPU that
TensorFlow sees becomes a replica of one ``MirroredStrategy``. Machines without GPUs stand in with N
logical CPU devices under the same strategy (``train.cpu_replicas``; shared/platform-facts.md), so
tests and the test cluster run the multi-replica code path. A job that was given GPUs (SLURM's
``SLURM_GPUS_ON_NODE``, ``CUDA_VISIBLE_DEVICES``) but whose TensorFlow sees fewer stops before
training: a CPU-only build or a driver mismatch would otherwise train on the CPU, 75–200× slower
under mixed_float16, and be recorded FINISHED.

TensorFlow-specific (``model.unet`` stays backend-neutral): imported only where a run trains or predicts.
"""

from __future__ import annotations

import dataclasses
import os
import typing as tp

import numpy as np


class DeviceError(RuntimeError):
    """The devices this process can use are not the ones it was given or asked for."""


@dataclasses.dataclass(frozen=True)
class Devices:
    """What a run trains on: the strategy, its replica count and the device kind (GPU, CPU, CPU stand-in)."""

    strategy: tp.Any  # tf.distribute.Strategy
    replicas: int
    kind: str  # "GPU", "CPU" (one device, nothing allocated) or "CPU stand-in" (train.cpu_replicas)
    names: tuple[str, ...]

    @property
    def tags(self) -> dict[str, str]:
        """MLflow tags: how many replicas the run trained on, and on what."""
        return {"replicas": str(self.replicas), "device_kind": self.kind, "devices": ",".join(self.names)}


_DEVICES: dict[tp.Optional[int], Devices] = {}  # one strategy per process and setting


def allocated_gpus(environ: tp.Mapping[str, str] = os.environ) -> tp.Optional[tuple[int, str]]:
    """(count, where it was read) of the GPUs this process was given, or None when it was given none.

    SLURM sets ``SLURM_GPUS_ON_NODE`` for a job with GPU gres; otherwise ``CUDA_VISIBLE_DEVICES`` lists
    them (empty, ``-1`` or ``NoDevFiles`` hide every GPU: none given).
    """
    slurm = environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm), f"SLURM_GPUS_ON_NODE={slurm}"
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    ids = [v for v in (s.strip() for s in visible.split(",")) if v and v not in ("-1", "NoDevFiles")]
    if not ids or visible.strip().startswith("-1"):  # CUDA stops at the first invalid id
        return None
    return len(ids), f"CUDA_VISIBLE_DEVICES={visible}"


def tensorflow_build() -> str:
    """'TensorFlow 2.21.0 (CUDA 12.5)' or 'TensorFlow 2.21.0 (CPU-only build)', for error messages and tags."""
    import tensorflow as tf

    info = tf.sysconfig.get_build_info()
    if info.get("is_cuda_build"):
        return f"TensorFlow {tf.__version__} (CUDA {info.get('cuda_version', '?')})"
    return f"TensorFlow {tf.__version__} (CPU-only build)"


def ensure_cpu_devices(n: int) -> list[str]:
    """N logical CPU devices of this process (configured now if TensorFlow has not started yet)."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        if n > 1 and len(tf.config.get_logical_device_configuration(cpus[0]) or [None]) < n:
            tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:  # TensorFlow already started: the logical devices are what they are
        pass
    logical = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(logical) < n:
        raise DeviceError(f"train.cpu_replicas={n}: this process's TensorFlow started with {len(logical)} CPU "
                          f"device(s) before they could be split; set cpu_replicas in a fresh process")
    return logical[:n]


def training_devices(cpu_replicas: tp.Optional[int] = None,
                     environ: tp.Mapping[str, str] = os.environ) -> Devices:
    """The strategy a run trains under, created once per process (a model is reused only under its own).

    ``cpu_replicas=N``: N logical CPU devices under MirroredStrategy, whatever was allocated (asked for).
    Otherwise every GPU TensorFlow sees, or one CPU when it sees none and none was given; given GPUs that
    TensorFlow does not see raise :class:`DeviceError` before any training.
    """
    import tensorflow as tf

    if cpu_replicas:
        if cpu_replicas not in _DEVICES:
            names = ensure_cpu_devices(int(cpu_replicas))
            # Collective all-reduce on logical CPUs orders the synchronized BN's and the gradients' reductions
            # differently per replica ("Shape mismatch in the collective instance"): reduce on one device.
            strategy = tf.distribute.MirroredStrategy(names, cross_device_ops=tf.distribute.ReductionToOneDevice())
            _DEVICES[cpu_replicas] = Devices(strategy, int(cpu_replicas), "CPU stand-in", tuple(names))
        return _DEVICES[cpu_replicas]
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    given = allocated_gpus(environ)
    if given is not None and len(gpus) < given[0]:
        raise DeviceError(f"this job was given {given[0]} GPU(s) ({given[1]}) but {tensorflow_build()} sees "
                          f"{len(gpus)}: install the GPU build (pip install -e '.[gpu]') or fix the driver; "
                          "train.cpu_replicas=N trains on N CPU stand-ins instead")
    if None not in _DEVICES:
        if gpus:
            _DEVICES[None] = Devices(tf.distribute.MirroredStrategy(gpus), len(gpus), "GPU", tuple(gpus))
        else:
            _DEVICES[None] = Devices(tf.distribute.get_strategy(), 1, "CPU", ("/device:CPU:0",))
    return _DEVICES[None]


def check_batch(global_batch: int, devices: Devices) -> None:
    """MirroredStrategy splits the global batch evenly: an uneven split would train replicas on different counts."""
    if global_batch % devices.replicas:
        raise DeviceError(f"train.batch_size: {global_batch} does not split evenly over {devices.replicas} "
                          f"replicas ({devices.kind}); use a multiple of {devices.replicas}")


JIT_MANY_REPLICAS = ("XLA cannot compile one training step over {n} replicas here (TensorFlow 2.21/Keras 3: \"Trying to "
                     "access resource .../replica_1 located in device ...:1 from device ...:0\", measured on CPU "
                     "replicas, float32 and mixed_float16 alike); set train.jit_compile=false for a multi-GPU job")


def check_jit(jit_compile: bool, replicas: int) -> None:
    """``jit_compile`` with several replicas fails at the first step (Keras compiles the whole distributed step with
    XLA, which cannot read the other replicas' variables): refused before the model is built."""
    if jit_compile and replicas > 1:
        raise DeviceError("train.jit_compile: " + JIT_MANY_REPLICAS.format(n=replicas))


def replicas_of(model) -> int:
    strategy = getattr(model, "distribute_strategy", None)  # TensorFlow trainer only
    return int(strategy.num_replicas_in_sync) if strategy is not None else 1


def _split(strategy, x: np.ndarray):
    """``x`` (a multiple of the replica count long) as one contiguous shard per replica, on its device."""
    import tensorflow as tf

    n = strategy.num_replicas_in_sync
    k = x.shape[0] // n
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * k:(ctx.replica_id_in_sync_group + 1) * k]))


def replica_call(model, x: np.ndarray, *, training: bool = False) -> np.ndarray:
    """``model(x)`` with the batch spread over the model's replicas, outputs gathered in batch order.

    The batch is padded to a multiple of the replica count with copies of its last image (their outputs
    are dropped), so every replica runs the same shape.
    """
    import tensorflow as tf

    strategy = model.distribute_strategy
    n = strategy.num_replicas_in_sync
    cache = model.__dict__.setdefault("_replica_call_fns", {})
    fn = cache.get(training)
    if fn is None:  # traced once per model and mode; shapes are relaxed on the second one
        @tf.function(reduce_retracing=True)
        def fn(dist_x):
            per_replica = strategy.run(lambda xr: tf.cast(model(xr, training=training), tf.float32), args=(dist_x,))
            return strategy.gather(per_replica, axis=0)

        cache[training] = fn
    pad = (-x.shape[0]) % n
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    out = fn(_split(strategy, x)).numpy()
    return out[: out.shape[0] - pad] if pad else out
