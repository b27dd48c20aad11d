"""Hand a model on: the chosen config's fold models as ONE version of a registered model (``python -m sweep.register``).

The config is ``model_uri=best`` (the highest mean IoU over all ``data.num_folds`` folds FINISHED in
``mlflow.experiment``, as ``fusing.model=best``) or a 12-hex config key. Its FINISHED fold runs' models
(``runs:/<id>/model/*.keras``) are copied as ``model/fold<k>.keras`` into one run of experiment
``<mlflow.experiment>-registry``, and that folder becomes a new version of registered model ``register.name``
(default: the experiment's name), tagged with what a reader needs to trust it (``config_key``, ``folds``,
``mean_iou`` ± ``mean_iou_se`` over folds, ``flops``, ``params``, ``training_experiment``, ``fold_run_ids``); the
alias ``register.alias`` moves to it. A config registered before is found by its ``config_key`` tag: nothing new
is registered (the alias still moves to it). ``python -m model.predict models:/<name>@best VOLUME`` predicts with
the version's fold models as one ensemble.

Everything that can be refused is refused before anything is written: the settings, an unreachable server or a
missing store, an unknown experiment or config key, no FINISHED fold run, fewer folds than ``data.num_folds``, a
fold run without a model or a mean IoU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
import tempfile
import typing as tp
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sweep.jobs.fusing import TAG_METHOD, best_config
from sweep.tracking import client as tracking
from sweep.tracking import registry

log = logging.getLogger("sweep.register")

CONFIG_KEY_RE = re.compile(r"^[0-9a-f]{12}$")
REGISTRY_EXPERIMENT_SUFFIX = "-registry"  # the registration runs, apart from the training runs
ARTIFACT_PATH = "model"
TAG_CONFIG_KEY = tracking.TAG_CONFIG_KEY  # how a rerun finds the version of a config
MODEL_PARAMS = ("model.width", "model.depth", "model.input_size")


@dataclasses.dataclass(frozen=True)
class FoldModel:
    fold: int
    run_id: str
    artifact: str  # the .keras file's path in the run's artifacts, e.g. model/best.keras
    mean_iou: float


@dataclasses.dataclass(frozen=True)
class FoldEnsemble:
    """One config's FINISHED fold runs, one per fold, in fold order; what the registry will say about them."""

    experiment: str
    config_key: str
    selection: str
    folds: tuple[FoldModel, ...]
    flops: tp.Optional[float] = None
    params: tp.Optional[float] = None
    model_params: tuple[tuple[str, str], ...] = ()

    @property
    def mean_iou(self) -> float:
        return sum(f.mean_iou for f in self.folds) / len(self.folds)

    @property
    def se_iou(self) -> tp.Optional[float]:
        """Standard error over folds (std with ddof=1 / sqrt(n), as analysis/results.py); None for one fold."""
        n = len(self.folds)
        if n < 2:
            return None
        var = sum((f.mean_iou - self.mean_iou) ** 2 for f in self.folds) / (n - 1)
        return math.sqrt(var / n)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The command's settings, checked before any MLflow call."""

    tracking_uri: str
    experiment: str
    model_uri: str
    num_folds: int
    name: str
    alias: tp.Optional[str]


def check_settings(cfg: DictConfig) -> Settings:
    """``model_uri``, ``register.name``, ``register.alias``, ``data.num_folds``; ValueError naming the field."""
    spec = OmegaConf.select(cfg, "model_uri", default="best")
    if OmegaConf.is_list(spec) or spec in (None, "???") or not (str(spec) == "best" or CONFIG_KEY_RE.match(str(spec))):
        raise ValueError(f"model_uri: give best or a 12-hex config key, got {spec!r}")
    folds = OmegaConf.select(cfg, "data.num_folds", default=4)
    if not isinstance(folds, int) or folds < 1:
        raise ValueError(f"data.num_folds: must be a positive integer, got {folds!r}")
    experiment = str(cfg.mlflow.experiment)
    name = OmegaConf.select(cfg, "register.name") or experiment
    alias = OmegaConf.select(cfg, "register.alias")
    registry.check_model_name(str(name), "register.name" if OmegaConf.select(cfg, "register.name") else
                              "register.name (default: mlflow.experiment)")
    if alias not in (None, ""):
        registry.check_alias(str(alias), "register.alias")
    return Settings(str(cfg.mlflow.tracking_uri), experiment, str(spec), folds, str(name),
                    None if alias in (None, "") else str(alias))


