"""Benchmark: 9-plane soft voting on whole volumes, ours (slab-wise, plane files) vs the obvious way.

The model is a cheap stand-in (a lookup table from grey value to class probabilities, as the
"oracle" of tests/test_predict.py) so the numbers measure the fusing machinery, not a network.

- ours: ``model.inference.predict_plane`` for the 9 planes + ``fuse_planes`` (soft vote), volume
  and probabilities streamed through HDF5, uint8 plane files.
- baseline: ``scipy.ndimage.rotate`` of the whole volume per rotation axis, one float32
  probability volume per plane kept in memory, rotated back with ``scipy.ndimage.rotate`` and
  cropped, averaged, argmax.

Each case runs in a fresh child process; its wall time and peak RSS (ru_maxrss) are reported.

    python benchmarks/fusion.py [--sizes 256 512 768] [--baseline-sizes 256] [--dir /tmp/fusion-bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

_K = np.arange(4, dtype=np.float32)
_X = np.arange(256, dtype=np.float32) / 255.0
_LOGITS = -((_X[:, None] * 3 - _K) ** 2) * 8
LUT = (np.exp(_LOGITS - _LOGITS.max(1, keepdims=True)) / np.exp(_LOGITS - _LOGITS.max(1, keepdims=True)).sum(1, keepdims=True)).astype(np.float32)


def stand_in(slices: np.ndarray) -> np.ndarray:
    """Grey value → class probabilities by table lookup: costs far less than the fusing around it."""
    idx = np.clip(np.rint(np.asarray(slices, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return LUT[idx]


def make_volume(path: Path, n: int) -> None:
    """An N³ float32 phantom (labels / 3): a ball, a box and a rod, written slab by slab."""
    with h5py.File(path, "w") as f:
        img = f.create_dataset("image", (n, n, n), np.float32, chunks=(32, 32, 32))
        lab = f.create_dataset("label", (n, n, n), np.uint8, chunks=(32, 32, 32), compression="lzf")
        y, x = np.indices((n, n))
        c = n / 2
        for z0 in range(0, n, 32):
            z = np.arange(z0, min(z0 + 32, n))[:, None, None]
            v = np.zeros((len(z), n, n), np.uint8)
            v[(z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2 < (0.4 * n) ** 2] = 1
            v[(abs(z - c) < 0.2 * n) & (abs(y - c - 3) < 0.15 * n) & (abs(x - c + 2) < 0.3 * n)] = 2
            v[((y - c - 2) ** 2 + (x - c + 1) ** 2 < (0.12 * n) ** 2) & (abs(z - c) < 0.35 * n)] = 3
            lab[z0:z0 + len(z)] = v
            img[z0:z0 + len(z)] = v / 3.0


def run_ours(vol: Path, work: Path) -> dict:
    from data.volume import VolumeRef
    from model.fuse import fuse_planes
    from model.inference import Source, predict_plane
    from model.planes import PLANE_SETS

    ref = VolumeRef(vol, "/image")
    with h5py.File(vol) as f:
        shape = tuple(f["image"].shape)
    src = Source(ref, shape)
    t0 = time.perf_counter()
    files = [predict_plane(src, p, stand_in, work / f"{p}.h5", model_id="lut", batch_size=8, tmp_dir=work,
                           progress=False) for p in PLANE_SETS["9"]]
    t_planes = time.perf_counter() - t0
    fuse_planes(files, work / "ours.h5", method="soft", progress=False)
    return {"seconds": time.perf_counter() - t0, "planes_s": t_planes, "out": str(work / "ours.h5")}


def run_baseline(vol: Path, work: Path) -> dict:
    from scipy.ndimage import rotate

    from data.rotation import other_axes
    from model.planes import PLANE_SETS, PLANES

    t0 = time.perf_counter()
    with h5py.File(vol) as f:
        v = f["image"][...]
    n = v.shape

    def predict_volume(volume: np.ndarray, axis: int) -> np.ndarray:
        moved = np.moveaxis(volume, axis, 0)
        return np.moveaxis(np.stack([stand_in(moved[i]) for i in range(moved.shape[0])]), 0, axis)

    probs = []
    rotated: dict[int, np.ndarray] = {}
    for name in PLANE_SETS["9"]:
        p = PLANES[name]
        if not p.rotated:
            probs.append(predict_volume(v, p.slice_axis))
            continue
        a = p.rotation_axis
        b, c = other_axes(a)
        if a not in rotated:
            rotated = {a: rotate(v, 45, axes=(b, c), reshape=True, order=1, mode="constant", cval=0.0)}
        pr = predict_volume(rotated[a], p.slice_axis)
        back = np.stack([rotate(pr[..., k], -45, axes=(b, c), reshape=True, order=1) for k in range(4)], -1)
        crop = [slice(None)] * 3
        for ax in (b, c):
            off = (back.shape[ax] - n[ax]) // 2
            crop[ax] = slice(off, off + n[ax])
        probs.append(np.ascontiguousarray(back[tuple(crop)]))
    labels = np.argmax(np.mean(probs, axis=0), axis=-1).astype(np.uint8)
    with h5py.File(work / "baseline.h5", "w") as f:
        f["labels"] = labels
    return {"seconds": time.perf_counter() - t0, "out": str(work / "baseline.h5")}


def peak_rss_bytes() -> int:
    """VmHWM of this process: ru_maxrss can carry the parent's peak over a fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> None:
    fn = run_ours if args.child == "ours" else run_baseline
    res = fn(Path(args.volume), Path(args.work))
    res["max_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(res))


def measure(kind: str, vol: Path, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--volume", str(vol), "--work", str(work)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def iou_against_truth(vol: Path, labels_path: str) -> float:
    from model.evaluation import confusion_matrix, iou_metrics

    cm = 0
    with h5py.File(vol) as f, h5py.File(labels_path) as g:
        for z in range(0, f["label"].shape[0], 64):
            cm = cm + confusion_matrix(f["label"][z:z + 64], g["labels"][z:z + 64])
    return iou_metrics(cm)["mean_iou"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768])
    ap.add_argument("--baseline-sizes", type=int, nargs="*", default=[256])
    ap.add_argument("--dir", type=Path, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--volume", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    root = args.dir or Path(tempfile.mkdtemp(prefix="fusion-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in sorted(set(args.sizes) | set(args.baseline_sizes)):
            vol = root / f"vol{n}.h5"
            make_volume(vol, n)
            kinds = (["baseline"] if n in args.baseline_sizes else []) + (["ours"] if n in args.sizes else [])
            for kind in kinds:
                res = measure(kind, vol, root / f"{kind}{n}")
                res.update(size=n, kind=kind)
                if "out" in res:
                    res["mean_iou"] = iou_against_truth(vol, res["out"])
                rows.append(res)
                print(json.dumps(res), flush=True)
                shutil.rmtree(root / f"{kind}{n}", ignore_errors=True)
            vol.unlink()
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'size':>5} {'method':>9} {'seconds':>9} {'Mvox/s':>7} {'peak RSS GiB':>13} {'B/voxel':>8} {'mean IoU':>9}")
    base = {r["size"]: r for r in rows if r["kind"] == "baseline" and "seconds" in r}
    for r in rows:
        if "seconds" not in r:
            print(f"{r['size']:>5} {r['kind']:>9} failed: {r.get('error')}")
            continue
        vox = r["size"] ** 3
        print(f"{r['size']:>5} {r['kind']:>9} {r['seconds']:>9.1f} {vox / r['seconds'] / 1e6:>7.2f} "
              f"{r['max_rss_bytes'] / 2**30:>13.2f} {r['max_rss_bytes'] / vox:>8.1f} {r['mean_iou']:>9.4f}")
    for n, b in base.items():
        o = next((r for r in rows if r["size"] == n and r["kind"] == "ours" and "seconds" in r), None)
        if o:
            print(f"at {n}³: ours is {b['seconds'] / o['seconds']:.1f}× faster and uses "
                  f"{b['max_rss_bytes'] / o['max_rss_bytes']:.1f}× less peak memory than the baseline")
    ours = {r["size"]: r for r in rows if r["kind"] == "ours" and "seconds" in r}
    if len(ours) > 1:
        lo, hi = min(ours), max(ours)
        print(f"peak RSS {hi}³ / {lo}³ = {ours[hi]['max_rss_bytes'] / ours[lo]['max_rss_bytes']:.2f} "
              f"(volume ratio {(hi / lo) ** 3:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
