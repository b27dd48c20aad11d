"""Benchmark: how often each kind of measure interval holds the true (HQ) value (issue 30; docs/measures.md).

Trains (or takes) a fold ensemble on the demo's synthetic data, makes N_cal + M held-out synthetic explants with
exact labels (the test distribution's geometry and noise, other seeds), predicts each with the ensemble and each
fold model alone (9 planes, soft vote), and measures DR, BIC and BV/TV of the fused labels, of each member's and of
the HQ label (analysis.calibrate.records_for). Then, for calibration sets of N = 5, 10, 30 scans (random subsets of
the pool, ``--repeats`` draws for N < pool), it fits the split-conformal table (analysis.calibration) and prints, per
measure and interval kind, on the M test scans: coverage (share holding the HQ value), mean width, and width relative
to the HQ value.

    .venv/bin/python benchmarks/calibration.py --work /tmp/calib [--n-cal 30] [--n-test 30] [--alpha 0.1]
        [--models runs:/… …  --tracking-uri URI]   # default: train the demo's Table 2 config, 4 folds
        [--max-iters 3000]

The records are cached in WORK/records-*.json: a rerun with other N or α costs seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.calibration import KINDS, MEASURES, coverage, fit_calibration, min_calibration_scans  # noqa: E402

SIZE, DEGRADATION_SCALE = 64, 2.5  # the laptop profile's synthetic data (conf/profile/laptop.yaml)
TABLE2 = ["mlflow.experiment=calibration-bench", "model.width=112", "model.depth=3", "model.input_size=384",
          "train.checkpoint_every=250", "train.lr_patience_iters=500", "train.early_stop_patience_iters=2000",
          "train.batch_size=8"]


def run(cmd: list[str], env: tp.Optional[dict] = None) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})


def train_folds(work: Path, max_iters: int) -> tuple[list[str], str]:
    """The demo's Table 2 config, 4 folds, in WORK's own MLflow store; returns (runs:/ specs, tracking URI)."""
    from mlflow.tracking import MlflowClient

    env = {"SCALING_UNET_WORK": str(work)}
    run([sys.executable, "-m", "sweep", *TABLE2, f"train.max_iters={max_iters}", "fold=range(4)", "-m"], env)
    uri = f"sqlite:///{work}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("calibration-bench")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=100)
    by_fold = {int(r.data.tags["fold"]): r.info.run_id for r in runs if "fold" in r.data.tags}
    return [f"runs:/{by_fold[f]}/model" for f in sorted(by_fold)], uri


def explants(work: Path, name: str, n: int, seed: int) -> Path:
    """n synthetic HQ-labelled explants (test samples of the generator, seeds from ``seed``), prepared at 5 µm."""
    raw, prepared = work / f"{name}-raw", work / f"{name}-prepared"
    if not (prepared / "manifest.yaml").is_file():
        run([sys.executable, "-m", "data.synth", "--out", str(raw), "--n-train", "0", "--n-test", str(n), "--size",
             str(SIZE), "--seed", str(seed), "--degradation-scale", str(DEGRADATION_SCALE), "--overwrite"])
        run([sys.executable, "-m", "data.prepare", str(raw), "--out", str(prepared), "--overwrite"])
    return prepared


def records(work: Path, name: str, specs: list[str], uri: tp.Optional[str], dataset: Path) -> list[dict]:
    from analysis.calibrate import records_for

    cache = work / f"records-{name}.json"
    if cache.is_file():
        doc = json.loads(cache.read_text())
        if doc["models"] == specs:
            return doc["records"]
    t0 = time.perf_counter()
    recs = records_for(specs, dataset, tracking_uri=uri)
    cache.write_text(json.dumps({"models": specs, "records": recs, "seconds": time.perf_counter() - t0}, indent=1))
    print(f"{name}: {len(recs)} scans in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return recs


def evaluate(pool: list[dict], tests: list[dict], sizes: tp.Sequence[int], alpha: float, repeats: int,
             seed: int = 0) -> dict:
    """Per N: coverage / width per measure and kind, averaged over ``repeats`` random calibration subsets."""
    rng = random.Random(seed)
    out: dict = {}
    for n in sizes:
        draws = [pool] if n >= len(pool) else [rng.sample(pool, n) for _ in range(repeats)]
        per: dict = {m: {k: {"coverage": [], "mean_width": [], "relative_width": []} for k in KINDS} for m in MEASURES}
        biases: dict = {m: [] for m in MEASURES}
        for d in draws:
            cal = fit_calibration(d, alpha)
            cov = coverage(cal, tests)
            for m in MEASURES:
                biases[m].append(cal.measures[m].bias)
                for k, row in cov[m].items():
                    for f in ("coverage", "mean_width", "relative_width"):
                        per[m][k][f].append(row[f])
        out[str(min(n, len(pool)))] = {
            m: {"bias": statistics.mean(biases[m]),
                **{k: {f: statistics.mean(v) for f, v in row.items() if v} for k, row in per[m].items()
                   if row["coverage"]}} for m in MEASURES}
    return out


def evaluate_resplits(scans: list[dict], sizes: tp.Sequence[int], n_test: int, alpha: float, repeats: int,
                      seed: int = 1) -> dict:
    """The same table over ``repeats`` random splits of all scans into N calibration and ``n_test`` test scans: the
    coverage a user can expect (one split of 30 test scans varies by about ±5 points around it)."""
    rng = random.Random(seed)
    out: dict = {}
    for n in sizes:
        n = min(n, len(scans) - n_test)
        per: dict = {m: {k: {"coverage": [], "mean_width": [], "relative_width": []} for k in KINDS} for m in MEASURES}
        biases: dict = {m: [] for m in MEASURES}
        for _ in range(repeats):
            order = rng.sample(scans, len(scans))
            cal = fit_calibration(order[:n], alpha)
            cov = coverage(cal, order[n:n + n_test])
            for m in MEASURES:
                biases[m].append(cal.measures[m].bias)
                for k, row in cov[m].items():
                    for f in ("coverage", "mean_width", "relative_width"):
                        per[m][k][f].append(row[f])
        out[str(n)] = {m: {"bias": statistics.mean(biases[m]),
                           **{k: {f: statistics.mean(v) for f, v in row.items() if v} for k, row in per[m].items()
                              if row["coverage"]}} for m in MEASURES}
    return out


def _num(v: float, fmt: str) -> str:
    return "∞" if math.isinf(v) else format(v, fmt)


def table(result: dict, alpha: float) -> str:
    lines = [f"| N | measure | kind | coverage (target {1 - alpha:.0%}) | mean width | width / HQ value |",
             "|---:|---|---|---:|---:|---:|"]
    for n, per in result.items():
        for m in MEASURES:
            for k in KINDS:
                row = per[m].get(k)
                if not row:
                    continue
                w, rel = row["mean_width"], row["relative_width"]
                lines.append(f"| {n} | {m} | {k} | {row['coverage']:.0%} | {_num(w, '.3g')} | {_num(rel, '.2f')} |")
    return "\n".join(lines)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=None, help="fold models (default: train the Table 2 config)")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--max-iters", type=int, default=3000)
    ap.add_argument("--n-cal", type=int, default=30)
    ap.add_argument("--n-test", type=int, default=30)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 30])
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    specs, uri = (args.models, args.tracking_uri) if args.models else train_folds(args.work.resolve(), args.max_iters)
    t_train = time.perf_counter() - t0
    pool = records(args.work, "calibration", specs, uri, explants(args.work, "calibration", args.n_cal, 1000))
    tests = records(args.work, "test", specs, uri, explants(args.work, "test", args.n_test, 2000))
    result = evaluate(pool, tests, args.sizes, args.alpha, args.repeats)
    resplit = evaluate_resplits(pool + tests, args.sizes, args.n_test, args.alpha, args.repeats)
    hq = {m: [float(r["hq"][m]) for r in pool + tests] for m in MEASURES}
    print(f"Measure intervals on {len(tests)} held-out synthetic explants ({SIZE}³, degradation scale "
          f"{DEGRADATION_SCALE}); {len(specs)} fold models; α = {args.alpha} (finite conformal intervals need N ≥ "
          f"{min_calibration_scans(args.alpha)}); N < {len(pool)}: mean over {args.repeats} random calibration sets")
    print("HQ values: " + ", ".join(f"{m} {min(v):.3g}–{max(v):.3g}" for m, v in hq.items()))
    print(f"\nFixed split: calibration pool of {len(pool)} (seeds from 1000), {len(tests)} test scans (seeds from 2000)")
    print(table(result, args.alpha))
    print(f"\nRandom splits of all {len(pool) + len(tests)} scans: N calibration, {args.n_test} test, "
          f"{args.repeats} splits (the expected coverage)")
    print(table(resplit, args.alpha))
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU (this project's dev machine)",
           "models": specs, "alpha": args.alpha, "n_pool": len(pool), "n_test": len(tests), "size": SIZE,
           "degradation_scale": DEGRADATION_SCALE, "train_seconds": t_train, "result": result,
           "resplit": resplit,
           "hq_ranges": {m: [min(v), max(v)] for m, v in hq.items()}}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1, default=lambda x: None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
