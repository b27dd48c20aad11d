"""Benchmark: seconds from the sweep command to all 192 compound tasks queued on the local SLURM cluster.

Compares, in the same run, `python -m sweep +experiment=compound hydra/launcher=slurm_v100 -m` (which
composes and checks all 192 configs, checks MLflow, creates the experiment and dataset, skips
FINISHED runs, then submits one array per time group) with plain hydra-submitit-launcher submitting
a trivial app over the same 4×4×3×4 grid. Ours runs twice: in a fresh work folder (it makes the
synthetic dataset and the local MLflow store first) and again in the same folder (both in place, as
with prepared data and a tracking server on a cluster, and on every rerun). Both arrays are cancelled as soon as they are fully queued. Then a
small real sweep (4 tasks) measures the overhead per job: seconds from the job's process start to
the end of its first training step (MLflow metric ``startup_s``; includes Python, TensorFlow and
Hydra start-up, data and MLflow checks, model build and tracing of the training step).

    bash slurm/install.sh && bash slurm/start.sh && python benchmarks/sweep_queue.py [--queue-only]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID = ["+a=1,2,3,4", "+b=1,2,3,4", "+c=1,2,3", "+d=0,1,2,3"]
TAG = str(os.getpid())  # job names of this run only: scancel -n never hits someone else's benchmark
COMMON = ["hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4", "hydra.launcher.cpus_per_task=1",
          "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10", "hydra.launcher.array_parallelism=1"]
# Our sweeps on the test cluster's fake GPUs train the laptop profile on synthetic data: a stand-in, allowed
# explicitly (sweep/resources/standin.py), on 4 logical CPU devices standing in for the 4 GPUs (a global batch they split).
STAND_IN = ["allow_stand_in=true", "train.cpu_replicas=4", "train.batch_size=4"]


def _squeue_count(name: str) -> int:
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
    return len(out.split())


def time_to_queued(cmd: list[str], name: str, n: int, env: dict, cwd: Path, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while time.perf_counter() - t0 < timeout:
            if _squeue_count(name) >= n:
                return time.perf_counter() - t0
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd[:4])} exited ({proc.returncode}) before {n} tasks were queued")
            time.sleep(0.1)
        raise RuntimeError(f"not all {n} tasks queued after {timeout} s")
    finally:
        subprocess.run(["scancel", "-n", name], capture_output=True)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def job_overhead(tmp: Path, env: dict) -> list[float]:
    """startup_s of 4 real tasks (tiny configs) from MLflow."""
    db = tmp / "overhead" / "mlflow.db"
    cmd = [sys.executable, "-m", "sweep", "+experiment=compound", "hydra/launcher=slurm_v100",
           "model.width=32", "model.depth=2", "model.input_size=384", "data.synth.size=32", "data.synth.n_train=4",
           "data.synth.n_test=1", "train.batch_size=2", "train.max_iters=4", "train.checkpoint_every=4",
           "train.val_crop=32", "train.val_slice_step=8", "train.final_slice_step=8", *COMMON[:-1], *STAND_IN,
           "hydra.launcher.array_parallelism=2", "hydra.launcher.poll_interval_s=1",
           "hydra.launcher.name=bench-overhead", f"mlflow.tracking_uri=sqlite:///{db}", "-m"]
    subprocess.run(cmd, cwd=tmp, env=dict(env, SCALING_UNET_WORK=str(tmp / "overhead")), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{db}")
    runs = c.search_runs([c.get_experiment_by_name("scaling-unet").experiment_id])
    return sorted(r.data.metrics["startup_s"] for r in runs if "startup_s" in r.data.metrics)


def main() -> None:
    if not os.environ.get("SLURM_CONF"):
        state = os.environ.get("SLURM_LOCAL_DIR", "/tmp/scaling-unet-slurm")
        os.environ["SLURM_CONF"] = f"{state}/slurm.conf"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours_env = dict(env, SCALING_UNET_WORK=str(tmp / "ours"))
        ours = time_to_queued([sys.executable, "-m", "sweep", "+experiment=compound",
                               "hydra/launcher=slurm_v100", *COMMON, *STAND_IN,
                               f"hydra.launcher.name=bench-ours-{TAG}", "-m"],
                              f"bench-ours-{TAG}", 192, ours_env, tmp)
        plain = time_to_queued([sys.executable, str(REPO / "benchmarks" / "trivial_app.py"),
                                "hydra/launcher=submitit_slurm", *GRID, *COMMON, f"hydra.launcher.name=bench-plain-{TAG}",
                                f"hydra.sweep.dir={tmp}/plain", "-m"], f"bench-plain-{TAG}", 192, env, tmp)
        # Again in the same work folder: the dataset and the MLflow store exist, as on a cluster (prepared data,
        # a tracking server) and on every rerun; the cancelled arrays are dead, so all 192 are queued again.
        warm = time_to_queued([sys.executable, "-m", "sweep", "+experiment=compound",
                               "hydra/launcher=slurm_v100", *COMMON, *STAND_IN,
                               f"hydra.launcher.name=bench-warm-{TAG}", "-m"],
                              f"bench-warm-{TAG}", 192, ours_env, tmp)
        print(f"192 tasks queued: scaling-unet sweep {ours:.1f} s in a fresh work folder (makes the synthetic "
              f"dataset and the MLflow store), {warm:.1f} s with them in place; plain hydra-submitit-launcher "
              f"{plain:.1f} s (ratios {ours / plain:.2f}, {warm / plain:.2f})", flush=True)
        if "--queue-only" in sys.argv[1:]:  # the queueing comparison alone (no training jobs)
            print(json.dumps({"benchmark": "sweep_queue", "ours_s": round(ours, 2), "ours_warm_s": round(warm, 2),
                              "plain_s": round(plain, 2), "ratio": round(ours / plain, 3),
                              "ratio_warm": round(warm / plain, 3)}))
            return
        overhead = job_overhead(tmp, env)
        print(f"per-job overhead, process start to end of first training step (4 SLURM tasks): "
              f"{', '.join(f'{x:.1f}' for x in overhead)} s")
        print(json.dumps({"benchmark": "sweep_queue", "ours_s": round(ours, 2), "plain_s": round(plain, 2),
                          "ratio": round(ours / plain, 3), "startup_s": [round(x, 2) for x in overhead]}))


if __name__ == "__main__":
    main()
