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
SMOKE = {"baseline": dict(width=4, depth=3, size=64, batch=2), "best": dict(width=4, depth=5, size=64, batch=2)}
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


def measure(name: str, cfg: dict, *, steps: int, precision: str, infer_slices: int, slice_size: int) -> dict:
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
    for i in range(steps):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = float(np.asarray(model.train_on_batch(x, y)))  # float(): waits for the device
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if i == 0:
            t_compile = time.perf_counter() - t_compile
    timed = times[min(10, len(times) // 2):]
    step_s = statistics.median(timed)
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    est = training_memory(w, d, s, b, precision)
    flops = count_flops(w, d, s)
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
    }


def default_precision() -> str:
    import jax

    dev = jax.local_devices()[0]
    kind = getattr(dev, "device_kind", "")
    if dev.platform != "gpu":
        return "float32"  # 16-bit on CPU is slow and says nothing about a GPU
    return "mixed_float16" if "V100" in kind or "T4" in kind else "mixed_bfloat16"


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configs and few steps (CPU wiring check)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per config (default 200; smoke 80)")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on A100/H100/H200, fp16 on V100), or a policy")
    ap.add_argument("--json", type=Path, help="write all numbers here")
    ap.add_argument("--only", choices=sorted(CONFIGS), help="one config, in this process (used by the parent)")
    args = ap.parse_args(argv)
    if os.environ.get("KERAS_BACKEND") != "jax":
        print("error: run with KERAS_BACKEND=jax (the GPU machines have JAX, not TensorFlow)", file=sys.stderr)
        return 2
    steps = args.steps or (80 if args.smoke else 200)
    configs = SMOKE if args.smoke else CONFIGS
    infer = (4, 96) if args.smoke else (32, 1200)
    if args.only:
        precision = default_precision() if args.precision == "auto" else args.precision
        res = measure(args.only, configs[args.only], steps=steps, precision=precision, infer_slices=infer[0],
                      slice_size=infer[1])
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # the peak is then what the config needs
    results = []
    t0 = time.perf_counter()
    for name in configs:
        cmd = [sys.executable, __file__, "--only", name, "--steps", str(steps), "--precision", args.precision]
        cmd += ["--smoke"] if args.smoke else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{name}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            results.append({"config": name, "failed": True, "stderr": proc.stderr[-3000:]})
            continue
        results.append(json.loads(line[len("RESULT "):]))
    ok = [r for r in results if not r.get("failed")]
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
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failed = [r["config"] for r in results if r.get("failed") or not r.get("loss_falls")]
    if failed:
        print(f"check FAILED for: {', '.join(failed)} (failed to run, or the loss did not fall)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