def check_store(uri: str) -> None:
    """A server that answers, or a local store that exists (MLflow would create an empty one and find nothing)."""
    try:
        tracking.check_store_exists(uri)
    except tracking.TrackingError as exc:
        raise ValueError(str(exc)) from None


def _experiment_id(uri: str, name: str) -> str:
    exp_id = tracking.existing_experiment(uri, name)
    if exp_id is None:
        raise ValueError(f"mlflow.experiment: no experiment {name!r} at {tracking.redact_uri(uri)}")
    return exp_id


def _fold_runs(uri: str, experiment_id: str, key: str) -> list:
    """The training runs of one config that have a fold (no parents, no fusing runs), newest first."""
    runs = [r for r in tracking.find_runs(uri, experiment_id, config_key=key)
            if tracking.TAG_FOLD in r.data.tags and r.data.tags.get(TAG_METHOD) is None
            and r.data.tags.get(tracking.TAG_IS_PARENT) != "true"]
    return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)


def _keras_artifact(uri: str, run_id: str) -> tp.Optional[str]:
    client = tracking._client(uri)
    found = tracking._retry(lambda: client.list_artifacts(run_id, ARTIFACT_PATH), f"list artifacts of run {run_id}",
                            uri, 3, 0.5)
    names = sorted(a.path for a in found if not a.is_dir and a.path.endswith(".keras"))
    return names[0] if names else None  # the file model.predict would load from runs:/<id>/model


def choose_fold_ensemble(s: Settings) -> FoldEnsemble:
    """The config that ``s.model_uri`` names and its fold models; ValueError naming the field when there is none.

    Reads only."""
    uri, spec = s.tracking_uri, s.model_uri
    check_store(uri)
    exp_id = _experiment_id(uri, s.experiment)
    key, selection = spec, f"config key {spec} (model_uri)"
    if spec == "best":
        try:
            key, iou, n = best_config(uri, exp_id, s.num_folds)
        except ValueError as exc:
            raise ValueError(f"model_uri=best: {exc} in experiment {s.experiment!r}") from None
        selection = (f"best: highest mean IoU over {s.num_folds} folds ({iou:.4f}) of {n} complete "
                     f"config{'s' if n != 1 else ''}")
    runs = _fold_runs(uri, exp_id, key)
    if not runs:
        raise ValueError(f"model_uri={spec}: no training run of config {key} in experiment {s.experiment!r} "
                         "(unknown config key)")
    by_fold: dict[int, tp.Any] = {}
    for r in runs:
        if r.info.status == "FINISHED":
            by_fold.setdefault(int(r.data.tags[tracking.TAG_FOLD]), r)  # the newest FINISHED run of each fold
    if not by_fold:
        raise ValueError(f"model_uri={spec}: no FINISHED fold run of config {key} in experiment {s.experiment!r} "
                         f"({len(runs)} runs, none FINISHED)")
    missing = [f for f in range(s.num_folds) if f not in by_fold]
    if missing:
        raise ValueError(f"model_uri={spec}: config {key} has FINISHED runs of folds {sorted(by_fold)} only, "
                         f"{s.num_folds} expected (data.num_folds); missing: {missing}")
    folds = []
    for f in range(s.num_folds):
        r = by_fold[f]
        if "mean_iou" not in r.data.metrics:
            raise ValueError(f"model_uri={spec}: fold {f} run {r.info.run_id} of config {key} has no mean_iou metric")
        artifact = _keras_artifact(uri, r.info.run_id)
        if artifact is None:
            raise ValueError(f"model_uri={spec}: fold {f} run {r.info.run_id} of config {key} has no "
                             f"{ARTIFACT_PATH}/*.keras artifact")
        folds.append(FoldModel(f, r.info.run_id, artifact, float(r.data.metrics["mean_iou"])))
    first = by_fold[0].data
    return FoldEnsemble(s.experiment, key, selection, tuple(folds), first.metrics.get("flops"),
                        first.metrics.get("params"),
                        tuple((p, first.params[p]) for p in MODEL_PARAMS if p in first.params))


