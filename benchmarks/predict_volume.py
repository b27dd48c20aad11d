"""Whole-volume prediction with a real U-net (c0=32, d=3, random weights), split by phase, path beside path.

    .venv/bin/python benchmarks/predict_volume.py                       # 256³, 9 planes: files vs host, U-net + identity
    .venv/bin/python benchmarks/predict_volume.py --sizes 128 --planes 3 9 --paths files host device
    .venv/bin/python benchmarks/predict_volume.py --scaling --sizes 256  # rotations only, 1 vs 2 cores

Each (size, planes, path, network) runs in a fresh process (peak RSS is that run's alone) through
``model.predict.run_prediction`` exactly as ``python -m model.predict --fuse-on PATH`` runs it: ``files`` (plane
files, then the fuse step), ``host`` (model.resident in RAM), ``device`` (model.resident_device on the Keras
backend's device: the CPU here). It reports seconds per phase (read, rotate, predict, rotate back, fuse, write;
summed over threads, so they can add up to more than the wall time), the wall time, the NON-NETWORK seconds
(wall − predict), voxels/s, peak RSS above the process's RSS before the prediction, and the path's memory
estimate (model.resident.estimate_memory). ``--networks identity`` swaps the U-net for a 1×1 convolution: what is
left is the pipeline's own ceiling (voxels/s of everything that is not the network). The summary prints, per
size and planes, the host path's non-network seconds against the file path's (the aim: at most 1/3).
``--scaling`` times the rotate + rotate-back of one rotated plane with a trivial predictor, on 1 and
on 2 cores (``os.sched_setaffinity`` + that many worker threads): the CPU interpolation's scaling.
Random weights: the network's cost does not depend on them (the labels are meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("read", "rotate", "predict", "rotate_back", "fuse", "write")


def make_volume(path: Path, n: int) -> None:
    """Smooth random structure in [0, 1], chunked like a prepared volume."""
    import h5py
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(n)
    low = ndimage.zoom(rng.random((n // 8 + 1,) * 3).astype(np.float32), 8, order=1)[:n, :n, :n]
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.clip(low, 0, 1), chunks=(32, 32, 32), compression="lzf")


def child(args) -> dict:
    import numpy as np

    from data.volume import VolumeRef
    from model.inference import Source, predict_plane
    from model.rotate import CpuRotation
    from model.streaming import PhaseTimes

    n, work = args.size, Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = Source(VolumeRef(Path(args.volume), "/image"), (n, n, n))
    times = PhaseTimes()
    if args.child == "scaling":
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.workers]))

        def trivial(slices):  # no network: only the interpolation and I/O are timed
            p = np.zeros(slices.shape + (4,), np.float32)
            p[..., 0] = 1.0
            return p

        rotation = CpuRotation(args.workers)
        t0 = time.perf_counter()
        predict_plane(src, "cp_r0", trivial, work / "cp_r0.h5", model_id="trivial", progress=False, tmp_dir=work,
                      rotation=rotation, workers=args.workers, times=times)
        wall = time.perf_counter() - t0
        return {"kind": "scaling", "size": n, "workers": args.workers, "wall_s": wall, **times.seconds,
                "rotate_wall_s": times.seconds["rotate"] + times.seconds["rotate_back"]}
    import keras
    import psutil

    from model.predict import run_prediction
    from model.unet import build_unet

    keras.utils.set_random_seed(0)
    if args.network == "identity":  # the pipeline without a network: one 1×1 convolution to 4 classes
        inp = keras.Input((None, None, 1))
        model = keras.Model(inp, keras.layers.Conv2D(4, 1, name="logits")(inp))
    else:
        model = build_unet(32, 3)
    rss0 = psutil.Process().memory_info().rss
    info: dict = {}
    t0 = time.perf_counter()
    run_prediction("bench", src.ref, work / "seg.h5", planes=args.planes, model=(model, f"bench-{args.network}"),
                   batch_size=args.batch_size, progress=False, workers=args.workers, rotate_on=args.rotate_on,
                   times=times, fuse_on=args.path, info=info, work_dir=work / "planes", values_checked=True)
    wall = time.perf_counter() - t0
    return {"kind": "predict", "size": n, "planes": args.planes, "workers": args.workers, "path": info.get("fuse_on"),
            "network": args.network, "batch_size": info.get("batch_size"), "wall_s": wall, **times.seconds,
            "non_network_s": wall - times.seconds["predict"], "voxels_per_s": n ** 3 / wall,
            "non_network_share": 1 - times.seconds["predict"] / wall, "rss_before_bytes": rss0,
            "estimate_bytes": (info.get("estimate_bytes") or {}).get("total")}


def run_child(kind: str, vol: Path, work: Path, n: int, planes: str, workers: int, args, path: str = "files",
              network: str = "unet") -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--volume", str(vol), "--work", str(work), "--size", str(n),
           "--planes-one", planes, "--workers-one", str(workers), "--rotate-on", args.rotate_on,
           "--batch-size", str(args.batch_size), "--path-one", path, "--network-one", network]
    out = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(work, ignore_errors=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if out.returncode or line is None:
        return {"kind": kind, "size": n, "planes": planes, "workers": workers, "path": path, "network": network,
                "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256])
    ap.add_argument("--planes", nargs="+", default=["9"], choices=["3", "9"])
    ap.add_argument("--workers", type=int, nargs="+", default=[len(os.sched_getaffinity(0))])
    ap.add_argument("--rotate-on", default="auto", choices=["auto", "cpu", "device"])
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--paths", nargs="+", default=["files", "host"], choices=["files", "host", "device"],
                    help="fuse paths side by side (model.predict --fuse-on)")
    ap.add_argument("--networks", nargs="+", default=["unet", "identity"], choices=["unet", "identity"],
                    help="the U-net, and/or a 1×1 convolution (the pipeline's ceiling without a network)")
    ap.add_argument("--scaling", action="store_true", help="rotations only, on 1 and 2 cores")
    ap.add_argument("--repeat", type=int, default=5,
                    help="--scaling: runs per core count, alternating; the fastest counts (a shared VM is noisy)")
    ap.add_argument("--dir", type=Path, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, help="write all rows here")
    ap.add_argument("--child", choices=["predict", "scaling"], help=argparse.SUPPRESS)
    ap.add_argument("--volume", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--planes-one", dest="planes_one", help=argparse.SUPPRESS)
    ap.add_argument("--workers-one", dest="workers_one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--path-one", dest="path", help=argparse.SUPPRESS)
    ap.add_argument("--network-one", dest="network", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.planes, args.workers = args.planes_one, args.workers_one
        res = child(args)
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    root = args.dir or Path(tempfile.mkdtemp(prefix="predict-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.sizes:
            vol = root / f"vol{n}.h5"
            make_volume(vol, n)
            jobs = ([("scaling", "9", w, "files", "none") for _ in range(max(1, args.repeat)) for w in (1, 2)]
                    if args.scaling else [("predict", p, w, path, net) for p in args.planes for w in args.workers
                                          for net in args.networks for path in args.paths])
            best: dict = {}
            for kind, planes, w, path, net in jobs:
                res = run_child(kind, vol, root / f"work{n}_{planes}_{w}_{path}_{net}", n, planes, w, args, path, net)
                print(json.dumps(res), flush=True)
                if kind != "scaling":
                    rows.append(res)
                elif "error" in res or res["wall_s"] < best.get(w, {"wall_s": float("inf")}).get("wall_s", 0.0):
                    best[w] = res
            rows.extend(best[w] for w in sorted(best))
            vol.unlink()
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    ok = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            print(f"{r['size']}³ {r.get('planes')} planes, {r['workers']} workers: FAILED: {r['error']}")
    if args.scaling:
        print(f"\n{'size':>5} {'cores':>5} {'rotate s':>9} {'rotate back s':>13} {'wall s':>7} {'Mvox/s rot':>10}")
        for r in ok:
            print(f"{r['size']:>5} {r['workers']:>5} {r['rotate']:>9.2f} {r['rotate_back']:>13.2f} {r['wall_s']:>7.2f} "
                  f"{r['size'] ** 3 / r['rotate_wall_s'] / 1e6:>10.1f}")
        by = {(r["size"], r["workers"]): r for r in ok}
        for n in args.sizes:
            if (n, 1) in by and (n, 2) in by:
                a, b = by[(n, 1)], by[(n, 2)]
                print(f"{n}³: 1 → 2 cores, rotate + rotate back {a['rotate_wall_s'] / b['rotate_wall_s']:.2f}×, "
                      f"whole plane task {a['wall_s'] / b['wall_s']:.2f}×, plane task without the stand-in network "
                      f"(wall − predict: interpolation, I/O, casts) "
                      f"{(a['wall_s'] - a['predict']) / (b['wall_s'] - b['predict']):.2f}×")
    else:
        print(f"\n{'size':>5} {'planes':>6} {'path':>6} {'network':>8} {'batch':>5} "
              + " ".join(f"{p:>11}" for p in PHASES)
              + f" {'wall s':>8} {'non-net s':>9} {'Mvox/s':>7} {'peak GiB':>8} {'est GiB':>7}")
        for r in ok:
            peak = (r["peak_rss_bytes"] - r["rss_before_bytes"]) / 2**30
            est = f"{r['estimate_bytes'] / 2**30:>7.2f}" if r.get("estimate_bytes") else f"{'-':>7}"
            print(f"{r['size']:>5} {r['planes']:>6} {r['path']:>6} {r['network']:>8} {str(r['batch_size']):>5} "
                  + " ".join(f"{r[p]:>11.1f}" for p in PHASES)
                  + f" {r['wall_s']:>8.1f} {r['non_network_s']:>9.1f} {r['voxels_per_s'] / 1e6:>7.3f} {peak:>8.2f} {est}")
        by = {(r["size"], r["planes"], r["path"], r["network"]): r for r in ok}
        for n in args.sizes:
            for planes in args.planes:
                for path in [p for p in args.paths if p != "files"]:
                    f, h = by.get((n, planes, "files", "unet")), by.get((n, planes, path, "unet"))
                    if f and h:
                        print(f"{n}³ {planes} planes, U-net: {path} non-network {h['non_network_s']:.1f} s vs files "
                              f"{f['non_network_s']:.1f} s = {h['non_network_s'] / f['non_network_s']:.2f} "
                              f"(aim ≤ 0.33); wall {h['wall_s']:.1f} vs {f['wall_s']:.1f} s "
                              f"({f['wall_s'] / h['wall_s']:.2f}× faster)")
                    f, h = by.get((n, planes, "files", "identity")), by.get((n, planes, path, "identity"))
                    if f and h:
                        print(f"{n}³ {planes} planes, identity network (pipeline ceiling): {path} "
                              f"{h['voxels_per_s'] / 1e6:.2f} Mvoxel/s vs files {f['voxels_per_s'] / 1e6:.2f} "
                              f"({f['wall_s'] / h['wall_s']:.2f}×)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
