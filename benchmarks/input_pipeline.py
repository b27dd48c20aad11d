"""Benchmark: training patches per second per core, full augmentation chain, at 384², 512² and 640².

Compares the project's tf.data pipeline (one composed warp per patch, data/pipeline.py) with the
obvious per-sample NumPy/SciPy loop (zoom, flip, ndimage.rotate, Simard elastic map_coordinates,
brightness/contrast), both reading slices from the same chunked HDF5 volume, in the same run.
The process is pinned to ONE core, so the numbers are patches/s per core.

    python benchmarks/input_pipeline.py [--slice 1024] [--depth 64] [--patches 60]

Aim (issue #2): >= 25 patches/s per core at 640², so 8 cores keep a 4×V100 node fed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy import ndimage  # noqa: E402

tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)

from data.manifest import Sample, load_dataset, write_manifest  # noqa: E402
from data.pipeline import AugmentConfig, training_dataset  # noqa: E402
from data.slicing import random_training_slices  # noqa: E402
from data.volume import VolumeRef, default_chunks  # noqa: E402


def make_volume(root: Path, depth: int, size: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    shape = (depth, size, size)
    with h5py.File(root / "v.h5", "w") as f:
        img = f.create_dataset("image", shape, "float32", chunks=default_chunks(shape))
        lab = f.create_dataset("label", shape, "uint8", chunks=default_chunks(shape), compression="lzf")
        for z in range(0, depth, 16):
            block = ndimage.gaussian_filter(rng.random((min(16, depth - z), size, size), np.float32), 3)
            img[z:z + 16] = block
            lab[z:z + 16] = np.digitize(block, np.quantile(block, [0.4, 0.6, 0.8])).astype(np.uint8)
    s = Sample(id="bench", image=VolumeRef(root / "v.h5", "/image"), label=VolumeRef(root / "v.h5", "/label"),
               voxel_size_um=5.0, alloy="Mg-5Gd", beamline="P05", implantation_days=28, label_quality="WF", split="train")
    write_manifest(root, [s])
    return list(load_dataset(root).train)


def naive_patch(img: np.ndarray, lab: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The obvious implementation, one SciPy call per paper augmentation step."""
    h, w = img.shape
    area = rng.uniform(0.85, 1.0) * h * w
    aspect = rng.uniform(3 / 4, 4 / 3)
    ch, cw = min(h, int(np.sqrt(area / aspect))), min(w, int(np.sqrt(area * aspect)))
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img, lab = img[y0:y0 + ch, x0:x0 + cw], lab[y0:y0 + ch, x0:x0 + cw]
    img = ndimage.zoom(img, (size / ch, size / cw), order=1)[:size, :size]
    lab = ndimage.zoom(lab, (size / ch, size / cw), order=0)[:size, :size]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    angle = rng.uniform(-90, 90)
    img = ndimage.rotate(img, angle, reshape=False, order=1)
    lab = ndimage.rotate(lab, angle, reshape=False, order=0)
    dy = ndimage.gaussian_filter(rng.standard_normal(img.shape), size / 12) * size * 0.2
    dx = ndimage.gaussian_filter(rng.standard_normal(img.shape), size / 12) * size * 0.2
    yy, xx = np.meshgrid(np.arange(img.shape[0]), np.arange(img.shape[1]), indexing="ij")
    coords = np.array([yy + dy, xx + dx])
    img = ndimage.map_coordinates(img, coords, order=1)
    lab = ndimage.map_coordinates(lab, coords, order=0)
    img = (img - img.mean()) * rng.uniform(0.8, 1.2) + img.mean() + rng.uniform(-0.1, 0.1)
    return img.astype(np.float32), lab


def time_naive(samples, size: int, n: int) -> float:
    rng = np.random.default_rng(0)
    stream = random_training_slices(samples, seed=0, planes=("rc",))
    for _ in range(2):
        naive_patch(*next(stream), size, rng)
    t0 = time.perf_counter()
    for _ in range(n):
        naive_patch(*next(stream), size, rng)
    return n / (time.perf_counter() - t0)


def time_pipeline(samples, size: int, n: int, batch: int = 8) -> float:
    ds = training_dataset(samples, AugmentConfig(input_size=size), batch_size=batch, seed=0, planes=("rc",),
                          num_parallel_calls=1)
    it = iter(ds)
    for _ in range(2):
        next(it)
    steps = max(1, n // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        x.numpy()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slice", type=int, default=1024, help="slice edge of the benchmark volume (paper ~1200)")
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--patches", type=int, default=64)
    ap.add_argument("--naive-patches", type=int, default=12)
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 512, 640])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_volume(Path(tmp), args.depth, args.slice)
        print(f"volume {args.depth}x{args.slice}x{args.slice} float32, slices {args.slice}², 1 core "
              f"(affinity {sorted(os.sched_getaffinity(0))}), TensorFlow {tf.__version__}")
        print(f"{'input':>7} {'pipeline p/s/core':>18} {'naive p/s/core':>15} {'speed-up':>9}")
        rows = []
        for size in args.sizes:
            fast = time_pipeline(samples, size, args.patches)
            slow = time_naive(samples, size, args.naive_patches)
            rows.append({"input_size": size, "pipeline_patches_per_s_per_core": round(fast, 2),
                         "naive_patches_per_s_per_core": round(slow, 2), "speedup": round(fast / slow, 2)})
            print(f"{size:>6}² {fast:>18.1f} {slow:>15.2f} {fast / slow:>8.1f}×", flush=True)
        print(json.dumps({"benchmark": "input_pipeline", "slice": args.slice, "rows": rows}))


if __name__ == "__main__":
    main()
