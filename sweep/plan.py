"""``python -m sweep.plan``: check a whole sweep and print what it would queue, before anything runs.

    python -m sweep.plan +experiment=compound
    python -m sweep.plan +experiment=compound hydra/launcher=slurm_v100 profile=paper data=prepared \
        data.dataset=/data/prepared hydra.launcher.array_parallelism=8

Composes every job of the sweep (``hydra.sweeper.params`` of the experiment plus sweep overrides
on the command line), validates every config (all bad ones are listed, exit code 2), and prints:
``runs: N``, the runs already FINISHED in MLflow (the sweep will skip them), parameters and FLOPs
per config, an upper bound of GPU-hours (every run to the iteration cap at an assumed sustained
throughput), each config that does not fit its GPUs at the configured batch, halved or skipped
(``on_oom``), with its estimate, and, for a SLURM launcher, the sbatch script that would be submitted.
Writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing as tp

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from sweep.core.errors import ConfigError, SweepConfigError
from sweep.jobs.train import check_dataset
from sweep.orchestration.planning import (
    V100_TFLOPS,
    compose_jobs,
    expand_sweep,
    finished_pairs,
    gpu_hours_upper_bound,
    launcher_params,
    print_memory_section,
    pruning_preview,
)
from sweep.orchestration.prepare import check_jobs
from sweep.resources.groups import job_groups
from sweep.resources.memory import GB, apply_memory_policy, decide, gpu_budget, on_oom_setting
from sweep.resources.standin import check_stand_in
from sweep.slurm.sbatch import render_sbatch  # noqa: F401 - also this module's API (tests, users)
from sweep.tracking import client as tracking


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for `python -m sweep ... -m`")
    ap.add_argument("--tflops-per-gpu", type=float, default=V100_TFLOPS,
                    help=f"sustained training throughput per GPU for the estimate (default {V100_TFLOPS})")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    try:
        base, job_overrides = expand_sweep(args.overrides)
        jobs = check_jobs(compose_jobs(job_overrides))
        stand_in = check_stand_in([j.cfg for j in jobs])  # as the sweep and a single run refuse it
        first = jobs[0].plan
        checked: set[str] = set()
        for j in jobs:  # the sweep's dataset checks, without making a synthetic dataset
            if str(j.plan.dataset) not in checked:
                check_dataset(j.cfg)
                checked.add(str(j.plan.dataset))
        done = finished_pairs(first.tracking_uri, first.experiment)
    except (SweepConfigError, ConfigError, tracking.TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # composition errors from Hydra: one line, not a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    try:  # what the sweep decides for runs that do not fit their GPUs (on_oom)
        decisions = {j.idx: decide(j.plan, gpu_budget(j.cfg), on_oom_setting(j.cfg)) for j in jobs}
        refusal = None
        jobs, skipped, _ = apply_memory_policy(jobs)
    except SweepConfigError as exc:
        refusal, skipped = exc, []
    except Exception as exc:  # ConfigError of on_oom
        print(f"error: {exc}", file=sys.stderr)
        return 2
    todo = [j for j in jobs if j.pair not in done] if refusal is None else []
    is_slurm = "SlurmArrayLauncher" in str(base.hydra.launcher.get("_target_", ""))
    gpus = int(base.hydra.launcher.get("gpus_per_node") or 0) if is_slurm else 0
    budget = gpu_budget(base)
    sweeper = base.hydra.sweeper
    if "optuna" in str(sweeper.get("_target_", "")).lower():
        print(f"optuna: {sweeper.get('n_trials')} trials on {sweeper.get('n_jobs')} slots; below, every categorical "
              f"combination of the search space (continuous parameters at their low end), as checked before the "
              f"slots start")
    print(f"runs: {len(jobs) + len(skipped)}")
    if stand_in is not None:
        print(f"stand-in ({stand_in.field}, allowed by allow_stand_in=true): {stand_in.what}")
    print(f"finished: {len([j for j in jobs if j.pair in done])} already FINISHED in MLflow ({first.tracking_uri}, "
          f"experiment {first.experiment!r}); skipped")
    halved_jobs = [j for j in jobs if decisions[j.idx].action == "halved"]
    if halved_jobs:
        print(f"halved batch: {len(halved_jobs)} runs of {len({j.plan.config_key for j in halved_jobs})} config(s) "
              f"queued at a smaller global batch (on_oom; each named below with its estimate)")
    if skipped:
        print(f"not fitting the GPUs: {len(skipped)} runs skipped (on_oom)"
              + ("" if refusal is not None else "; each config named below with its estimate"))
    print(f"to queue: {len(todo)}")
    print(f"launcher: {base.hydra.launcher._target_.rsplit('.', 1)[-1]}"
          + (f", {gpus} GPUs per run" if is_slurm else "")
          + (f", {budget.memory_bytes / GB:g} GB per GPU" if budget.memory_bytes else ""))
    print()
    print(f"{'c0':>4} {'d':>2} {'IS':>4} {'trained as':>14} {'params':>14} {'GFLOPs':>9} {'batch':>5} "
          f"{'GB/GPU':>7} {'fits':>10} {'folds to run':>13} {'GPU-h (max)':>12}")
    by_config: dict[str, list] = {}
    for j in list(jobs) + [j for j, _ in skipped]:
        by_config.setdefault(j.plan.config_key, []).append(j)
    total_h = 0.0
    for key, group in by_config.items():
        p = group[0].plan
        d = decisions[group[0].idx]
        fits = {"fits": "yes", "halved": f"batch {d.batch}", "skip": "NO: skip", "refuse": "NO"}[d.action]
        folds = [str(j.plan.fold) for j in group if j.pair not in done and d.action in ("fits", "halved", "refuse")]
        hours = gpu_hours_upper_bound(p.flops, p.settings.batch_size, p.settings.max_iters, max(gpus, 4),
                                      args.tflops_per_gpu) * len(folds)
        total_h += hours
        print(f"{p.paper_width:>4} {p.depth:>2} {p.paper_input_size:>4} {f'c{p.width}/{p.input_size}²':>14} "
              f"{p.params:>14,} {p.flops / 1e9:>9.2f} {p.settings.batch_size:>5} {d.estimate.total / GB:>7.1f} "
              f"{fits:>10} {','.join(folds) or '-':>13} {hours:>12.1f}")
    print()
    print("GB/GPU: estimated peak memory of one replica (model.complexity.training_memory: weights, gradients, "
          "Adam, activations kept for the backward pass)")
    print(f"GPU-hours, upper bound (every run to train.max_iters, {args.tflops_per_gpu:g} TFLOP/s per GPU, "
          f"4 GPUs per run): {total_h:,.0f}; early stopping usually ends runs far sooner")
    if "optuna" in str(sweeper.get("_target_", "")).lower() and sweeper.get("pruner"):
        print_pruning_preview(sweeper, first.settings, total_h / max(1, len(by_config)))
    if refusal is None:
        print_memory_section(jobs, skipped, decisions, done)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if is_slurm and todo:

        params = launcher_params(base)
        folder = str(params["submitit_folder"])
        groups = job_groups(todo, params)
        print()
        print(f"arrays: {len(groups)} (time_groups={params.get('time_groups', 1)}), runs by predicted wall time "
              f"({params.get('tflops_per_gpu', 30.0):g} TFLOP/s per GPU), longest first inside each array:")
        for g in groups:
            print(f"  {g.name}: {len(g.items):>4} runs, predicted {g.predicted_s[0] / 3600:.2f} h .. "
                  f"{g.predicted_s[-1] / 3600:.2f} h, --time={g.time_min} min, "
                  f"at most {g.parallelism or params.get('array_parallelism')} at once "
                  f"({', '.join(sorted({j.plan.run_name.rsplit('-fold', 1)[0] for j in g.items})[:4])}"
                  f"{', ...' if len({j.plan.config_key for j in g.items}) > 4 else ''})")
        for g in groups:
            print()
            print(f"sbatch script of array {g.name} (one array of {len(g.items)} tasks):")
            try:
                print(render_sbatch(dict(params, timeout_min=g.time_min,
                                         array_parallelism=g.parallelism or params.get("array_parallelism")),
                                    len(g.items), folder=folder,
                                    python=sys.executable))
            except RuntimeError as exc:  # submitit needs srun on PATH to render
                print(f"  (not rendered here: {exc})")
    return 0


def print_pruning_preview(sweeper: tp.Any, settings: tp.Any, hours_per_trial: float) -> None:
    """With a pruner: how many trials are expected to train to each length, and the GPU-hours that implies."""
    from omegaconf import OmegaConf

    pruner = OmegaConf.to_container(sweeper.pruner, resolve=True)
    n = int(sweeper.n_trials)
    name = str(pruner.get("_target_", "")).rsplit(".", 1)[-1]
    steps = pruning_preview(pruner, n, settings.max_iters, settings.checkpoint_every)
    print()
    if steps is None:
        print(f"pruner: {name}: where it stops trials depends on their values; no preview (the upper bound above "
              f"holds: {n} trials × {hours_per_trial:,.1f} GPU-h)")
        return
    if len(steps) == 1:
        print(f"pruner: {name}: cannot stop a trial early here: one validation per trial (train.checkpoint_every="
              f"{settings.checkpoint_every}, train.max_iters={settings.max_iters}); more checkpoints give it rungs, "
              f"e.g. train.checkpoint_every={max(1, settings.max_iters // 9)}")
        return
    iters = sum(length * trials for length, trials in steps)
    print(f"pruner: {name} (reduction factor {pruner.get('reduction_factor')}, first rung {steps[0][0]} iterations): "
          f"of {n} trials, expected to stop at")
    for length, trials in steps:
        print(f"  {length:>8} iterations: {trials:6.1f} trials" + ("  (train.max_iters)" if length == settings.max_iters
                                                                     else ""))
    share = iters / (n * settings.max_iters)
    print(f"  expected GPU-hours: {share * n * hours_per_trial:,.1f} of {n * hours_per_trial:,.1f} without pruning "
          f"({share:.0%}; mean of the configs above, every trial to the cap it reaches)")


if __name__ == "__main__":
    sys.exit(main())
