"""Commands that run what they say: refuse a stand-in before anything is queued (no TensorFlow here).

A stand-in is a run that is not what its launcher promises:

* a GPU launcher (``hydra.launcher.gpus_per_node`` > 0, e.g. ``hydra/launcher=slurm_v100``) with the laptop
  profile (``profile.name == laptop``, the default: widths ÷16, 30 iterations) or synthetic data
  (``data.synthesize``, the default): GPU jobs that train a laptop-scale model or synthetic explants;
* the paper profile on the local launcher with no GPU declared (``hydra.launcher.gpu_mem_gb`` null, e.g. the
  default ``hydra/launcher=local`` or a single ``python -m sweep`` run): up to ``train.max_iters``
  (1.5 M) iterations per run on this machine's CPU.

Both are refused unless ``allow_stand_in=true`` (the test cluster's fake GPUs, a deliberate CPU run); the
second is no stand-in when ``hydra.launcher.gpu_mem_gb`` is set (a GPU workstation). :func:`stand_in_rule`
is the rule; the sweep launchers (``sweep.orchestration.prepare.prepare_sweep``), a single run (``sweep.__main__``) and
``python -m sweep.plan`` call it through :func:`check_stand_in`, so the plan refuses what the run refuses.
"""

from __future__ import annotations

import dataclasses
import typing as tp

from omegaconf import DictConfig, OmegaConf

from sweep.core.errors import ConfigError

ALLOW_KEY = "allow_stand_in"


@dataclasses.dataclass(frozen=True)
class StandIn:
    """What a command would run instead of what it says: the field to name, what it is, how to allow it."""

    field: str    # the config field the error line starts with
    what: str     # what the command is about to run, in words
    fix: str      # how to run what it says instead
    runs: int     # how many runs of the command are this stand-in
    allowed: bool  # allow_stand_in=true: run it, but say so

    @property
    def problem(self) -> str:
        return f"{self.what}; {self.fix}, or {ALLOW_KEY}=true to run it anyway"


def _launcher_of(cfg: DictConfig, launcher: tp.Any) -> tp.Mapping:
    if launcher is None:
        launcher = OmegaConf.select(cfg, "hydra.launcher", default=None)
    return {} if launcher is None else launcher  # a DictConfig or a dict: read with .get


def _runs(cfgs: tp.Sequence[DictConfig], n: int) -> int:
    """An Optuna sweep runs ``n_trials`` trials, whatever number of configs it checked up front."""
    sweeper = OmegaConf.select(cfgs[0], "hydra.sweeper", default=None) if cfgs else None
    if sweeper is not None and "optuna" in str(sweeper.get("_target_", "")).lower():
        trials = sweeper.get("n_trials")
        if isinstance(trials, int) and trials > 0:
            return trials
    return n


def _gpus(launcher: tp.Mapping) -> int:
    try:
        return int(launcher.get("gpus_per_node") or 0)
    except (TypeError, ValueError):
        return 0


def _one(cfg: DictConfig, launcher: tp.Mapping) -> tp.Optional[tuple[str, str, str]]:
    """(field, what with ``{runs}`` left to fill, fix) when this config is a stand-in on this launcher, else None."""
    profile = str(OmegaConf.select(cfg, "profile.name", default="") or "")
    synthetic = bool(OmegaConf.select(cfg, "data.synthesize", default=False))
    gpus = _gpus(launcher)
    if gpus > 0 and (profile == "laptop" or synthetic):
        what, fix = [], []
        if profile == "laptop":
            divisor = OmegaConf.select(cfg, "profile.width_divisor", default=None)
            iters = OmegaConf.select(cfg, "train.max_iters", default=None)
            what.append(f"profile=laptop (a CPU-scale stand-in: widths ÷{divisor}, train.max_iters={iters})")
            fix.append("profile=paper")
        if synthetic:
            what.append("synthetic data (data.synthesize=true)")
            fix.append("data=prepared data.dataset=<prepared folder>")
        return ("profile" if profile == "laptop" else "data.synthesize",
                "{runs} of " + " on ".join(what) + f" as GPU jobs (hydra.launcher.gpus_per_node={gpus})",
                "give " + " ".join(fix))
    if gpus == 0 and profile == "paper" and launcher.get("gpu_mem_gb") in (None, "") \
            and str(cfg.get("task", "train")) == "train":
        iters = OmegaConf.select(cfg, "train.max_iters", default=None)
        iters = f"{iters:,}" if isinstance(iters, int) else str(iters)
        return ("profile",
                "{runs} of profile=paper on this machine's CPU, up to " + iters + " iterations{each} "
                "(train.max_iters): the local launcher with no GPU declared (hydra.launcher.gpu_mem_gb=null)",
                "on a GPU workstation set hydra.launcher.gpu_mem_gb=<GB of its GPU>, "
                "on a cluster hydra/launcher=slurm_v100")
    return None


def stand_in_rule(cfgs: tp.Sequence[DictConfig], launcher: tp.Any = None) -> tp.Optional[StandIn]:
    """The stand-in rule: None when every config runs what the command says, else the first stand-in found
    (a refused one before an allowed one), with the number of runs like it.

    ``cfgs``: the composed config of every job of a sweep, or of the one run. ``launcher``: the launcher's config
    when the configs do not hold ``hydra.launcher`` (a single run's task config: pass ``HydraConfig.get().launcher``).
    Pure: reads the configs, touches nothing.
    """
    found: dict[tuple[str, str, str, bool], int] = {}
    for cfg in cfgs:
        hit = _one(cfg, _launcher_of(cfg, launcher))
        if hit is not None:
            key = (*hit, bool(OmegaConf.select(cfg, ALLOW_KEY, default=False)))
            found[key] = found.get(key, 0) + 1
    if not found:
        return None
    (field, what, fix, allowed), n = sorted(found.items(), key=lambda kv: kv[0][3])[0]  # refused ones first
    runs = _runs(cfgs, n) if n == len(cfgs) else n
    what = what.replace("{runs}", f"{runs:,} run" + ("s" if runs != 1 else ""))
    what = what.replace("{each}", " each" if runs != 1 else "")
    return StandIn(field, what, fix, runs, allowed)


def check_stand_in(cfgs: tp.Sequence[DictConfig], launcher: tp.Any = None, log: tp.Any = None) -> tp.Optional[StandIn]:
    """Raise ``sweep.jobs.train.ConfigError`` (``error: <field>: …``, exit 2) for a refused stand-in; log an allowed one."""
    verdict = stand_in_rule(cfgs, launcher)
    if verdict is None:
        return None
    if not verdict.allowed:

        raise ConfigError(verdict.field, verdict.problem)
    if log is not None:
        log.warning("%s=true: %s", ALLOW_KEY, verdict.what)
    return verdict
