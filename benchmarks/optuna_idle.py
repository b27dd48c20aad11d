"""Idle slot-time of Optuna on SLURM: hydra-optuna-sweeper's batches against the asynchronous slots.

    .venv/bin/python benchmarks/optuna_idle.py                      # 12 trials, 2 slots, both modes
    .venv/bin/python benchmarks/optuna_idle.py --trials 16 --iters 10 60 240 --modes async

Runs ``python -m sweep +experiment=optuna hydra/launcher=slurm_v100`` on the local SLURM cluster
(slurm/start.sh; needs root like the SLURM tests) with tiny models whose only searched parameter is
``train.max_iters`` (random sampler), so trials differ several-fold in length as real configs do
(the 48 configs differ ~65× in FLOPs). Mode ``batch`` is ``hydra/sweeper=optuna`` (n_jobs trials per
batch, each batch a new job array that waits for its slowest trial); mode ``async`` is ours
(``optuna_async``: n_jobs long-lived slots in one array). For each mode the trials' MLflow runs give
(start, end); idle slot-time = 1 − Σ run time / (slots × (last end − first start)), split into the part
after the last trial started (nothing left to run: the tail no scheduler avoids) and the part before
(batch barriers, job start-up, claims). Both modes see the same distribution of trial lengths, not the
same draws: the table prints the busy time of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = ["model.width=32", "model.depth=2", "model.input_size=384", "data.synth.size=32", "data.synth.n_train=4",
        "data.synth.n_test=1", "train.batch_size=2", "train.checkpoint_every=1000", "train.val_crop=32",
        "train.val_slice_step=8", "train.final_slice_step=8", "train.open_slabs=2"]


def start_cluster() -> dict:
    p = subprocess.run(["bash", str(REPO / "slurm" / "start.sh")], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"slurm/start.sh failed:\n{p.stdout}\n{p.stderr}")
    conf = next(l.split("=", 1)[1] for l in p.stdout.splitlines() if l.startswith("export SLURM_CONF="))
    return {"SLURM_CONF": conf}


def run_mode(mode: str, root: Path, args, env: dict) -> dict:
    work = root / mode / "work"
    work.mkdir(parents=True)
    sweeper = ["hydra/sweeper=optuna", "hydra/sweeper/sampler=random",
               f"hydra.sweeper.storage=sqlite:///{work}/optuna.db"] if mode == "batch" else \
        ["hydra/sweeper/sampler=random"]
    # The laptop profile on synthetic data on the fake GPUs: a stand-in, allowed explicitly (sweep/resources/standin.py).
    cmd = [sys.executable, "-m", "sweep", "+experiment=optuna", "hydra/launcher=slurm_v100", *sweeper,
           "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
           "hydra.launcher.timeout_min=30", "hydra.launcher.poll_interval_s=1", "hydra.launcher.array_parallelism=8",
           f"hydra.launcher.name=su-bench-{mode}", f"hydra.sweeper.n_trials={args.trials}",
           f"hydra.sweeper.n_jobs={args.slots}", "hydra.sweeper.sampler.seed=0",
           f"train.max_iters=choice({','.join(str(i) for i in args.iters)})", *TINY,
           "allow_stand_in=true", "train.cpu_replicas=4", "train.batch_size=4", f"mlflow.experiment=bench-{mode}",
           "-m"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=work.parent, capture_output=True, text=True,
                       env={**os.environ, **env, "SCALING_UNET_WORK": str(work), "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.time() - t0
    if p.returncode:
        return {"mode": mode, "error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1],
                "log": p.stderr[-3000:]}
    from mlflow.tracking import MlflowClient

    from sweep.orchestration.trials import idle_share

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name(f"bench-{mode}")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if "fold" in r.data.tags and r.info.status == "FINISHED"]
    intervals = [(r.info.start_time / 1000, r.info.end_time / 1000) for r in runs]
    durations = sorted(b - a for a, b in intervals)
    return {"mode": mode, "wall_s": wall, "runs": len(runs), "durations_s": [round(d, 1) for d in durations],
            **idle_share(intervals, args.slots)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--slots", type=int, default=2, help="n_jobs: slots (async) or batch size (batch)")
    ap.add_argument("--iters", type=int, nargs="+", default=[10, 60, 240], help="train.max_iters choices")
    ap.add_argument("--modes", nargs="+", default=["batch", "async"], choices=["batch", "async"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    env = start_cluster()
    rows = []
    with tempfile.TemporaryDirectory(prefix="optuna-idle-") as tmp:
        for mode in args.modes:
            res = run_mode(mode, Path(tmp), args, env)
            rows.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "log"}), flush=True)
            if "error" in res:
                print(res["log"], file=sys.stderr)
    print(f"\n{'mode':>6} {'trials':>6} {'slots':>5} {'busy s':>7} {'window s':>8} {'idle':>6} {'tail':>6} "
          f"{'before':>6} {'sweep wall s':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:>6}: FAILED: {r['error']}")
            continue
        print(f"{r['mode']:>6} {r['trials']:>6} {r['slots']:>5} {r['busy_s']:>7.0f} {r['window_s']:>8.0f} "
              f"{100 * r['idle']:>5.1f}% {100 * r['tail']:>5.1f}% {100 * (r['idle'] - r['tail']):>5.1f}% "
              f"{r['wall_s']:>12.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
