"""``python -m sweep.plan``: check a whole sweep and print what it would queue, before anything runs.

    python -m sweep.plan +experiment=compound
    python -m sweep.plan +experiment=compound hydra/launcher=slurm_v100 profile=paper data=prepared \\
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
import itertools
import os
import sys
import typing as tp
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from omegaconf import DictConfig, OmegaConf

from sweep import tracking
from sweep.dispatch import SweepConfigError, check_jobs, finished_fold_runs
from sweep.standin import check_stand_in
from sweep.sbatch import render_sbatch  # noqa: F401 - also this module's API (tests, users)
from sweep.task import ConfigError, check_dataset

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
V100_TFLOPS = 30.0  # sustained mixed-precision conv throughput per V100 assumed for the estimate


def expand_sweep(overrides: tp.Sequence[str]) -> tuple[DictConfig, list[list[str]]]:
    """The base config and every job's overrides, as Hydra's basic sweeper builds them.

    Like BasicSweeper.split_arguments: ``hydra.sweeper.params`` first, then the command line; a key
    given again later (``model.depth=3`` after the experiment's ``model.depth: 3,4,5,6``) replaces it.
    An Optuna search space becomes its categorical grid, continuous parameters at their low end: the
    configs the asynchronous sweeper checks before its slots start.
    """
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(list(overrides)) if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose("config", overrides=fixed, return_hydra_config=True)
    params = base.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params else {}  # no experiment: no sweep params
    lines = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    final: dict[str, list[str]] = {}
    for o in parser.parse_overrides(lines):
        key = o.get_key_element()
        if o.is_sweep_override() and isinstance(o.value(), IntervalSweep):  # Optuna: checked at its low end
            values = [str(o.value().start)]
        else:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        final[key] = [f"{key}={v}" for v in values]
    return base, [list(combo) for combo in itertools.product(*final.values())]


def compose_jobs(jobs: list[list[str]]) -> list[tuple[int, list[str], DictConfig]]:
    """Every job's config, composed once per config-group choice as the launchers do (sweep.compose)."""
    from hydra.core.global_hydra import GlobalHydra

    from sweep.compose import compose_jobs as compose_once

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        master = compose("config", return_hydra_config=True)
        return compose_once(GlobalHydra.instance().config_loader(), master, jobs)


def finished_pairs(uri: str, experiment: str) -> set[tuple[str, int]]:
    """(config_key, fold) pairs with a FINISHED run; read-only (a missing store or experiment is empty)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return set()
    tracking.check_tracking_uri(uri)
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is None:
        return set()
    return set(finished_fold_runs(uri, exp.experiment_id))


def gpu_hours_upper_bound(flops: int, batch: int, iters: int, gpus: int, tflops_per_gpu: float) -> float:
    """Training ≈ 3× forward FLOPs per image; every run to the iteration cap; GPU-hours on ``gpus`` GPUs."""
    seconds = 3.0 * flops * batch * iters / (tflops_per_gpu * 1e12 * gpus)
    return seconds * gpus / 3600.0


def launcher_params(cfg: DictConfig) -> dict:
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_", None)
    return params


def print_memory_section(jobs: list, skipped: list, decisions: dict, done: set) -> None:
    """The configs that do not fit their GPUs at the configured batch, each with its estimate: those
    halved (queued at a smaller global batch) and those skipped (not queued, recorded in MLflow)."""
    from sweep.resources import GB, on_oom_setting

    halved: dict[str, list] = {}
    for j in jobs:
        if decisions[j.idx].action == "halved":
            halved.setdefault(j.plan.config_key, []).append(j)
    skip: dict[str, list] = {}
    for j, _why in skipped:
        skip.setdefault(j.plan.config_key, []).append(j)
    if not halved and not skip:
        return
    policies = sorted({on_oom_setting(j.cfg) for g in (*halved.values(), *skip.values()) for j in g})
    budget = decisions[next(iter((*halved.values(), *skip.values())))[0].idx].budget
    print()
    print(f"GPU memory: {len(halved)} config(s) halved, {len(skip)} skipped (on_oom={','.join(policies)}, "
          f"gpu_mem_gb {(budget.memory_bytes or 0) / GB:g} per GPU, {budget.gpus} GPUs per run):")
    for what, groups in (("halved", halved), ("skipped", skip)):
        for group in groups.values():
            p, d = group[0].plan, decisions[group[0].idx]
            folds = ",".join(str(j.plan.fold) for j in group)
            state = (f"folds {folds}" + (" (" + ",".join(str(j.plan.fold) for j in group if j.pair in done)
                                          + " FINISHED)" if any(j.pair in done for j in group) else "")
                     if what == "halved" else f"folds {folds} not queued (KILLED MLflow runs tagged skipped_reason)")
            print(f"  {what}: c0={p.paper_width} d={p.depth} IS={p.paper_input_size}: {d.reason}; {state}")


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
    from sweep.resources import GB, apply_memory_policy, decide, gpu_budget, on_oom_setting

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
    if refusal is None:
        print_memory_section(jobs, skipped, decisions, done)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if is_slurm and todo:
        from sweep.groups import job_groups

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


if __name__ == "__main__":
    sys.exit(main())
