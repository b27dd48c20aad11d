"""Benchmark: implant measures (analysis.measures) on N³ label volumes: wall time and peak RSS.

A synthetic label volume like model.predict writes it (HDF5 ``labels``, uint8, 32³ chunks, gzip) is
generated slab by slab into a temporary file, never held in RAM as a whole: an implant cylinder
along z (RM core, DL shell, caps inside the volume), a bone shell around it with gaps (~2/3 of the
angles) and a trabecular-like bone pattern further out. ``implant_measures`` then runs in a fresh
child process, which reports its wall time and its peak RSS after the imports and after the
measures, so the numbers are those of the measures alone and not of the generator. Peak RSS is
VmHWM of /proc/self/status (the exec'ed image's own high-water mark; ru_maxrss can carry the
parent's peak across fork + exec), ru_maxrss where /proc is missing.

    python benchmarks/measures.py [--size 1000 [512 ...]] [--slab 64] [--voxel-size-um 5] [--roi-um 100]
                                  [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

GEN_SLAB = 32


def make_labels(path: Path, n: int) -> None:
    """The phantom, written 32 slices at a time (memory: a few N² × 32 arrays)."""
    c = (n - 1) / 2 + 0.3
    y, x = np.ogrid[:n, :n]
    rr = np.hypot(y - c, x - c)
    phi = np.arctan2(y - c, x - c)
    r_rm, r_o = 0.10 * n, 0.15 * n
    shell = (rr > r_o) & (rr <= 0.19 * n) & (np.sin(3 * phi) > -0.5)  # contact on ~2/3 of the angles
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("labels", (n, n, n), np.uint8, chunks=(32, 32, 32), compression="gzip")
        for z0 in range(0, n, GEN_SLAB):
            z = np.arange(z0, min(n, z0 + GEN_SLAB), dtype=np.float64)[:, None, None]
            trabecular = (np.sin(x * 0.21 + z * 0.13) * np.sin(y * 0.17 - z * 0.11) > 0.35) & (rr <= 0.4 * n)
            in_z = np.abs(z - n / 2) <= 0.35 * n
            lab = np.zeros((len(z), n, n), np.uint8)
            lab[trabecular] = 1
            lab[np.broadcast_to(shell, lab.shape) & (np.abs(z - n / 2) <= 0.40 * n)] = 1
            lab[(rr <= r_o) & in_z] = 2
            lab[(rr <= r_rm) & in_z] = 3
            ds[z0:z0 + len(z)] = lab


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import h5py
from analysis.measures import implant_measures

def peak_kib():
    # VmHWM: this process image's own peak; ru_maxrss may carry the parent's peak across fork + exec
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

rss0 = peak_kib()
t0 = time.perf_counter()
with h5py.File(sys.argv[2], "r") as f:
    res = implant_measures(f["labels"], voxel_size_um=float(sys.argv[3]), roi_um=float(sys.argv[4]),
                           initial_volume_mm3=1.0, initial_surface_mm2=5.0, days=56, slab=int(sys.argv[5]))
res["seconds"] = time.perf_counter() - t0
res["rss_after_imports_mib"] = rss0 / 1024
res["peak_rss_mib"] = peak_kib() / 1024
print(json.dumps(res))
"""


def measure(path: Path, *, voxel_size_um: float, roi_um: float, slab: int) -> dict[str, tp.Any]:
    cmd = [sys.executable, "-c", CHILD, str(REPO), str(path), str(voxel_size_um), str(roi_um), str(slab)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: measuring {path} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, nargs="+", default=[1000], help="edge N of the N³ volume (default: 1000)")
    ap.add_argument("--slab", type=int, default=64, help="slices per slab (default: %(default)s)")
    ap.add_argument("--voxel-size-um", type=float, default=5.0)
    ap.add_argument("--roi-um", type=float, default=100.0)
    ap.add_argument("--dir", type=Path, default=None, help="where the temporary volume goes (default: system temp)")
    args = ap.parse_args(argv)
    rows = []
    for n in args.size:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="measures-bench-") as tmp:
            path = Path(tmp) / f"labels_{n}.h5"
            t0 = time.perf_counter()
            make_labels(path, n)
            gen_s = time.perf_counter() - t0
            res = measure(path, voxel_size_um=args.voxel_size_um, roi_um=args.roi_um, slab=args.slab)
            rows.append((n, n ** 3 / 2 ** 30, path.stat().st_size / 2 ** 20, gen_s, res))
            print(f"N={n}: generated in {gen_s:.0f} s, measured in {res['seconds']:.1f} s, "
                  f"peak RSS {res['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    print(f"implant_measures, slab {args.slab}, voxel {args.voxel_size_um:g} µm, ROI {args.roi_um:g} µm "
          f"(halo {int(args.roi_um / args.voxel_size_um) + 1} slices); child process, peak RSS = VmHWM")
    print("| N | volume GiB | file MiB (gzip) | measures s | peak RSS MiB | RSS after imports MiB | BIC % | BV/TV % |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, gib, mib, _, r in rows:
        print(f"| {n} | {gib:.3f} | {mib:.1f} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['rss_after_imports_mib']:.0f} | {r['bic_percent']:.2f} | {r['bv_tv_percent']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
