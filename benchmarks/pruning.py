"""Core-seconds with and without pruning, and whether the same best config is found (issue 21, docs/benchmarks.md).

    .venv/bin/python benchmarks/pruning.py                       # both studies, laptop scale, on this machine
    .venv/bin/python benchmarks/pruning.py --only optuna --trials 16
    .venv/bin/python benchmarks/pruning.py --only grid --grid-sizes 384

optuna: ``+experiment=optuna_asha`` (single objective: validation mean IoU; width, depth, input size, learning rate)
at laptop scale with ``train.max_iters=90 train.checkpoint_every=10`` (the laptop profile validates once per run: no
rung to prune at), the random sampler with one seed in both arms, so both see the SAME trials in the same order (one
slot) and differ only in the pruner: ``NopPruner`` against ASHA (SuccessiveHalvingPruner, first rung 10 iterations,
reduction factor 3).

grid: ``+experiment=compound`` at laptop scale on the local pool (2 workers), the input sizes given (default 384:
16 configs × 4 folds), without and with ``fold_pruning.test=paired_t`` (p 0.1, after 2 folds).

Cost: Σ over the runs of ``cpu_core_hours_used`` (each training process's CPU time, sweep.tracking.cost), and the
wall time of the command. Answer: the best trial/config of each arm; for the grid the best config by mean IoU over 4
folds, with its standard error, and whether the pruned arm's best is within 1 SE of the unpruned arm's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _run(cmd: list[str], work: Path) -> float:
    env = dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3")
    t0 = time.time()
    p = subprocess.run(cmd, cwd=work.parent, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return time.time() - t0


def _runs(work: Path) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = c.get_experiment_by_name("scaling-unet")
    return [r for r in c.search_runs([exp.experiment_id], max_results=5000) if "fold" in r.data.tags]


def core_seconds(runs: list) -> float:
    return 3600.0 * sum(r.data.metrics.get("cpu_core_hours_used", 0.0) for r in runs)


def optuna_arm(root: Path, pruned: bool, args, min_resource: int = 0) -> dict:
    work = root / (f"asha{min_resource}" if pruned else "nop") / "work"
    work.mkdir(parents=True)
    pruner = [f"hydra.sweeper.pruner.min_resource={min_resource}"] if pruned else [
        "hydra.sweeper.pruner._target_=optuna.pruners.NopPruner",
                                "~hydra.sweeper.pruner.min_resource", "~hydra.sweeper.pruner.reduction_factor",
                                "~hydra.sweeper.pruner.min_early_stopping_rate"]
    cmd = [sys.executable, "-m", "sweep", "+experiment=optuna_asha", "hydra/sweeper/sampler=random",
           "hydra.sweeper.sampler.seed=0", f"hydra.sweeper.n_trials={args.trials}", "hydra.sweeper.n_jobs=1",
           f"train.max_iters={args.iters}", f"train.checkpoint_every={args.every}", *pruner, "-m"]
    wall = _run(cmd, work)
    runs = _runs(work)
    done = [r for r in runs if r.info.status == "FINISHED"]
    best = max(done, key=lambda r: r.data.metrics["mean_iou"])
    p = best.data.params
    return {"arm": f"ASHA, rung {min_resource}" if pruned else "no pruning", "trials": len(runs), "complete": len(done),
            "pruned": sum(r.info.status == "KILLED" for r in runs), "core_s": core_seconds(runs), "wall_s": wall,
            "best_trial": int(best.data.tags["optuna_trial"]), "best_mean_iou": best.data.metrics["mean_iou"],
            "best": f"c0={p['model.width']} d={p['model.depth']} IS={p['model.input_size']} "
                    f"lr={float(p['train.learning_rate']):.2e}",
            "iterations": sum(int(r.data.metrics.get("iterations", r.data.tags.get("pruned_at_iteration", 0)))
                              for r in runs)}


def grid_arm(root: Path, pruned: bool, args) -> dict:
    work = root / ("fold_pruned" if pruned else "all_folds") / "work"
    work.mkdir(parents=True)
    cmd = [sys.executable, "-m", "sweep", "+experiment=compound", f"model.input_size={','.join(args.grid_sizes)}",
           *(["fold_pruning.test=paired_t"] if pruned else []), "-m"]
    wall = _run(cmd, work)
    runs = _runs(work)
    by_cfg: dict[str, dict[int, float]] = {}
    names: dict[str, str] = {}
    for r in runs:
        if r.info.status == "FINISHED":
            key = r.data.tags["config_key"]
            by_cfg.setdefault(key, {})[int(r.data.tags["fold"])] = r.data.metrics["mean_iou"]
            names[key] = r.info.run_name.rsplit("-fold", 1)[0]
    complete = {k: v for k, v in by_cfg.items() if len(v) == 4}
    best = max(complete, key=lambda k: statistics.mean(complete[k].values()))
    vals = list(complete[best].values())
    return {"arm": "fold pruning (paired_t)" if pruned else "all folds", "runs": len(runs),
            "trained": sum(r.info.status == "FINISHED" for r in runs),
            "skipped": sum(r.data.tags.get("fold_pruned") == "true" for r in runs),
            "core_s": core_seconds(runs), "wall_s": wall, "best": names[best], "best_key": best,
            "best_mean_iou": statistics.mean(vals), "best_se": statistics.stdev(vals) / math.sqrt(len(vals)),
            "complete_configs": len(complete)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("optuna", "grid"))
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--iters", type=int, default=90)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--first-rungs", type=int, nargs="+", default=[10, 30],
                    help="ASHA arms: the first rung (min_resource) of each, in iterations")
    ap.add_argument("--grid-sizes", nargs="+", default=["384"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / f"pruning_laptop_{time.strftime('%Y-%m-%d')}.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-pruning-"))
    result: dict = {"cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if args.only in (None, "optuna"):
        arms = [optuna_arm(root, False, args)] + [optuna_arm(root, True, args, r) for r in args.first_rungs]
        result["optuna"] = arms
        base = arms[0]
        print(f"optuna, {args.trials} trials (same random draws in both arms), max_iters {args.iters}, "
              f"checkpoint every {args.every}:")
        for a in arms:
            print(f"  {a['arm']:<12} core-s {a['core_s']:8.0f}  wall {a['wall_s']:6.0f} s  iterations {a['iterations']:5d}"
                  f"  complete {a['complete']:2d} pruned {a['pruned']:2d}  best trial {a['best_trial']} "
                  f"({a['best']}) mean IoU {a['best_mean_iou']:.4f}")
        for asha in arms[1:]:
            print(f"  {asha['arm']}: core-seconds ratio {base['core_s'] / asha['core_s']:.2f}×, wall "
                  f"{base['wall_s'] / asha['wall_s']:.2f}×; same best trial: {base['best_trial'] == asha['best_trial']}")
    if args.only in (None, "grid"):
        arms = [grid_arm(root, False, args), grid_arm(root, True, args)]
        result["grid"] = arms
        base, fp = arms
        print(f"grid (+experiment=compound, input sizes {','.join(args.grid_sizes)}, local pool):")
        for a in arms:
            print(f"  {a['arm']:<24} core-s {a['core_s']:7.0f}  wall {a['wall_s']:6.0f} s  trained {a['trained']:3d} "
                  f"skipped {a['skipped']:3d}  best {a['best']} ({a['best_key']}) {a['best_mean_iou']:.4f} ± "
                  f"{a['best_se']:.4f} SE over {a['complete_configs']} complete configs")
        within = abs(fp["best_mean_iou"] - base["best_mean_iou"]) <= base["best_se"]
        print(f"  core-seconds ratio {base['core_s'] / fp['core_s']:.2f}×, wall {base['wall_s'] / fp['wall_s']:.2f}×; "
              f"same best config: {base['best'] == fp['best']}; within 1 SE: {within}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.is_file():  # one part rerun: keep the other's numbers
        result = {**json.loads(args.out.read_text()), **result}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
