"""GPU memory of every run against the launcher's GPUs, decided before anything is queued.

With this architecture c0=112, d=6 has 1.52 G parameters: weights, gradients and Adam's moments
alone are ~24 GB per replica, before activations, so some paper configs cannot train on a 32 GB
V100 at the paper's batch. ``model.complexity.training_memory`` estimates each run's peak per
replica (global batch split over ``gpus_per_node`` replicas, MirroredStrategy); what does not fit
``hydra.launcher.gpu_mem_gb`` is handled by ``on_oom``:

* ``halve_batch`` (default): the global batch is halved until the estimate fits (at least one
  image per GPU), as the override ``train.batch_size=N`` (a new config key: a different batch is a
  different training) plus the bookkeeping key ``batch_halved`` (batch and estimate before and
  after, and the reason; not part of the config key nor a parameter): the run's MLflow tags
  ``batch_halved`` (the reason), ``batch_halved_from``, ``batch_halved_to``; runs that fit at no
  batch are skipped as below;
* ``skip``: those runs are not queued; each is recorded in MLflow as a KILLED run with the tag
  ``skipped_reason`` (so Fig. 3's note and missing.csv say why the config is missing);
* ``refuse``: the sweep stops before queueing anything and names every such config.

Every reason names the estimate: GB per replica, the batch per GPU, ``gpu_mem_gb``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing as tp

from omegaconf import DictConfig, OmegaConf, open_dict

from model.complexity import MemoryEstimate, training_memory
from sweep.core.errors import ConfigError, SweepConfigError
from sweep.core.runplan import plan_run
from sweep.tracking import client as tracking

log = logging.getLogger(__name__)

ON_OOM = ("refuse", "skip", "halve_batch")
DEFAULT_ON_OOM = "halve_batch"
TAG_SKIPPED = "skipped_reason"
TAG_HALVED = "batch_halved"  # also the bookkeeping config key that carries it from the sweep to the job
GB = 1e9


@dataclasses.dataclass(frozen=True)
class GpuBudget:
    """The GPUs one run gets: ``gpus`` replicas with ``memory_bytes`` each (None: not checked)."""

    gpus: int
    memory_bytes: tp.Optional[float]


def gpu_budget(cfg: DictConfig) -> GpuBudget:
    """From the composed launcher config: ``gpus_per_node`` (SLURM; 1 for the local pool) and ``gpu_mem_gb``."""
    mem = OmegaConf.select(cfg, "hydra.launcher.gpu_mem_gb", default=None)
    gpus = OmegaConf.select(cfg, "hydra.launcher.gpus_per_node", default=None) or 1
    return GpuBudget(int(gpus), None if mem in (None, "") else float(mem) * GB)


def per_replica_batch(global_batch: int, gpus: int) -> int:
    """MirroredStrategy splits the global batch evenly over the replicas."""
    return max(1, math.ceil(global_batch / max(1, gpus)))


def estimate(plan, gpus: int, global_batch: tp.Optional[int] = None) -> MemoryEstimate:
    """Peak memory of one replica of this run (``plan``: sweep.jobs.train.RunPlan, as trained)."""
    batch = plan.settings.batch_size if global_batch is None else global_batch
    return training_memory(plan.width, plan.depth, plan.input_size, per_replica_batch(batch, gpus),
                           plan.settings.precision)


@dataclasses.dataclass
class MemoryDecision:
    """What the sweep does with one run: ``fits``, ``halved`` (to ``batch``), ``skip`` or ``refuse``."""

    action: str
    estimate: MemoryEstimate
    batch: int  # global batch it trains with (halved ones: the new one)
    budget: GpuBudget
    reason: str = ""
    requested_batch: int = 0  # the global batch of the config (before halving)
    requested_estimate: tp.Optional[MemoryEstimate] = None  # its estimate (None: same as ``estimate``)

    @property
    def gb_requested(self) -> float:
        return (self.requested_estimate or self.estimate).total / GB

    def halved_info(self) -> dict:
        """The bookkeeping value ``batch_halved`` of a halved run (config key, then MLflow tags)."""
        return {"batch_from": self.requested_batch, "batch_to": self.batch, "gb_before": round(self.gb_requested, 1),
                "gb_after": round(self.estimate.total / GB, 1),
                "gpu_mem_gb": None if self.budget.memory_bytes is None else self.budget.memory_bytes / GB,
                "reason": self.reason}


def decide(plan, budget: GpuBudget, on_oom: str) -> MemoryDecision:
    est = estimate(plan, budget.gpus)
    batch = plan.settings.batch_size
    if budget.memory_bytes is None or est.total <= budget.memory_bytes:
        return MemoryDecision("fits", est, batch, budget, requested_batch=batch)
    over = (f"estimated peak GPU memory {est.total / GB:.1f} GB per replica (global batch {batch}, "
            f"{per_replica_batch(batch, budget.gpus)} per GPU, {plan.settings.precision}) > gpu_mem_gb "
            f"{budget.memory_bytes / GB:g}")
    if on_oom == "halve_batch":
        b, e = batch, est
        while per_replica_batch(b, budget.gpus) > 1:
            b //= 2
            e = estimate(plan, budget.gpus, b)
            if e.total <= budget.memory_bytes:
                return MemoryDecision("halved", e, b, budget,
                                      f"{over}; global batch halved {batch} → {b} ({per_replica_batch(b, budget.gpus)}"
                                      f" per GPU, estimated {e.total / GB:.1f} GB per replica)",
                                      requested_batch=batch, requested_estimate=est)
        return MemoryDecision("skip", est, batch, budget,
                              f"{over}; still {e.total / GB:.1f} GB per replica at one image per GPU "
                              f"(global batch {b})", requested_batch=batch)
    return MemoryDecision("skip" if on_oom == "skip" else "refuse", est, batch, budget, over, requested_batch=batch)


def on_oom_setting(cfg: DictConfig) -> str:

    value = str(OmegaConf.select(cfg, "on_oom", default=DEFAULT_ON_OOM))
    if value not in ON_OOM:
        raise ConfigError("on_oom", f"must be one of {list(ON_OOM)}, got {value!r}")
    return value


def _override_value(value: tp.Any) -> str:
    """A Hydra override value: numbers and null as they are, strings single-quoted."""
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    text = str(value).replace("\\", "/").replace("'", "").replace("${", "$ {")
    return f"'{text}'"


def with_batch(overrides: tp.Sequence[str], cfg: DictConfig, batch: int,
               halved: tp.Optional[dict] = None) -> tuple[list[str], DictConfig]:
    """Overrides and composed config of a run with ``train.batch_size=batch`` (and, for a halved run, the
    bookkeeping key ``batch_halved``, which the job turns into MLflow tags)."""
    drop = ("train.batch_size=",) + ((f"{TAG_HALVED}=",) if halved is not None else ())
    out = [o for o in overrides if not o.lstrip("+~").startswith(drop)] + [f"train.batch_size={batch}"]
    if halved is not None:
        out.append(f"{TAG_HALVED}={{" + ",".join(f"{k}:{_override_value(v)}" for k, v in halved.items()) + "}")
    cfg = cfg.copy()
    with open_dict(cfg):
        OmegaConf.update(cfg, "train.batch_size", batch, merge=False)
        if halved is not None:
            OmegaConf.update(cfg, TAG_HALVED, dict(halved), merge=False)
    return out, cfg


def halved_reason(cfg: DictConfig) -> tp.Optional[str]:
    """Why a run's batch was halved (its ``batch_halved`` key), or None."""
    info = OmegaConf.select(cfg, TAG_HALVED, default=None)
    return None if not info else str(info.get("reason") or info)


