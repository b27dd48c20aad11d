"""Benchmark: training ms/step and images/s of the paper's U-net, on any Keras 3 backend.

On this CPU (TensorFlow backend, float32):

    python benchmarks/train_step.py --preset cpu

On a GPU machine (no TensorFlow needed; the model is pure Keras 3):

    KERAS_BACKEND=jax python benchmarks/train_step.py --preset gpu

``cpu``: a tiny config (c0=8, d=3, 128², batch 4) and the paper's baseline (c0=32, d=3, 384²,
batch 2; batch 32 would take minutes per step here). ``gpu``: the baseline (c0=32, d=3, 384²)
at the paper's global batch 32 and the best compound config (c0=64, d=5, 640²) at batch 16, with
mixed_float16. Data are random tensors already in device memory, so this times the model alone.
Each row: warm-up steps (compilation) excluded, then the median over timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from model.complexity import count_flops, count_params  # noqa: E402
from model.unet import build_unet  # noqa: E402

PRESETS = {
    "cpu": [dict(name="tiny", width=8, depth=3, size=128, batch=4, precision="float32"),
            dict(name="baseline", width=32, depth=3, size=384, batch=2, precision="float32")],
    "gpu": [dict(name="baseline", width=32, depth=3, size=384, batch=32, precision="mixed_float16"),
            dict(name="best compound", width=64, depth=5, size=640, batch=16, precision="mixed_float16")],
}


def time_config(width: int, depth: int, size: int, batch: int, precision: str, steps: int, warmup: int) -> dict:
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    model = build_unet(width, depth)
    model.compile(optimizer=keras.optimizers.Adam(3e-4), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 1), dtype=np.float32)
    y = rng.integers(0, 4, (batch, size, size)).astype(np.int32)
    for _ in range(warmup):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model.train_on_batch(x, y)
        float(np.asarray(loss if not isinstance(loss, (list, tuple)) else loss[0]))  # waits for the device
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    flops = count_flops(width, depth, size)
    return {"width": width, "depth": depth, "input_size": size, "batch": batch, "precision": precision,
            "params": count_params(width, depth), "gflops_per_image": round(flops / 1e9, 2),
            "ms_per_step": round(ms, 1), "images_per_s": round(batch / (ms / 1000), 2),
            # training ≈ 3× forward FLOPs (forward + two backward products)
            "train_tflops_per_s": round(3 * flops * batch / (ms / 1000) / 1e12, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, preset {args.preset}")
    print(f"{'config':<14} {'c0':>4} {'d':>2} {'IS':>4} {'batch':>5} {'precision':>14} {'ms/step':>9} {'img/s':>8}")
    rows = []
    for cfg in PRESETS[args.preset]:
        row = {"name": cfg["name"], **time_config(cfg["width"], cfg["depth"], cfg["size"], cfg["batch"],
                                                  cfg["precision"], args.steps, args.warmup)}
        rows.append(row)
        print(f"{row['name']:<14} {row['width']:>4} {row['depth']:>2} {row['input_size']:>4} {row['batch']:>5} "
              f"{row['precision']:>14} {row['ms_per_step']:>9.1f} {row['images_per_s']:>8.2f}", flush=True)
    print(json.dumps({"benchmark": "train_step", "backend": keras.backend.backend(), "rows": rows}))


if __name__ == "__main__":
    main()
