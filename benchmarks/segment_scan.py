"""Time per sample of ``python -m analysis.segment`` (issue 22; the paper's yardstick: ~20 min per scan), and the
gain of the fold ensemble over single fold models on a scan with a reference label (docs/benchmarks.md).

    .venv/bin/python benchmarks/segment_scan.py --tracking-uri sqlite:///demo/work/mlflow.db \\
        --experiment scaling-unet-table2 --scan demo/work/data/synthetic-64-seed0-dl2.5-n14-3/raw/synth15.h5

Takes the best config's FINISHED fold runs of ``--experiment`` (highest mean IoU over all folds), segments the raw
scan once with each fold model alone and once with their ensemble (9 planes, soft vote), and prints, per arm, the
seconds per phase, minutes per sample and, against the scan's ``--label`` dataset, the IoU per class (Eq. 6) and the
implant measures. ``--upsample N`` first writes the scan N× larger per axis at voxel/N (nearest neighbour), so the
same models segment a bigger raw scan: the time per sample at a larger size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = ("bone", "degradation_layer", "residual_material")


def best_fold_runs(uri: str, experiment: str) -> tuple[str, list[str]]:
    """(config key, run ids by fold) of the config with the highest mean IoU over its FINISHED folds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000)
    by_key: dict[str, dict[int, tuple[float, str]]] = {}
    for r in runs:
        if "fold" in r.data.tags and "mean_iou" in r.data.metrics:
            by_key.setdefault(r.data.tags["config_key"], {})[int(r.data.tags["fold"])] = (r.data.metrics["mean_iou"],
                                                                                       r.info.run_id)
    key = max(by_key, key=lambda k: (len(by_key[k]), statistics.mean(v for v, _ in by_key[k].values())))
    return key, [by_key[key][f][1] for f in sorted(by_key[key])]


def iou(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Eq. 6 per foreground class."""
    out = {}
    for c, name in enumerate(CLASSES, start=1):
        a, b = labels == c, truth == c
        union = np.logical_or(a, b).sum()
        out[name] = float(np.logical_and(a, b).sum() / union) if union else float("nan")
    out["mean"] = float(np.nanmean(list(out.values())))
    return out


def upsampled(scan: Path, label: str, n: int, folder: Path) -> Path:
    """The scan and its label n× per axis (nearest), at voxel/n: a bigger raw scan of the same explant."""
    with h5py.File(scan, "r") as f:
        vs = float(f.attrs.get("voxel_size_um", f["image"].attrs.get("voxel_size_um", 5.0)))
        img, lab = f["image"][...], f[label][...]
    out = folder / f"{scan.stem}_x{n}.h5"
    with h5py.File(out, "w") as f:
        for name, a in (("image", img), (label, lab)):
            f.create_dataset(name, data=a.repeat(n, 0).repeat(n, 1).repeat(n, 2), chunks=True)
        f.attrs["voxel_size_um"] = vs / n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--scan", required=True, type=Path)
    ap.add_argument("--label", default="label_hq")
    ap.add_argument("--planes", default="9")
    ap.add_argument("--upsample", type=int, default=1)
    ap.add_argument("--single-folds", action="store_true", help="also segment with each fold model alone")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    from analysis.segment import segment_scan
    from data.volume import volume_ref

    key, run_ids = best_fold_runs(args.tracking_uri, args.experiment)
    specs = [f"runs:/{r}/model" for r in run_ids]
    with tempfile.TemporaryDirectory(prefix="segment-bench-") as tmp:
        scan = upsampled(args.scan, args.label, args.upsample, Path(tmp)) if args.upsample > 1 else args.scan
        with h5py.File(args.scan, "r") as f:
            attrs = dict(f.attrs)
        measures_kw = {k: float(attrs[k]) for k in ("initial_volume_mm3", "initial_surface_mm2") if k in attrs}
        if "implantation_days" in attrs:
            measures_kw["days"] = float(attrs["implantation_days"])
        arms = [("ensemble", specs)] + ([(f"fold{i}", [s]) for i, s in enumerate(specs)] if args.single_folds else [])
        results = {"config_key": key, "scan": args.scan.name, "upsample": args.upsample, "arms": {}}
        for name, models in arms:
            t0 = time.perf_counter()
            out = Path(tmp) / name
            report = segment_scan(volume_ref(str(scan)), models, out, tracking_uri=args.tracking_uri,
                                  planes=args.planes, progress=False, **measures_kw)
            wall = time.perf_counter() - t0
            with h5py.File(out / "segmentation.h5", "r") as f, h5py.File(scan, "r") as g:
                labels, truth = f["labels"][...], g[args.label][...]
            if labels.shape != truth.shape:  # the prepared grid differs from the raw one: compare on the label's grid
                idx = [np.minimum((np.arange(n) * labels.shape[a] / n).astype(int), labels.shape[a] - 1)
                       for a, n in enumerate(truth.shape)]
                labels = labels[np.ix_(*idx)]
            results["arms"][name] = {"wall_s": round(wall, 2), "seconds": report["seconds"],
                                     "minutes_per_sample": report["minutes_per_sample"],
                                     "prepared_shape": report["prepared"]["shape"], "iou": iou(labels, truth),
                                     "measures": {k: report["measures"][k] for k in
                                                  ("dr_mm_per_year", "bic_percent", "bv_tv_percent")}}
            r = results["arms"][name]
            print(f"{name:9s} {r['wall_s']:7.1f} s  prepared {r['prepared_shape']}  mean IoU {r['iou']['mean']:.4f}  "
                  + "  ".join(f"{c} {r['iou'][c]:.4f}" for c in CLASSES)
                  + "  phases " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
