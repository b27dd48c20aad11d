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

import itertools
import math
import os
import typing as tp
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from omegaconf import DictConfig, OmegaConf

from sweep.core.compose import compose_jobs as compose_once
from sweep.resources.memory import GB, on_oom_setting
from sweep.slurm.sbatch import render_sbatch  # noqa: F401 - also this module's API (tests, users)
from sweep.tracking import client as tracking
from sweep.tracking.client import finished_fold_runs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
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
    """Every job's config, composed once per config-group choice as the launchers do (sweep.core.compose)."""
    from hydra.core.global_hydra import GlobalHydra


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


def pruning_preview(pruner: tp.Mapping[str, tp.Any], n_trials: int, max_iters: int,
                    checkpoint_every: int) -> tp.Optional[list[tuple[int, float]]]:
    """Expected number of trials that train to each length under ASHA (Optuna's SuccessiveHalvingPruner, as
    Determined's search preview): a trial reaches rung k with probability reduction_factor^-k (the top 1/η go on),
    stopping at the first checkpoint at or after the rung; [(iterations, trials that stop there)], the last
    entry the trials that train to ``max_iters``. None for pruners whose stops depend on the values (median, ...)."""
    target = str(pruner.get("_target_", ""))
    if not target.endswith("SuccessiveHalvingPruner"):
        return None
    rf = float(pruner.get("reduction_factor", 4))
    min_resource = pruner.get("min_resource", "auto")
    # Optuna's "auto": 1/100 of the first COMPLETE trial's steps (here its iterations).
    r0 = max(1, max_iters // 100) if min_resource in (None, "auto") else int(min_resource)
    rate = int(pruner.get("min_early_stopping_rate", 0))
    out: list[tuple[int, float]] = []
    reach = float(n_trials)
    k = 0
    while True:
        rung = r0 * rf ** (k + rate)
        stop = min(max_iters, int(math.ceil(rung / checkpoint_every)) * checkpoint_every)
        if stop >= max_iters:
            break
        go_on = reach / rf
        if out and out[-1][0] == stop:  # two rungs between the same checkpoints: judged at the same report
            out[-1] = (stop, out[-1][1] + reach - go_on)
        else:
            out.append((stop, reach - go_on))
        reach, k = go_on, k + 1
    out.append((max_iters, reach))
    return out


def launcher_params(cfg: DictConfig) -> dict:
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_", None)
    return params


def print_memory_section(jobs: list, skipped: list, decisions: dict, done: set) -> None:
    """The configs that do not fit their GPUs at the configured batch, each with its estimate: those
    halved (queued at a smaller global batch) and those skipped (not queued, recorded in MLflow)."""

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