def version_tags(ens: FoldEnsemble) -> dict[str, str]:
    """What the version says about itself (the registry UI shows these; no URIs, no local paths)."""
    tags = {TAG_CONFIG_KEY: ens.config_key, "folds": str(len(ens.folds)), "mean_iou": f"{ens.mean_iou:.4f}",
            "fold_mean_iou": ",".join(f"{f.mean_iou:.4f}" for f in ens.folds),
            "training_experiment": ens.experiment, "fold_run_ids": ",".join(f.run_id for f in ens.folds),
            "selection": ens.selection,
            "content": f"{ARTIFACT_PATH}/fold<k>.keras, one per fold; predicted as their ensemble"}
    if ens.se_iou is not None:
        tags["mean_iou_se"] = f"{ens.se_iou:.4f}"
    if ens.flops is not None:
        tags["flops"] = str(int(ens.flops))
    if ens.params is not None:
        tags["params"] = str(int(ens.params))
    tags.update(dict(ens.model_params))
    return tags


def describe(ens: FoldEnsemble) -> str:
    se = f" ± {ens.se_iou:.4f}" if ens.se_iou is not None else ""
    return (f"Fold ensemble of config {ens.config_key} ({len(ens.folds)} folds, mean IoU {ens.mean_iou:.4f}{se}) "
            f"trained in experiment {ens.experiment}")


def _download_folds(uri: str, ens: FoldEnsemble, into: Path) -> Path:
    """Each fold's .keras as ``into/model/fold<k>.keras``."""
    import mlflow

    out = into / ARTIFACT_PATH
    out.mkdir(parents=True)
    for f in ens.folds:
        part = into / f"download-{f.fold}"
        local = tracking._retry(lambda f=f, part=part: mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{f.run_id}/{f.artifact}", dst_path=str(part), tracking_uri=uri),
            f"download {f.artifact} of run {f.run_id}", uri, 3, 0.5)
        shutil.move(local, out / f"fold{f.fold}.keras")
        shutil.rmtree(part, ignore_errors=True)
    return out


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A registration: the version (``models:/<name>/<version>``), whether it is new, the alias on it."""

    name: str
    version: str
    new: bool
    alias: tp.Optional[str]
    ensemble: FoldEnsemble

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_fold_ensemble(s: Settings, ens: FoldEnsemble) -> Outcome:
    """One new version holding the fold models, or the version registered before for this config (idempotent)."""
    uri = s.tracking_uri
    found = registry.find_version(uri, s.name, TAG_CONFIG_KEY, ens.config_key)
    if found is not None:
        version = str(found.version)
        log.info("config %s is version %s of %s already: nothing registered", ens.config_key, version, s.name)
    else:
        model_tags = {"training_experiment": ens.experiment, "registered_by": "python -m sweep.register",
                      "content": "each version: one config's fold models as model/fold<k>.keras (an ensemble)"}
        with tempfile.TemporaryDirectory(prefix="scaling-unet-register-") as tmp:
            folder = _download_folds(uri, ens, Path(tmp))
            reg = registry.register_folder(
                uri, experiment=f"{ens.experiment}{REGISTRY_EXPERIMENT_SUFFIX}", name=s.name, folder=folder,
                artifact_path=ARTIFACT_PATH, version_tags=version_tags(ens), model_tags=model_tags,
                run_tags={TAG_CONFIG_KEY: ens.config_key, "training_experiment": ens.experiment,
                          "fold_run_ids": ",".join(f.run_id for f in ens.folds), **tracking.environment_tags()},
                description=describe(ens), run_name=f"register-{ens.config_key}")
        version = reg.version
    if s.alias and s.alias not in registry.version_aliases(uri, s.name, version):
        registry.move_alias(uri, s.name, s.alias, version)
    return Outcome(s.name, version, found is None, s.alias, ens)


def register(cfg: DictConfig) -> Outcome:
    """The whole command: settings, the chosen config (reads only), then the registration."""
    s = check_settings(cfg)
    ens = choose_fold_ensemble(s)
    return register_fold_ensemble(s, ens)
