"""Benchmark: peak memory of data.prepare on a volume larger than the slab budget.

Writes a synthetic uint16 volume of EDGE³ voxels (default 1024³ = 2 GiB) slab by slab, then runs
``data.prepare`` in a fresh child process and reports its wall time and peak RSS next to the size
of the input and of the float32 output. Peak RSS must stay near the slab budget, not the volume.

    python benchmarks/prepare_memory.py [--edge 1024] [--slab-mb 256] [--voxel-in 5.0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from data.manifest import Sample, write_manifest  # noqa: E402
from data.volume import VolumeRef, default_chunks  # noqa: E402


def make_raw(root: Path, edge: int, voxel: float) -> None:
    rng = np.random.default_rng(0)
    shape = (edge, edge, edge)
    with h5py.File(root / "big.h5", "w") as f:
        img = f.create_dataset("image", shape, "uint16", chunks=default_chunks(shape))
        lab = f.create_dataset("label", shape, "uint8", chunks=default_chunks(shape), compression="lzf")
        for z in range(0, edge, 64):
            n = min(64, edge - z)
            img[z:z + n] = rng.integers(0, 65535, (n, edge, edge), dtype=np.uint16)
            lab[z:z + n] = (np.arange(edge)[None, :, None] * 4 // edge).astype(np.uint8)
    write_manifest(root, [Sample(id="big", image=VolumeRef(root / "big.h5", "/image"),
                                 label=VolumeRef(root / "big.h5", "/label"), voxel_size_um=voxel, alloy="Mg-5Gd",
                                 beamline="P05", implantation_days=28, label_quality="WF", split="train")])


CHILD = """
import resource, sys, time
from data.prepare import prepare_dataset
t = time.perf_counter()
prepare_dataset(sys.argv[1], sys.argv[2], slab_mb=int(sys.argv[3]))
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edge", type=int, default=1024)
    ap.add_argument("--slab-mb", type=int, default=256)
    ap.add_argument("--voxel-in", type=float, default=5.0, help="source voxel size (5.0 = no resampling)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        raw.mkdir()
        t = time.perf_counter()
        make_raw(raw, args.edge, args.voxel_in)
        made = time.perf_counter() - t
        res = subprocess.run([sys.executable, "-c", CHILD, str(raw), str(out), str(args.slab_mb)], check=True,
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        secs, rss_kb = res.stdout.split()
        with h5py.File(out / "big.h5") as f:
            out_shape = f["image"].shape
        in_gib = args.edge**3 * 2 / 2**30
        out_gib = np.prod(out_shape) * 4 / 2**30
        row = {"benchmark": "prepare_memory", "edge": args.edge, "voxel_in_um": args.voxel_in, "slab_mb": args.slab_mb,
               "input_gib": round(in_gib, 2), "output_gib": round(float(out_gib), 2), "output_shape": list(out_shape),
               "seconds": round(float(secs), 1), "peak_rss_gib": round(int(rss_kb) / 2**20, 3),
               "voxels_per_s": round(args.edge**3 / float(secs))}
        print(f"input {args.edge}³ uint16 ({in_gib:.2f} GiB, written in {made:.0f} s) -> {out_shape} float32 "
              f"({out_gib:.2f} GiB): {float(secs):.1f} s, peak RSS {int(rss_kb) / 2**20:.2f} GiB "
              f"with --slab-mb {args.slab_mb}")
        print(json.dumps(row))


if __name__ == "__main__":
    main()