def halved_tags(cfg: DictConfig) -> dict[str, str]:
    """The MLflow tags of a halved run: ``batch_halved`` (the reason), ``batch_halved_from``, ``batch_halved_to``."""
    info = OmegaConf.select(cfg, TAG_HALVED, default=None)
    if not info:
        return {}
    return {TAG_HALVED: str(info.get("reason") or info), f"{TAG_HALVED}_from": str(info.get("batch_from", "")),
            f"{TAG_HALVED}_to": str(info.get("batch_to", ""))}


def record_skipped(uri: str, experiment_id: str, plan, reason: str, experiment_name: str,
                   extra_tags: tp.Optional[tp.Mapping[str, str]] = None) -> None:
    """A KILLED MLflow run tagged ``skipped_reason`` for a (config, fold) the sweep did not queue or train (once)."""

    existing = [r for r in tracking.find_runs(uri, experiment_id, config_key=plan.config_key, fold=plan.fold)
                if r.data.tags.get(TAG_SKIPPED) == reason]
    if existing:
        return
    tags = {tracking.TAG_CONFIG_KEY: plan.config_key, tracking.TAG_FOLD: str(plan.fold), TAG_SKIPPED: reason,
            "experiment": experiment_name, **(extra_tags or {})}
    rec = tracking.RunRecorder(uri, experiment_id, run_name=plan.run_name, tags=tags)
    with rec:
        rec.start()
        rec.log_params({"model.width": plan.paper_width, "model.depth": plan.depth,
                        "model.input_size": plan.paper_input_size, "fold": plan.fold,
                        "effective.batch_size": plan.settings.batch_size, "train.precision": plan.settings.precision})
        rec.finish("KILLED")


def apply_memory_policy(jobs: list) -> tuple[list, list[tuple[tp.Any, str]], dict[int, MemoryDecision]]:
    """Check every training job (sweep.orchestration.prepare.Job) against its GPUs; returns (jobs to run, skipped
    (job, reason), decision per job index). ``refuse`` raises SweepConfigError naming every config."""

    keep, skipped, decisions, refused, halved = [], [], {}, {}, set()
    for j in jobs:
        policy = on_oom_setting(j.cfg)
        d = decide(j.plan, gpu_budget(j.cfg), policy)
        decisions[j.idx] = d
        if d.action == "refuse":
            refused.setdefault(j.plan.config_key, (j, d))
        elif d.action == "skip":
            skipped.append((j, f"{d.reason} (on_oom={policy})"))
        else:
            if d.action == "halved":
                if j.plan.config_key not in halved:
                    log.warning("c%d-d%d-is%d: %s", j.plan.paper_width, j.plan.depth, j.plan.paper_input_size, d.reason)
                halved.add(j.plan.config_key)
                j.overrides, j.cfg = with_batch(j.overrides, j.cfg, d.batch, d.halved_info())
                j.plan = plan_run(j.cfg)
            keep.append(j)
    if refused:
        lines = "\n".join(f"  c0={j.plan.paper_width} d={j.plan.depth} IS={j.plan.paper_input_size} "
                          f"({j.plan.config_key}): {d.reason}" for j, d in refused.values())
        raise SweepConfigError(f"{len(refused)} config(s) do not fit the GPUs; nothing was queued "
                               f"(on_oom=skip or on_oom=halve_batch to go on without them / with a smaller batch):\n"
                               + lines)
    return keep, skipped, decisions
