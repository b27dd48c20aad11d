"""The prepared GPU check: one command, at most ~8 minutes on one GPU, Keras 3 on JAX (no TensorFlow).

    KERAS_BACKEND=jax python benchmarks/gpu_check.py --json $OUT/gpu_check.json        # on a GPU machine
    KERAS_BACKEND=jax python benchmarks/gpu_check.py --smoke                            # any CPU: wiring only

The GPU machines have JAX but neither TensorFlow nor Keras: ``benchmarks/gpu_wheels.sh`` downloads
the Keras wheels once into ``.whl/`` (git-ignored), which the device call carries (``carry: [".whl"]``)
and installs; the whole device command is then

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && PYTHONPATH=/tmp/site KERAS_BACKEND=jax PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --json $OUT/gpu_check.json

For each config, in a fresh process (so the peak memory is that config's alone):
* ``baseline`` c0=32, d=3, IS=384², per-replica batch 8 (the paper's global 32 over 4 GPUs);
* ``best`` c0=64, d=5, IS=640², per-replica batch 4 (global 16 over 4 GPUs; paper's best compound);
it measures, in mixed precision (bfloat16 where the card has it, else float16):
* training images/s: median step time over the timed steps, after compilation;
* the loss over ``--steps`` (200) steps on a learnable synthetic task (4 grey-value classes of smooth
  noise): it must fall;
* peak GPU memory (``memory_stats()['peak_bytes_in_use']``, preallocation off) against
  ``model.complexity.training_memory`` (the estimate ``sweep.plan`` uses);
* full-slice inference images/s on 1200×1200 slices (padded to a multiple of 2^d as in prediction);
* achieved TFLOP/s (training: 3× the forward FLOPs per image; inference: 1×) and its share of the
  card's dense bf16/fp16 peak (vendor figures, table below).
Then ``volume9`` (fresh process): the paper's whole 1000×1200×1200 scan (a preprocessed sample at 5 µm),
9 planes, soft vote, c0=64, d=5 (random weights), MEASURED end to end through ``model.predict.run_prediction`` as
``python -m model.predict --fuse-on device`` runs it: the volume, each rotated plane and the fused accumulator in
GPU memory (model.resident_device), no plane files; seconds per phase (read / rotate / predict / rotate back /
fuse / write), the network's PFLOP and its share of the card's peak, peak GPU memory against the plan's estimate.
``--volume-shape Z Y X`` changes the size, ``--volume-fuse-on files`` runs the plane-file path instead (the
paper's size needs ~60 GB of plane files there), ``--volume-uncertainty`` adds the maps, ``--no-volume`` skips it.
Where the machine also has TensorFlow, ``tf_train`` (fresh process, KERAS_BACKEND=tensorflow) runs the
project's own training path, ``model.training.train_fold``, over every GPU under MirroredStrategy and reports
its replicas, images/s and TF's peak GPU memory against the estimate; where it has JAX alone, the check
prints which parts it did NOT check (``NOT_CHECKED_WITHOUT_TF``).
Prints one table and, with ``--json``, writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "baseline": dict(width=32, depth=3, size=384, batch=8),
    "best": dict(width=64, depth=5, size=640, batch=4),
}
# Not in the default run: the largest paper config (1.52 G parameters), which sweep.plan's estimate
# puts over a 32 GB V100; ``--configs largest --no-volume`` measures its peak against the estimate.
EXTRA_CONFIGS = {"largest": dict(width=112, depth=6, size=640, batch=4)}
SMOKE = {"baseline": dict(width=4, depth=3, size=64, batch=2), "best": dict(width=4, depth=5, size=64, batch=2),
         "largest": dict(width=4, depth=6, size=64, batch=2)}
PAPER_VOLUME = (1000, 1200, 1200)  # a preprocessed sample at 5 µm (paper: about 1200 × 1200 × 1000)
VOLUME = dict(width=64, depth=5, shape=PAPER_VOLUME, batch=None)  # the paper's best model, batch from memory
VOLUME_SMOKE = dict(width=4, depth=3, shape=(24, 40, 40), batch=None)
# Dense tensor-core peak (TFLOP/s) for 16-bit inputs, vendor data sheets (SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "V100": 125.0, "L40S": 362.0, "A10": 125.0}


def card_peak(kind: str) -> tp.Optional[float]:
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def learnable_batch(rng, batch: int, size: int):
    """Smooth noise and its 4 grey-value classes: a task a U-net learns in a few hundred steps."""
    import numpy as np

    low = rng.standard_normal((batch, size // 16 + 2, size // 16 + 2)).astype(np.float32)
    img = np.kron(low, np.ones((16, 16), np.float32))[:, :size, :size]
    img = img + 0.1 * rng.standard_normal(img.shape).astype(np.float32)
    labels = np.digitize(img, [-0.7, 0.0, 0.7]).astype(np.int32)
    return img[..., None], labels


class NvmlSampler:
    """GPU utilisation and power while training runs (NVML via nvidia-ml-py, as sweep.tracking.cost reads them through
    MLflow's GPU monitor): checks that "used GPU-hours" and energy are what the card reports. Empty without NVML."""

    def __init__(self, interval_s: float = 0.2) -> None:
        import threading

        self.interval_s, self.samples, self._stop = interval_s, [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML (CPU, or the wheel not carried)
            self._nvml = None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            n, h = self._nvml, self._h
            self.samples.append((n.nvmlDeviceGetUtilizationRates(h).gpu, n.nvmlDeviceGetPowerUsage(h) / 1000.0))

    def __enter__(self) -> "NvmlSampler":
        if self._nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self, seconds: float, images: int) -> dict:
        if not self.samples:
            return {"nvml": "NOT_CHECKED_WITHOUT_NVML"}
        util = statistics.mean(u for u, _ in self.samples)
        watts = statistics.mean(w for _, w in self.samples)
        return {"nvml_samples": len(self.samples), "nvml_gpu_util_pct": util, "nvml_power_w": watts,
                "used_over_allocated": util / 100.0, "energy_j_per_image": watts * seconds / max(1, images)}


def measure(name: str, cfg: dict, *, steps: int, precision: str, infer_slices: int, slice_size: int,
            with_levers: bool = False) -> dict:
    """One config in this process: train ``steps`` steps, then full-slice inference."""
    import jax
    import keras
    import numpy as np

    from model.complexity import count_flops, training_memory
    from model.unet import build_unet, pad_to_multiple

    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    w, d, s, b = cfg["width"], cfg["depth"], cfg["size"], cfg["batch"]
    model = build_unet(w, d)
    # 1e-3: the synthetic task is a sanity check of the training path, not the paper's schedule.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    batches = [learnable_batch(rng, b, s) for _ in range(8)]
    losses, times = [], []
    t_compile = time.perf_counter()
    nvml = NvmlSampler()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = float(np.asarray(model.train_on_batch(x, y)))  # float(): waits for the device
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if i == 0:
            t_compile = time.perf_counter() - t_compile
            nvml.__enter__()  # after compilation: the steady state a sweep's runs spend their hours in
    nvml.__exit__()
    nvml_fields = nvml.summary(sum(times[1:]), b * (len(times) - 1))
    timed = times[min(10, len(times) // 2):]
    step_s = statistics.median(timed)
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    est = training_memory(w, d, s, b, precision)
    flops = count_flops(w, d, s)
    levers = (training_levers(model, batches, steps=max(16, min(32, steps // 3)),
                              flops_per_image=3 * count_flops(w, d, s),
                              peak_tflops=card_peak(getattr(jax.local_devices()[0], "device_kind", ""))
                              if jax.local_devices()[0].platform == "gpu" else None) if with_levers else {})
    # Full-slice inference, as model.predict does it: the slice padded to a multiple of 2^d.
    slices = rng.random((infer_slices, slice_size, slice_size), dtype=np.float32)
    padded, _ = pad_to_multiple(slices[..., None], d)
    infer_batch = 4
    model.predict_on_batch(padded[:infer_batch])  # compile
    t0 = time.perf_counter()
    for i in range(0, len(padded), infer_batch):
        np.asarray(model.predict_on_batch(padded[i:i + infer_batch]))
    infer_s = time.perf_counter() - t0
    infer_flops = count_flops(w, d, (padded.shape[1], padded.shape[2]))
    kind = getattr(dev, "device_kind", dev.platform)
    peak_tflops = card_peak(kind) if dev.platform == "gpu" else None
    train_tflops = 3 * flops * b / step_s / 1e12
    infer_tflops = infer_flops * len(padded) / infer_s / 1e12
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    return {
        "config": name, **cfg, "precision": precision, "device": kind, "platform": dev.platform,
        "compile_s": t_compile, "step_ms": step_s * 1e3, "train_images_per_s": b / step_s,
        "train_tflops": train_tflops, "train_share_of_peak": train_tflops / peak_tflops if peak_tflops else None,
        "loss_first10": first, "loss_last10": last, "loss_falls": last < 0.8 * first, "steps": steps,
        "peak_gpu_bytes": peak, "estimate_bytes": est.total, "estimate_state_bytes": est.state,
        "estimate_activation_bytes": est.activations,
        "measured_over_estimate": (peak / est.total) if peak else None,
        "infer_slice": slice_size, "infer_padded": int(padded.shape[1]), "infer_images_per_s": len(padded) / infer_s,
        "infer_tflops": infer_tflops, "infer_share_of_peak": infer_tflops / peak_tflops if peak_tflops else None,
        "levers": levers, **nvml_fields,
    }


def training_levers(model, batches, *, steps: int, flops_per_image: float, peak_tflops: tp.Optional[float]) -> dict:
    """Where a training step's time goes beyond the kernels, measured as levers that do not change what is trained
    (the same batches, the same optimizer): ms/step and the share of the peak for
    * ``host_feed_sync``: numpy batches copied to the device every step and the loss read back (a host sync) each
      step — what ``model.training``'s loop does;
    * ``device_feed_sync``: the batches already on the device (an input pipeline that prefetches to the device;
      Keras' ``train_on_batch`` still reads the loss back every step);
    * ``steps_per_execution_8``: ``compile(steps_per_execution=8)`` + ``fit``: 8 steps in one compiled loop, one
      read-back per 8 steps.
    The gap between the first and the others is the host's share of a step."""
    import jax
    import keras
    import numpy as np

    out: dict = {}
    b = int(batches[0][0].shape[0])

    def record(name: str, seconds: float, n: int) -> None:
        ms = 1e3 * seconds / n
        tflops = flops_per_image * b / (ms / 1e3) / 1e12
        out[name] = {"ms_per_step": ms, "images_per_s": b / (ms / 1e3), "tflops": tflops,
                     "share_of_peak": tflops / peak_tflops if peak_tflops else None}

    def timed(fn) -> float:
        fn(2)  # warm: nothing compiles in the timed part
        t0 = time.perf_counter()
        fn(steps)
        return time.perf_counter() - t0

    def host_sync(n):
        for i in range(n):
            float(np.asarray(model.train_on_batch(*batches[i % len(batches)])))

    record("host_feed_sync", timed(host_sync), steps)
    on_device = [(jax.device_put(x), jax.device_put(y)) for x, y in batches]

    def device_sync(n):
        for i in range(n):
            float(np.asarray(model.train_on_batch(*on_device[i % len(on_device)])))

    record("device_feed_sync", timed(device_sync), steps)

    x = np.concatenate([x for x, _ in batches])
    y = np.concatenate([y for _, y in batches])
    model.compile(optimizer=model.optimizer, loss=model.loss, steps_per_execution=8)
    spe_steps = max(8, steps - steps % 8)
    model.fit(x, y, batch_size=b, epochs=1, steps_per_epoch=8, verbose=0)  # compile the 8-step loop
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=b, epochs=spe_steps // 8, steps_per_epoch=8, verbose=0, shuffle=False)
    record("steps_per_execution_8", time.perf_counter() - t0, spe_steps)
    return out


def write_volume(path: Path, shape: tp.Sequence[int]) -> None:
    """A float32 volume of uniform noise in [0, 1] (the network's cost does not depend on the values), slab by slab."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("image", tuple(shape), np.float32, chunks=tuple(min(32, int(s)) for s in shape))
        for z in range(0, shape[0], 32):
            ds[z:z + 32] = rng.random((min(32, shape[0] - z),) + tuple(shape[1:]), dtype=np.float32)


def measure_volume(cfg: dict, *, precision: str, work: Path, fuse_on: str = "device", uncertainty: bool = False) -> dict:
    """9-plane prediction of a cfg['shape'] volume with a random c0/d U-net through ``model.predict.run_prediction``
    exactly as ``python -m model.predict --fuse-on FUSE_ON`` runs it: ``device`` keeps the volume, the rotated plane
    and the fused accumulator in GPU memory (no plane files), ``files`` writes plane files (the path before)."""
    import jax
    import keras
    import numpy as np

    from data.volume import VolumeRef
    from model.complexity import count_flops
    from model.predict import run_prediction
    from model.resident import slice_shapes
    from model.planes import PLANE_SETS, PLANES
    from data.rotation import rotated_volume_shape
    from model.streaming import PhaseTimes
    from model.unet import build_unet

    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    w, d, shape = cfg["width"], cfg["depth"], tuple(cfg["shape"])
    model = build_unet(w, d)
    work.mkdir(parents=True, exist_ok=True)
    vol = work / "volume.h5"
    t0 = time.perf_counter()
    write_volume(vol, shape)
    make_s = time.perf_counter() - t0
    times, info = PhaseTimes(), {}
    t0 = time.perf_counter()
    run_prediction("gpu-check", VolumeRef(vol, "/image"), work / "seg.h5", planes="9", model=(model, "gpu-check"),
                   fuse_on=fuse_on, batch_size=cfg.get("batch") or "auto", progress=False, times=times, info=info,
                   values_checked=True, uncertainty=uncertainty, rotate_on="device", work_dir=work / "planes")
    wall = time.perf_counter() - t0
    dev = jax.local_devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    flops = 0
    for name, (h, w_) in zip(PLANE_SETS["9"], slice_shapes(shape, PLANE_SETS["9"])):
        p = PLANES[name]
        grid = rotated_volume_shape(shape, p.rotation_axis) if p.rotated else shape
        step = 2 ** d
        flops += grid[p.slice_axis] * count_flops(w, d, (-(-h // step) * step, -(-w_ // step) * step))
    peak = card_peak(kind) if dev.platform == "gpu" else None
    predict_s = times.seconds["predict"]  # the network after its compilation (phase "compile", per slice shape)
    stats = dev.memory_stats() or {}
    n = int(np.prod(shape))
    return {"config": "volume9", "width": w, "depth": d, "shape": list(shape), "fuse_on": info.get("fuse_on"),
            "why": info.get("why"), "batch": info.get("batch_size"), "precision": precision, "device": kind,
            "platform": dev.platform, "voxels": n, "make_volume_s": make_s, "wall_s": wall,
            "phases_s": dict(times.seconds), "voxels_per_s": n / wall,
            "compile_s": times.seconds.get("compile", 0.0),
            "non_network_s": wall - predict_s - times.seconds.get("compile", 0.0),
            "non_network_share": 1 - (predict_s + times.seconds.get("compile", 0.0)) / wall, "network_pflop": flops / 1e15,
            "network_tflops": flops / predict_s / 1e12 if predict_s else None,
            "network_share_of_peak": flops / predict_s / 1e12 / peak if peak and predict_s else None,
            "estimate_bytes": info.get("estimate_bytes"), "peak_gpu_bytes": stats.get("peak_bytes_in_use"),
            "extrapolation_factor": float(np.prod(PAPER_VOLUME)) / n, "uncertainty": uncertainty}


def default_precision() -> str:
    import jax

    dev = jax.local_devices()[0]
    kind = getattr(dev, "device_kind", "")
    if dev.platform != "gpu":
        return "float32"  # 16-bit on CPU is slow and says nothing about a GPU
    return "mixed_float16" if "V100" in kind or "T4" in kind else "mixed_bfloat16"


#: What only a TensorFlow machine can check: printed (and in --json) when the GPU machine has JAX alone.
NOT_CHECKED_WITHOUT_TF = (
    "model.training.train_fold on the GPUs (the project's own training path; here Keras on JAX runs the same U-net)",
    "MirroredStrategy over every visible GPU (model.devices), synchronized BN over the global batch, NCCL all-reduce",
    "model.devices' check that a job sees the GPUs it was given (a CPU-only TensorFlow build)",
    "TensorFlow's GPU allocator peak against model.complexity.training_memory (the JAX peak is XLA's, not TF's)",
    "checkpoint write time of the largest configs under TensorFlow (docs/training.md gives an estimate)",
)


def tensorflow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def measure_tf_training(*, steps: int, smoke: bool) -> dict:
    """The project's own training path (model.training.train_fold) on every GPU TensorFlow sees, mixed precision,
    on a small synthetic prepared dataset: replicas, images/s after the first chunk, TF's peak GPU memory."""
    import tempfile

    import tensorflow as tf

    from data.folds import split_fold
    from data.manifest import load_dataset
    from data.pipeline import AugmentConfig
    from data.prepare import prepare_dataset
    from data.synth import main as synth_main
    from model.complexity import training_memory
    from model.training import TrainSettings, train_fold

    cfg = SMOKE["baseline"] if smoke else CONFIGS["baseline"]
    gpus = tf.config.list_logical_devices("GPU")
    replicas = max(1, len(gpus))
    with tempfile.TemporaryDirectory(prefix="gpu-check-tf-") as tmp:
        raw, prep = Path(tmp) / "raw", Path(tmp) / "prepared"
        synth_main(["--out", str(raw), "--size", "64" if smoke else "256", "--n-train", "4", "--n-test", "1"])
        prepare_dataset(raw, prep)
        train, val = split_fold(load_dataset(prep), 0)
        chunk = max(1, steps // 2)
        settings = TrainSettings(max_iters=2 * chunk, checkpoint_every=chunk, batch_size=cfg["batch"] * replicas,
                                 precision="float32" if not gpus else "mixed_float16", val_crop=64 if smoke else 256,
                                 val_slice_step=16, final_slice_step=16, open_slabs=4)
        res = train_fold(width=cfg["width"], depth=cfg["depth"], input_size=cfg["size"], train_samples=train,
                         val_samples=val, settings=settings, augment=AugmentConfig(), ckpt_dir=Path(tmp) / "ck")
    peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] if gpus else None
    est = training_memory(cfg["width"], cfg["depth"], cfg["size"], cfg["batch"], settings.precision).total
    return {"config": "tf_train", "replicas": res.replicas, "device_kind": res.device_kind,
            "compute_dtype": res.compute_dtype, "iterations": res.state.iteration,
            "images_per_s_second_chunk": res.state.history[-1]["images_per_s"], "phases_s": res.phases,
            "peak_gpu_bytes": peak, "estimate_bytes": est, "measured_over_estimate": peak / est if peak else None,
            "mean_iou": res.final_metrics["mean_iou"], **{k: cfg[k] for k in ("width", "depth", "size", "batch")}}


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configs and few steps (CPU wiring check)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per config (default 200; smoke 80)")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on A100/H100/H200, fp16 on V100), or a policy")
    ap.add_argument("--json", type=Path, help="write all numbers here")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma list of {sorted(CONFIGS) + sorted(EXTRA_CONFIGS)} (default: {','.join(CONFIGS)})")
    ap.add_argument("--only", choices=sorted(CONFIGS) + sorted(EXTRA_CONFIGS) + ["volume9", "tf_train"], help="one config, in this process (used by the parent)")
    ap.add_argument("--volume-shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                    help="shape of the 9-plane volume (default the paper's 1000 1200 1200; smoke 24 40 40)")
    ap.add_argument("--volume-fuse-on", default="device", choices=["device", "host", "files", "auto"],
                    help="where the volume's planes are fused (default device: no plane files)")
    ap.add_argument("--volume-uncertainty", action="store_true",
                    help="also write the uncertainty maps (what analysis.segment writes)")
    ap.add_argument("--no-volume", action="store_true", help="skip the 9-plane whole-volume run")
    ap.add_argument("--levers", default="best",
                    help="comma list of configs whose training levers are measured (each costs a second compilation)")
    args = ap.parse_args(argv)
    if args.only == "tf_train":  # KERAS_BACKEND=tensorflow, in its own process (parent below)
        print("RESULT " + json.dumps(measure_tf_training(steps=args.steps or 40, smoke=args.smoke)), flush=True)
        return 0
    if os.environ.get("KERAS_BACKEND") != "jax":
        print("error: run with KERAS_BACKEND=jax (the GPU machines have JAX, not TensorFlow)", file=sys.stderr)
        return 2
    steps = args.steps or (80 if args.smoke else 200)
    configs = SMOKE if args.smoke else {**CONFIGS, **EXTRA_CONFIGS}
    if not args.only:
        chosen = args.configs.split(",")
        unknown = sorted(set(chosen) - set(configs))
        if unknown:
            print(f"error: --configs: unknown {unknown}; known {sorted(configs)}", file=sys.stderr)
            return 2
        configs = {k: configs[k] for k in chosen}
    infer = (4, 96) if args.smoke else (32, 1200)
    if args.only == "volume9":
        import tempfile

        precision = default_precision() if args.precision == "auto" else args.precision
        cfg = dict(VOLUME_SMOKE if args.smoke else VOLUME)
        cfg["shape"] = tuple(args.volume_shape or cfg["shape"])
        with tempfile.TemporaryDirectory(prefix="gpu-check-volume-") as tmp:
            res = measure_volume(cfg, precision=precision, work=Path(tmp), fuse_on=args.volume_fuse_on,
                                 uncertainty=args.volume_uncertainty)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if args.only:
        precision = default_precision() if args.precision == "auto" else args.precision
        res = measure(args.only, configs[args.only], steps=steps, precision=precision, infer_slices=infer[0],
                      slice_size=infer[1], with_levers=args.only in args.levers.split(","))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    # The peak is then what the config needs; the limit is the card less a margin (the default caps XLA at 75 %).
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION="0.95")
    results = []
    t0 = time.perf_counter()
    # The paper-size scan first: a run stopped at the device call's time limit keeps what it finished (--json).
    for name in ([] if args.no_volume else ["volume9"]) + list(configs):
        cmd = [sys.executable, __file__, "--only", name, "--steps", str(steps), "--precision", args.precision,
               "--levers", args.levers]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--volume-shape", *map(str, args.volume_shape)] if args.volume_shape else []
        cmd += ["--volume-fuse-on", args.volume_fuse_on] + (["--volume-uncertainty"] if args.volume_uncertainty else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{name}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            results.append({"config": name, "failed": True, "stderr": proc.stderr[-3000:]})
            continue
        results.append(json.loads(line[len("RESULT "):]))
        print(f"{name} done after {time.perf_counter() - t0:.0f} s: {line[len('RESULT '):][:600]}", flush=True)
        if args.json:  # a run stopped at its time limit keeps the configs it finished
            args.json.write_text(json.dumps(results, indent=1))
    if tensorflow_available():  # the project's own training path, where TensorFlow is installed
        proc = subprocess.run([sys.executable, __file__, "--only", "tf_train"] + (["--smoke"] if args.smoke else []),
                              env=dict(os.environ, KERAS_BACKEND="tensorflow"), capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        tf_result = json.loads(line[len("RESULT "):]) if line else {"config": "tf_train", "failed": True,
                                                                     "stderr": proc.stderr[-3000:]}
        results.append(tf_result)
        print(f"TensorFlow training path: {json.dumps(tf_result)[:1500]}")
    else:
        results.append({"config": "not_checked", "without_tensorflow": list(NOT_CHECKED_WITHOUT_TF)})
        print("NOT CHECKED on this machine (JAX only, no TensorFlow):\n  - " + "\n  - ".join(NOT_CHECKED_WITHOUT_TF))
    volume = [r for r in results if r.get("config") == "volume9" and not r.get("failed")]
    results_volume = volume[0] if volume else None
    ok = [r for r in results if not r.get("failed") and r.get("config") in configs]
    if ok:
        r0 = ok[0]
        print(f"device: {r0['device']} ({r0['platform']}), precision {r0['precision']}, {steps} steps, "
              f"{time.perf_counter() - t0:.0f} s in all")
        print(f"{'config':<9} {'c0':>3} {'d':>2} {'IS':>4} {'b/GPU':>5} {'compile s':>9} {'ms/step':>8} {'img/s':>7} "
              f"{'TFLOP/s':>8} {'%peak':>6} {'loss 1st→last 10':>17} {'peak GiB':>8} {'est GiB':>8} {'meas/est':>8} "
              f"{'infer img/s':>11} {'inf TFLOP/s':>11}")
        for r in ok:
            pk = f"{r['peak_gpu_bytes'] / 2**30:.2f}" if r["peak_gpu_bytes"] else "n/a"
            ratio = f"{r['measured_over_estimate']:.2f}" if r["measured_over_estimate"] else "n/a"
            share = f"{100 * r['train_share_of_peak']:.1f}" if r["train_share_of_peak"] else "n/a"
            print(f"{r['config']:<9} {r['width']:>3} {r['depth']:>2} {r['size']:>4} {r['batch']:>5} "
                  f"{r['compile_s']:>9.1f} {r['step_ms']:>8.1f} {r['train_images_per_s']:>7.1f} "
                  f"{r['train_tflops']:>8.2f} {share:>6} {r['loss_first10']:>8.3f}→{r['loss_last10']:<8.3f} "
                  f"{pk:>8} {r['estimate_bytes'] / 2**30:>8.2f} {ratio:>8} {r['infer_images_per_s']:>11.1f} "
                  f"{r['infer_tflops']:>11.2f}")
        for r in ok:
            lv = r.get("levers") or {}
            if lv:
                print(f"  {r['config']} training levers (ms/step, % of peak): " + "; ".join(
                    f"{k} {v['ms_per_step']:.1f}" + (f" ({100 * v['share_of_peak']:.1f} %)" if v.get("share_of_peak")
                                                      else "") for k, v in lv.items()))
    if results_volume:
        r = results_volume
        ph = r["phases_s"]
        share = f"{100 * r['network_share_of_peak']:.1f} %" if r.get("network_share_of_peak") else "n/a"
        tflops = f"{r['network_tflops']:.1f}" if r.get("network_tflops") else "n/a"
        print(f"\n9-plane volume {'×'.join(map(str, r['shape']))} (MEASURED end to end), c0={r['width']} d={r['depth']}, "
              f"{r['precision']}, fused on {r['fuse_on']} ({r['why']}), batch {r['batch']}: {r['wall_s']:.1f} s "
              f"({r['wall_s'] / 60:.2f} min; paper: 20 min; aim ≤ 3 min on one H100/H200), "
              f"{r['voxels_per_s'] / 1e6:.2f} Mvoxel/s, network compilation {r.get('compile_s', 0):.1f} s "
              f"(first batch of each slice shape), non-network {r['non_network_s']:.1f} s "
              f"({100 * r['non_network_share']:.1f} %)")
        print("  phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()))
        print(f"  network: {r['network_pflop']:.2f} PFLOP in {ph['predict']:.1f} s = {tflops} TFLOP/s, {share} of the "
              f"card's dense 16-bit peak; peak GPU memory "
              f"{(r['peak_gpu_bytes'] or 0) / 2**30:.1f} GiB against the estimate "
              f"{(r['estimate_bytes'] or {}).get('total', 0) / 2**30:.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failed = [r["config"] for r in results if r.get("failed") or (r.get("config") in configs and not r.get("loss_falls"))]
    if failed:
        print(f"check FAILED for: {', '.join(failed)} (failed to run, or the loss did not fall)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
