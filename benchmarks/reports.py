"""Benchmark: building all reports (Fig. 3, Table 2, Table 3, Pareto, missing runs) from a full sweep's MLflow runs.

Fills a fresh sqlite store with 192 training fold runs (48 compound configs × 4 folds, plausible metrics,
~70 params each like a real run), 12 Optuna trials (fold 0), and 28 fusing runs (7 methods × 4 folds of
one config; the avr_3 runs carry a ``predictions.json`` that points to stub prediction files of 3 small
test samples). Then times, each ``--repeat`` times:

- reading the runs (``analysis.store.read_runs``: one paginated ``search_runs`` over both experiments),
- building everything in-process (``analysis.reports.build_reports`` with the runs already read),
- ``python -m analysis reports`` end to end in a fresh process (imports, read, build, write).

Table 3 uses the real ``analysis.measures.implant_measures`` when it can be imported; otherwise a stub
measures function (said so in the output), so the numbers then time everything but the measures.

    .venv/bin/python benchmarks/reports.py [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("baseline_rc", "baseline_cp", "baseline_pr", "avr_3", "mv_3", "avr_9", "mv_9")
FUSING_GAIN = {"baseline_rc": -0.004, "baseline_cp": -0.006, "baseline_pr": -0.003, "avr_3": 0.0, "mv_3": -0.001,
               "avr_9": -0.0005, "mv_9": -0.002}


def plausible_iou(w: int, d: int, s: int, fold: int, rng) -> float:
    """0.891 at the baseline, best near c0=64, d=5, IS=640, a small drop for the largest models, fold noise."""
    v = 0.891 + 0.004 * math.log2(w / 32) + 0.003 * (d - 3) + 0.004 * (s - 384) / 128
    if w >= 96 and d >= 5:
        v -= 0.006
    return min(v, 0.906) + rng.normal(0, 0.003) + 0.002 * (fold - 1.5)


def filler_params(i: int) -> dict:
    """About as many params as a real training run logs (every resolved config value)."""
    return {f"train.option_{k}": f"value-{k}-{i % 3}" for k in range(60)}


def fill(tmp: Path, optuna_trials: int) -> tuple[str, str]:
    import numpy as np
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from model.complexity import count_flops, count_params

    rng = np.random.default_rng(0)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("scaling-unet", artifact_location=(tmp / "artifacts").as_uri())
    fexp = client.create_experiment("scaling-unet-fusing", artifact_location=(tmp / "fusing-artifacts").as_uri())

    def run(exp_id, tags, params, metrics, name):
        r = client.create_run(exp_id, run_name=name)
        client.log_batch(r.info.run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                         params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)
        client.set_terminated(r.info.run_id, "FINISHED")
        return r.info.run_id

    i = 0
    for s in (384, 512, 640):
        for d in (3, 4, 5, 6):
            for w in (32, 64, 96, 112):
                key = f"c{w}d{d}s{s}"
                for fold in range(4):
                    v = plausible_iou(w, d, s, fold, rng)
                    cls = {"iou_bone": v + 0.05, "iou_degradation_layer": v - 0.10, "iou_residual_material": v + 0.05}
                    run(exp, {"config_key": key, "fold": fold, "experiment": "compound"},
                        {"model.width": w, "model.depth": d, "model.input_size": s, "fold": fold, **filler_params(i)},
                        {"mean_iou": v, **cls, "flops": count_flops(w, d, s), "params": count_params(w, d),
                         "paper_flops": count_flops(w, d, s), "final_val_loss": 0.1, "iterations": 1000},
                        f"c{w}-d{d}-is{s}-fold{fold}")
                    i += 1
    for t in range(optuna_trials):
        w, d, s = int(rng.choice([32, 64, 96, 112])), int(rng.choice([3, 4, 5, 6])), int(rng.choice([384, 512, 640]))
        v = plausible_iou(w, d, s, 0, rng)
        run(exp, {"config_key": f"optuna{t}", "fold": 0, "experiment": "optuna"},
            {"model.width": w, "model.depth": d, "model.input_size": s, "fold": 0,
             "train.learning_rate": float(10 ** rng.uniform(-4, -3)), **filler_params(t)},
            {"mean_iou": v, "flops": count_flops(w, d, s), "iou_bone": v, "iou_degradation_layer": v,
             "iou_residual_material": v}, f"optuna-{t}")
    preds = stub_dataset(tmp / "dataset")
    for method in METHODS:
        for fold in range(4):
            v = 0.902 + FUSING_GAIN[method] + 0.002 * (fold - 1.5)
            rid = run(fexp, {"config_key": "c64d5s640", "fold": fold, "task": "fusing", "fusing_method": method},
                      {"model.width": 64, "model.depth": 5, "model.input_size": 640, "fold": fold},
                      {"mean_iou": v, "iou_bone": v + 0.05, "iou_degradation_layer": v - 0.09,
                       "iou_residual_material": v + 0.04}, f"c64-d5-is640-fold{fold}-{method}")
            if method == "avr_3":
                client.log_text(rid, json.dumps({"dataset": str(tmp / "dataset"), "method": method,
                                                 "samples": preds[fold]}), "predictions.json")
    return uri, str(tmp)


def stub_dataset(root: Path, n: int = 48) -> dict:
    """3 test samples (HQ + WF labels) of n³ voxels and 4 folds of stub prediction files (perturbed HQ)."""
    import h5py
    import numpy as np

    from data.manifest import Sample, write_manifest
    from data.volume import VolumeRef

    root.mkdir(parents=True)
    z, y, x = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    r = np.hypot(y - n / 2, x - n / 2)
    samples, preds = [], {f: {} for f in range(4)}
    for i in range(3):
        def lab(dl, bone):
            a = np.zeros((n, n, n), np.uint8)
            a[(r < n / 3 + bone) & (x < n / 2 + 4)] = 1
            a[r < n / 5 + dl] = 2
            a[r < n / 7] = 3
            return a
        sid = f"test{i}"
        with h5py.File(root / f"{sid}.h5", "w") as f:
            f["image"] = lab(0, i).astype(np.float32) / 3
            f["label"], f["label_wf"] = lab(0, i), lab(-2, i)
        samples.append(Sample(id=sid, image=VolumeRef(root / f"{sid}.h5", "/image"),
                              label=VolumeRef(root / f"{sid}.h5", "/label"),
                              wf_label=VolumeRef(root / f"{sid}.h5", "/label_wf"), voxel_size_um=5.0, alloy="Mg-10Gd",
                              beamline="P05", implantation_days=28.0 * (i + 1), label_quality="HQ", split="test",
                              initial_volume_mm3=0.3, initial_surface_mm2=2.5))
        for fold in range(4):
            p = root / "pred" / f"fold{fold}" / f"{sid}.h5"
            p.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(p, "w") as f:
                f["labels"] = lab(fold % 2 - 0.5, i)
            preds[fold][sid] = str(p)
    write_manifest(root, samples)
    return preds


def stub_measures(arr, **kw) -> dict:
    import numpy as np

    c = np.bincount(np.asarray(arr[:]).ravel(), minlength=4)
    return {"dr_mm_per_year": c[3] / 1e4, "bic_percent": 100 * c[2] / max(1, c[2] + c[3]), "bv_tv_percent": 100 * c[1] / c.sum()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--optuna-trials", type=int, default=12)
    ap.add_argument("--keep", type=Path, default=None, help="keep the store and the reports in this folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-reports-")) if args.keep is None else args.keep.resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        uri, _ = fill(tmp, args.optuna_trials)
        print(f"filled {uri}: 192 training fold runs + {args.optuna_trials} Optuna trials + 28 fusing runs "
              f"in {time.perf_counter() - t0:.1f} s")
        from analysis import reports as R
        from analysis.store import read_runs

        try:
            from analysis.measures import implant_measures  # noqa: F401
            measures, what = None, "real analysis.measures"
        except ImportError as e:
            measures, what = stub_measures, f"a STUB measures function (analysis.measures not importable: {e})"
        print(f"Table 3 with {what}, 3 test samples of 48³ voxels × (HQ + WF + 4 folds)")
        reads, builds = [], []
        for k in range(args.repeat):
            t = time.perf_counter()
            runs = read_runs(uri, "scaling-unet")
            reads.append(time.perf_counter() - t)
            t = time.perf_counter()
            parts = R.build_reports(uri, out=tmp / f"reports-{k}", runs=runs, measures_fn=measures)
            builds.append(time.perf_counter() - t)
        skipped = [f"{p.name} ({p.skipped})" for p in parts if p.skipped]
        n_files = sum(len(p.written) for p in parts)
        print(f"read_runs: {len(runs.training)} training + {len(runs.fusing)} fusing runs in {runs.search_calls} "
              f"search call(s): median {statistics.median(reads):.3f} s (all: {', '.join(f'{x:.3f}' for x in reads)})")
        print(f"build_reports (runs already read): {n_files} files, median {statistics.median(builds):.2f} s "
              f"(all: {', '.join(f'{x:.2f}' for x in builds)})" + (f"; skipped: {skipped}" if skipped else ""))
        if measures is None:
            cli = []
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            for k in range(args.repeat):
                t = time.perf_counter()
                p = subprocess.run([sys.executable, "-m", "analysis", "reports", "--tracking-uri", uri, "--out",
                                    str(tmp / f"cli-{k}")], cwd=REPO, env=env, capture_output=True, text=True)
                cli.append(time.perf_counter() - t)
                if p.returncode:
                    raise SystemExit(f"python -m analysis reports failed:\n{p.stderr[-2000:]}")
        else:  # the CLI cannot take a stub: time it in a fresh process with the stub injected
            cli = []
            code = ("import sys; sys.argv=['analysis','reports','--tracking-uri',%r,'--out',%r];"
                    "import analysis.table3 as T, benchmarks.reports as B; T.default_measures=lambda: B.stub_measures;"
                    "from analysis.__main__ import main; sys.exit(main())")
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            for k in range(args.repeat):
                t = time.perf_counter()
                p = subprocess.run([sys.executable, "-c", code % (uri, str(tmp / f"cli-{k}"))], cwd=REPO, env=env,
                                   capture_output=True, text=True)
                cli.append(time.perf_counter() - t)
                if p.returncode:
                    raise SystemExit(f"python -m analysis reports failed:\n{p.stderr[-2000:]}")
        print(f"python -m analysis reports, fresh process end to end: median {statistics.median(cli):.2f} s "
              f"(all: {', '.join(f'{x:.2f}' for x in cli)})")
        if args.keep:
            print(f"store and reports kept in {tmp}")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
