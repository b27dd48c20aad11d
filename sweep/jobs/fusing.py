"""Table 2 of the paper: one trained (config, fold) evaluated on the test samples with the 7 fusing methods.

``python -m sweep +experiment=fusing -m`` runs this task for the 4 folds of one config: by default
the best trained config of the training experiment (``fusing.model=best``: highest mean IoU over
all folds FINISHED, ties to fewer FLOPs; paper: Table 2 uses its best model), or the composed one
(``fusing.model=baseline``), or a config key. Each job
takes the model of the FINISHED training run of its (config, fold), predicts the 9 planes of
every test sample once (model.inference plane files), and scores all seven methods of Table 2
from those plane files in one pass (Baseline S_rc/S_cp/S_pr, Avr/MV 3-planes, Avr/MV 9-planes),
IoU (Eq. 6) pooled over the test samples.

MLflow schema (read by ``python -m analysis table2``), experiment ``<mlflow.experiment>-fusing``:
one parent run per (config, fold) (tags ``config_key``, ``fold``, ``task=fusing``, ``model_selection``
(how the config was chosen, in words); metrics
``<method>.mean_iou``; artifacts fig4.png, fig5.png) that is FINISHED only after its children,
and one child run per method (tags ``config_key``, ``fold``, ``task=fusing``, ``fusing_method``,
``mlflow.parentRunId``; params ``model.*``, ``fold``; metrics ``iou_bone``,
``iou_degradation_layer``, ``iou_residual_material``, ``mean_iou``). The child of
``fusing.save_method`` carries ``predictions.json`` (test sample → saved labels) for Table 3.

The fold ensemble, ONE job after the per-fold ones (no ``-m``; refused in a sweep and when a fold has no
FINISHED training run)::

    python -m sweep +experiment=fusing fusing.ensemble=true <the same overrides>

loads the FINISHED training runs' models of all ``data.num_folds`` folds of the selected config
(``runs:/<id>/model`` each), predicts the 9 planes of each test sample once with their soft vote (the folds'
softmax probabilities averaged per slice batch, :func:`fold_ensemble_predictor`) and scores Avr/MV 3-planes
and Avr/MV 9-planes from those plane files (``work/fusing/<config_key>/ensemble/``). Its runs, in the same
experiment, carry NO ``fold`` tag or param (per-fold readers skip them): one parent (tags ``config_key``,
``ensemble_of_folds`` = ``0,1,2,3``, ``fold_vote=soft``, ``task=fusing``, ``model_selection``,
``trained_run_ids`` (the fold runs' ids, fold order); params ``model.*``, ``folds``, ``test_samples``;
metrics ``<method>.<iou metric>``, ``fusing_time_s``; artifacts fig4.png, fig5.png), FINISHED only after its
children, and one child per method (the parent's tags + ``fusing_method``, ``mlflow.parentRunId``; params +
``planes``, ``vote``; the four IoU metrics). The ``fusing.save_method`` child (avr_9) carries
``predictions.json`` with ``"ensemble_of_folds": [0, 1, 2, 3]``: Table 3's ML row. A FINISHED parent of
(config, ensemble_of_folds) is skipped on a rerun; runs of an attempt that died before it are deleted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
import typing as tp
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from data.manifest import load_dataset
from sweep.core.errors import ConfigError
from sweep.core.runplan import RunPlan, plan_run
from sweep.jobs.train import ensure_dataset
from sweep.tracking import client as tracking
from sweep.tracking.client import finished_fold_runs

log = logging.getLogger(__name__)

TAG_TASK = "task"
TAG_METHOD = "fusing_method"
PARENT_TAG = "mlflow.parentRunId"


def fusing_experiment(cfg: DictConfig) -> str:
    """Fusing runs have their own experiment: their metrics mean something else than training runs'."""
    return f"{cfg.mlflow.experiment}-fusing"


def table2_methods() -> dict[str, tuple[str, str]]:
    from model.inference import TABLE2_METHODS

    return dict(TABLE2_METHODS)


def _portable(path: tp.Union[str, Path]) -> str:
    """Absolute (readable from any working directory), with the home folder written ``~``."""
    p, home = str(Path(path).resolve()), str(Path.home())
    return "~" + p[len(home):] if p.startswith(home + "/") else p


SELECTIONS = ("best", "baseline")


def check_fusing(cfg: DictConfig) -> None:
    """Fusing settings, before anything runs."""
    methods = table2_methods()
    save = OmegaConf.select(cfg, "fusing.save_method")
    if save is not None and save not in methods:
        raise ConfigError("fusing.save_method", f"must be one of {list(methods)} or null, got {save!r}")
    batch = OmegaConf.select(cfg, "fusing.batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError("fusing.batch_size", f"must be a positive integer, got {batch!r}")
    check_ensemble(cfg)
    model = str(OmegaConf.select(cfg, "fusing.model", default="best"))
    if model not in SELECTIONS and not re.fullmatch(r"[0-9a-f]{12}", model):
        raise ConfigError("fusing.model", f"must be best, baseline or a 12-hex config key, got {model!r}")


@dataclasses.dataclass(frozen=True)
class TrainedConfig:
    """The trained config whose fold models a fusing sweep evaluates, and why it was chosen."""

    config_key: str
    width: int  # the paper's grid values (params model.*), not the profile's scaled ones
    depth: int
    input_size: int
    selection: str  # best | baseline | config key
    note: str  # one line: how it was chosen

    @property
    def name(self) -> str:
        return f"c{self.width}-d{self.depth}-is{self.input_size}"


def _grid_params(run) -> tuple[int, int, int]:
    p = run.data.params
    return int(p["model.width"]), int(p["model.depth"]), int(p["model.input_size"])


def best_config(uri: str, experiment_id: str, num_folds: int) -> tuple[str, float, int]:
    """Paper, Table 2: its best model. The config with the highest mean IoU (Eq. 6, mean over its folds)
    among configs with a FINISHED run on every fold; ties go to fewer FLOPs, then to the smaller key.

    Returns (config_key, mean IoU, number of complete configs compared); ValueError if there is none.
    """

    by_key: dict[str, dict[int, dict]] = {}
    for (key, fold), metrics in finished_fold_runs(uri, experiment_id).items():
        by_key.setdefault(key, {})[fold] = metrics
    scored = []
    for key, folds in by_key.items():
        if set(range(num_folds)) <= set(folds) and all("mean_iou" in folds[f] for f in range(num_folds)):
            ious = [folds[f]["mean_iou"] for f in range(num_folds)]
            flops = folds[0].get("flops", float("inf"))
            scored.append((-sum(ious) / num_folds, flops, key))
    if not scored:
        raise ValueError(f"no config has FINISHED training runs for all {num_folds} folds")
    neg_iou, _flops, key = min(scored)
    return key, -neg_iou, len(scored)


def training_experiment(plan: RunPlan) -> str:
    """The id of the training experiment the fusing job reads; ConfigError naming ``mlflow.experiment`` when the
    store or the experiment does not exist (a misspelt name must not create an empty one)."""
    try:
        tracking.check_store_exists(plan.tracking_uri)
        exp = tracking.existing_experiment(plan.tracking_uri, plan.experiment)
    except tracking.TrackingError as exc:
        raise ConfigError("mlflow.tracking_uri", str(exc).removeprefix("mlflow.tracking_uri: ")) from None
    if exp is None:
        raise ConfigError("mlflow.experiment", f"no training experiment {plan.experiment!r} at "
                          f"{tracking.redact_uri(plan.tracking_uri)}: train it first, or check the name")
    return exp


def select_trained_config(cfg: DictConfig, plan: RunPlan) -> TrainedConfig:
    """Resolve ``fusing.model`` against the training experiment; ConfigError naming the field if impossible."""
    check_fusing(cfg)
    selection = str(OmegaConf.select(cfg, "fusing.model", default="best"))
    exp = training_experiment(plan)
    if selection == "best":
        try:
            key, iou, n = best_config(plan.tracking_uri, exp, plan.num_folds)
        except ValueError as exc:
            raise ConfigError("fusing.model", f"best: {exc} in experiment {plan.experiment!r}; train a sweep first, "
                                              "or choose fusing.model=baseline or a config key") from None
        note = (f"best: highest mean IoU over {plan.num_folds} folds ({iou:.4f}) of {n} complete config"
                f"{'s' if n != 1 else ''} in experiment {plan.experiment}")
    elif selection == "baseline":
        key, note = plan.config_key, "baseline: the composed config (fusing.model=baseline)"
    else:
        key = selection
        note = str(OmegaConf.select(cfg, "fusing.selection_note") or f"config key {selection} (fusing.model)")
    runs = [r for r in tracking.find_runs(plan.tracking_uri, exp, config_key=key, status="FINISHED")
            if r.data.tags.get(TAG_METHOD) is None and all(f"model.{p}" in r.data.params
                                                           for p in ("width", "depth", "input_size"))]
    if not runs:
        raise ConfigError("fusing.model", f"no FINISHED training run of config {key} in experiment {plan.experiment!r}")
    width, depth, size = _grid_params(runs[0])
    return TrainedConfig(key, width, depth, size, selection, note)


def fusing_plan(plan: RunPlan, trained: TrainedConfig) -> RunPlan:
    """The job's plan with the selected config's key and grid values (what names and skips fusing runs)."""
    return dataclasses.replace(plan, config_key=trained.config_key, paper_width=trained.width, depth=trained.depth,
                               paper_input_size=trained.input_size)


def trained_run(plan: RunPlan) -> tp.Any:
    """The FINISHED training run of this (config, fold); ConfigError if it has not been trained."""
    exp = training_experiment(plan)
    runs = [r for r in tracking.find_runs(plan.tracking_uri, exp, config_key=plan.config_key, fold=plan.fold,
                                          status="FINISHED") if r.data.tags.get(TAG_METHOD) is None]
    if not runs:
        raise ConfigError("fold", f"no FINISHED training run of {plan.run_name} (config {plan.config_key}) in "
                          f"experiment {plan.experiment!r}: train it first (python -m sweep +experiment=compound -m, "
                          f"or the same overrides without +experiment=fusing)")
    return runs[0]


def finished_fusing(uri: str, experiment_id: str) -> dict[tuple[str, int], dict[str, float]]:
    """(config_key, fold) → metrics of its FINISHED fusing parent run (what a resumed sweep skips)."""
    done = {}
    for r in tracking.find_runs(uri, experiment_id, status="FINISHED"):
        t = r.data.tags
        if t.get(TAG_TASK) == "fusing" and TAG_METHOD not in t and "config_key" in t and "fold" in t:
            m = dict(r.data.metrics)
            done[(t["config_key"], int(t["fold"]))] = {**m, "mean_iou": m.get("avr_9.mean_iou", float("nan"))}
    return done


def _discard_partial(uri: str, experiment_id: str, plan: RunPlan) -> None:
    """Runs of an earlier attempt that died before its parent finished would count twice: delete them."""
    client = tracking._client(uri)
    for r in tracking.find_runs(uri, experiment_id, config_key=plan.config_key, fold=plan.fold):
        if r.info.status != "FINISHED" or r.data.tags.get(TAG_METHOD) is not None:
            client.delete_run(r.info.run_id)


@dataclasses.dataclass
class Scored:
    """What one fusing job measured: IoU per method, the saved labels per test sample, figures, seconds."""

    metrics: dict[str, dict[str, float]]
    saved: dict[str, str]
    figures: list[Path]
    seconds: float


def _test_samples(cfg: DictConfig) -> tuple[tp.Any, list]:
    """The dataset and its labelled test samples; ConfigError naming data.dataset if there are none."""
    dataset = load_dataset(ensure_dataset(cfg))
    tests = [s for s in dataset.samples if s.split == "test" and s.label is not None]
    if not tests:
        raise ConfigError("data.dataset", f"{dataset.manifest}: no test samples with labels")
    return dataset, tests


def predict_and_score(cfg: DictConfig, tests: tp.Sequence, predictor: tp.Callable, model_id: str, root: Path,
                      methods: tp.Mapping[str, tuple[str, str]], t0: float) -> Scored:
    """The 9 plane files of each test sample (streamed, one sample at a time), ``methods`` scored from them in one
    pass (IoU, Eq. 6, pooled over the samples); ``fusing.save_method`` labels kept for Table 3. ``t0``: when the
    job's clock started (before its models were loaded), for ``fusing_time_s``."""
    from model.evaluation import iou_metrics
    from model.figures import fig4_plane_probabilities, fig5_overlay
    from model.inference import PLANE_SETS, evaluate_methods, predict_plane
    from model.predict import check_inputs
    from model.rotate import make_rotation

    save_method = OmegaConf.select(cfg, "fusing.save_method")
    save_method = save_method if save_method in methods else None
    # Rotations beside the network on a GPU; on CPU one thread (pool workers share the cores).
    rotation = make_rotation("auto", 1)
    cms: dict[str, tp.Any] = {}
    saved: dict[str, str] = {}
    figures: list[Path] = []
    # Every test volume (values, free disk) is checked before the first slice is predicted.
    sources = [check_inputs(s.image, root / s.id / "unused.h5", planes=PLANE_SETS["9"], overwrite=True,
                            probabilities=False, tiff=None, work_dir=root / s.id, check_out=False) for s in tests]
    for s, source in zip(tests, sources):
        work = root / s.id
        files = {p: predict_plane(source, p, predictor, work / f"{p}.h5", model_id=model_id,
                                  batch_size=int(cfg.fusing.batch_size), tmp_dir=work,
                                  progress=bool(cfg.fusing.progress), rotation=rotation) for p in PLANE_SETS["9"]}
        save = {save_method: root / f"{s.id}_{save_method}.h5"} if save_method else None
        for m, cm in evaluate_methods(files, s.label, methods, save=save, uncertainty=True).items():
            cms[m] = cm if m not in cms else cms[m] + cm
        if save_method:
            saved[s.id] = str(root / f"{s.id}_{save_method}.h5")
        if not figures:  # the paper shows one test sample
            figures = [fig4_plane_probabilities(s.image, files, root / "fig4.png"),
                       fig5_overlay(s.image, s.label, Path(saved[s.id]) if saved else None, files, root / "fig5.png")]
        if not cfg.fusing.keep_planes:
            shutil.rmtree(work, ignore_errors=True)
    return Scored({m: iou_metrics(cm) for m, cm in cms.items()}, saved, figures, time.perf_counter() - t0)


def log_fusing_runs(uri: str, experiment_id: str, name: str, tags: dict[str, str], params: dict[str, tp.Any],
                    scored: Scored, methods: tp.Mapping[str, tuple[str, str]], predictions: tp.Optional[dict]) -> None:
    """1 parent + one child per method (schema in the module docstring); the parent is FINISHED after its children.
    ``predictions``: the predictions.json document, logged by the child of its ``method``."""
    parent = tracking.RunRecorder(uri, experiment_id, run_name=f"{name}-fusing", tags=tags)
    with parent:
        parent_id = parent.start()
        parent.log_params(params)
        for m, values in scored.metrics.items():
            child = tracking.RunRecorder(uri, experiment_id, run_name=f"{name}-{m}",
                                         tags={**tags, TAG_METHOD: m, PARENT_TAG: parent_id})
            with child:
                child.start()
                child.log_params({**params, "planes": methods[m][0], "vote": methods[m][1]})
                child.log_metrics(values)
                if predictions is not None and m == predictions["method"]:
                    child.log_text(json.dumps(predictions, indent=1), "predictions.json")
                child.finish("FINISHED")
        parent.log_metrics({f"{m}.{k}": v for m, vals in scored.metrics.items() for k, v in vals.items()})
        parent.log_metrics({"fusing_time_s": scored.seconds})
        for fig in scored.figures:
            parent.log_artifact(fig)
        parent.finish("FINISHED")


def predictions_doc(dataset_root: Path, method: tp.Optional[str], saved: tp.Mapping[str, str],
                    **extra: tp.Any) -> tp.Optional[dict]:
    """predictions.json (read by Table 3): dataset folder, method, test sample → saved labels; None if none saved."""
    if not method or not saved:
        return None
    return {"dataset": _portable(dataset_root), "method": method,
            "samples": {k: _portable(v) for k, v in saved.items()}, **extra}


def _summary(scored: Scored, what: str) -> dict[str, float]:
    best = max(scored.metrics, key=lambda m: scored.metrics[m]["mean_iou"])
    log.info("%s: fusing done in %.0f s; best mean IoU %.4f (%s)", what, scored.seconds,
             scored.metrics[best]["mean_iou"], best)
    return {"mean_iou": scored.metrics["avr_9"]["mean_iou"],
            **{f"{m}.mean_iou": v["mean_iou"] for m, v in scored.metrics.items()}}


def run_fusing(cfg: DictConfig) -> dict[str, float]:
    """One fusing job: 9 plane predictions per test sample, 7 methods scored, 1 + 7 MLflow runs.
    With ``fusing.ensemble=true``: the fold ensemble of the config instead (:func:`run_ensemble_fusing`)."""
    if ensemble_requested(cfg):
        return run_ensemble_fusing(cfg)
    plan = plan_run(cfg)
    check_fusing(cfg)
    tracking.check_tracking_uri(plan.tracking_uri)
    trained = select_trained_config(cfg, plan)
    plan = fusing_plan(plan, trained)
    log.info("%s: fusing the fold-%d model of config %s (%s), %s", plan.run_name, plan.fold, trained.config_key,
             trained.name, trained.note)
    train_run = trained_run(plan)
    dataset, tests = _test_samples(cfg)
    exp_id = tracking.ensure_experiment(plan.tracking_uri, fusing_experiment(cfg))
    done = finished_fusing(plan.tracking_uri, exp_id).get((plan.config_key, plan.fold))
    if done is not None:
        log.info("%s: fusing already FINISHED; skipping", plan.run_name)
        return done
    _discard_partial(plan.tracking_uri, exp_id, plan)

    from model.predict import keras_predictor, load_model

    methods = table2_methods()
    t0 = time.perf_counter()
    model, model_id = load_model(f"runs:/{train_run.info.run_id}/model", tracking_uri=plan.tracking_uri)
    predictor = keras_predictor(model, batch_size=int(cfg.fusing.batch_size))
    root = Path(cfg.paths.work) / "fusing" / plan.config_key / f"fold{plan.fold}"
    scored = predict_and_score(cfg, tests, predictor, model_id, root, methods, t0)

    tags = {tracking.TAG_CONFIG_KEY: plan.config_key, tracking.TAG_FOLD: str(plan.fold), TAG_TASK: "fusing",
            "experiment": str(cfg.get("experiment_name", "fusing")), "trained_run_id": train_run.info.run_id,
            "model_selection": trained.note, **tracking.environment_tags()}
    params = {"model.width": plan.paper_width, "model.depth": plan.depth, "model.input_size": plan.paper_input_size,
              "fold": plan.fold, "test_samples": ",".join(s.id for s in tests), "config_key": plan.config_key}
    doc = predictions_doc(dataset.root, OmegaConf.select(cfg, "fusing.save_method"), scored.saved)
    log_fusing_runs(plan.tracking_uri, exp_id, plan.run_name, tags, params, scored, methods, doc)
    return _summary(scored, plan.run_name)


# ---- the fold ensemble: one job over all folds of the config ----------------------------------------------------

TAG_ENSEMBLE = "ensemble_of_folds"
TAG_FOLD_VOTE = "fold_vote"


def ensemble_requested(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "fusing.ensemble", default=False) is True


def ensemble_methods() -> dict[str, tuple[str, str]]:
    """Table 2, rows Avr/MV 3-planes and Avr/MV 9-planes: the fusing methods scored for the fold ensemble. The
    single-plane baselines S_rc/S_cp/S_pr are left out: the ensemble row extends the paper's best method
    (Avr 9-planes), and the other fused rows cost nothing more from the same plane files."""
    methods = table2_methods()
    return {m: methods[m] for m in ("avr_3", "mv_3", "avr_9", "mv_9")}


def fold_ensemble_predictor(models: tp.Sequence, batch_size: int) -> tp.Callable:
    """Soft voting over the fold models (paper Eq. 4, applied across the cross-validation folds as the paper
    applies it across planes): their softmax probabilities averaged per slice batch, so the plane methods on
    top fuse folds × planes; one batch of every model in memory, all models in one compiled function (model.forward)."""
    from model.predict import models_predictor

    return models_predictor(list(models), batch_size=batch_size)


def ensemble_folds(plan: RunPlan) -> tuple[int, ...]:
    """All cross-validation folds of the config: the ensemble is the 4 fold models of Table 2's config."""
    return tuple(range(plan.num_folds))


def _folds_text(folds: tp.Sequence[int]) -> str:
    return ",".join(map(str, folds))


def fold_training_runs(plan: RunPlan) -> dict[int, tp.Any]:
    """fold → the FINISHED training run of every fold of the config; ConfigError (one line) if any is missing."""
    exp = training_experiment(plan)
    runs: dict[int, tp.Any] = {}
    for r in tracking.find_runs(plan.tracking_uri, exp, config_key=plan.config_key, status="FINISHED"):
        t = r.data.tags
        if t.get(TAG_METHOD) is None and str(t.get(tracking.TAG_FOLD, "")).isdigit():
            runs.setdefault(int(t[tracking.TAG_FOLD]), r)  # newest first: find_runs keeps MLflow's start-time order
    folds = ensemble_folds(plan)
    missing = [f for f in folds if f not in runs]
    if missing:
        which = f"fold {missing[0]} has" if len(missing) == 1 else f"folds {_folds_text(missing)} have"
        raise ConfigError("fusing.ensemble", f"needs a FINISHED training run of each of the {len(folds)} folds of "
                          f"config {plan.config_key} in experiment {plan.experiment!r}; {which} none "
                          f"({len(folds) - len(missing)} of {len(folds)} FINISHED): train them first (the same "
                          f"overrides with 'fold=range({len(folds)})' -m, without +experiment=fusing)")
    return {f: runs[f] for f in folds}


def _ensemble_runs(uri: str, experiment_id: str, config_key: str, folds: str) -> list:
    return [r for r in tracking.find_runs(uri, experiment_id, config_key=config_key)
            if r.data.tags.get(TAG_ENSEMBLE) == folds and r.data.tags.get(TAG_TASK) == "fusing"]


def finished_ensemble(uri: str, experiment_id: str, config_key: str, folds: str) -> tp.Optional[dict[str, float]]:
    """Metrics of the FINISHED ensemble parent run of (config, folds), None if there is none (what a rerun skips)."""
    for r in _ensemble_runs(uri, experiment_id, config_key, folds):
        if r.info.status == "FINISHED" and TAG_METHOD not in r.data.tags:
            m = dict(r.data.metrics)
            return {**m, "mean_iou": m.get("avr_9.mean_iou", float("nan"))}
    return None


def _discard_partial_ensemble(uri: str, experiment_id: str, config_key: str, folds: str) -> None:
    """Ensemble runs of an earlier attempt whose parent never finished would count twice: delete them."""
    client = tracking._client(uri)
    for r in _ensemble_runs(uri, experiment_id, config_key, folds):
        client.delete_run(r.info.run_id)


def check_ensemble(cfg: DictConfig) -> None:
    """``fusing.ensemble`` is a bool, and true only for a single job (one job covers all folds)."""
    value = OmegaConf.select(cfg, "fusing.ensemble", default=False)
    if not isinstance(value, bool):
        raise ConfigError("fusing.ensemble", f"must be true or false, got {value!r}")
    if value and _in_multirun(cfg):
        raise ConfigError("fusing.ensemble", "true is one job over all folds: run it without -m "
                                             "(python -m sweep +experiment=fusing fusing.ensemble=true <overrides>)")


def _in_multirun(cfg: DictConfig) -> bool:
    """A sweep: the sweeper's composed job configs carry ``hydra.mode``; a running job has HydraConfig instead."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if OmegaConf.select(cfg, "hydra.mode") == RunMode.MULTIRUN:
        return True
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_ensemble_fusing(cfg: DictConfig) -> dict[str, float]:
    """The fold ensemble of the selected config: its FINISHED fold models as one predictor, the 9 planes of each
    test sample predicted once, :func:`ensemble_methods` scored, 1 + 4 MLflow runs tagged ``ensemble_of_folds``."""
    plan = plan_run(cfg)
    check_fusing(cfg)
    tracking.check_tracking_uri(plan.tracking_uri)
    trained = select_trained_config(cfg, plan)
    plan = fusing_plan(plan, trained)
    train_runs = fold_training_runs(plan)
    folds = _folds_text(train_runs)
    name = f"{trained.name}-ensemble"
    log.info("%s: fusing the ensemble of folds %s of config %s, %s", name, folds, trained.config_key, trained.note)
    dataset, tests = _test_samples(cfg)
    exp_id = tracking.ensure_experiment(plan.tracking_uri, fusing_experiment(cfg))
    done = finished_ensemble(plan.tracking_uri, exp_id, plan.config_key, folds)
    if done is not None:
        log.info("%s: ensemble fusing already FINISHED; skipping", name)
        return done
    _discard_partial_ensemble(plan.tracking_uri, exp_id, plan.config_key, folds)

    from model.predict import load_models

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # 4 model downloads: no tqdm bars in logs
    methods = ensemble_methods()
    t0 = time.perf_counter()
    models, model_id = load_models([f"runs:/{r.info.run_id}/model" for r in train_runs.values()],
                                   tracking_uri=plan.tracking_uri)
    predictor = fold_ensemble_predictor(models, int(cfg.fusing.batch_size))
    root = Path(cfg.paths.work) / "fusing" / plan.config_key / "ensemble"
    scored = predict_and_score(cfg, tests, predictor, model_id, root, methods, t0)

    tags = {tracking.TAG_CONFIG_KEY: plan.config_key, TAG_ENSEMBLE: folds, TAG_FOLD_VOTE: "soft", TAG_TASK: "fusing",
            "experiment": str(cfg.get("experiment_name", "fusing")),
            "trained_run_ids": ",".join(r.info.run_id for r in train_runs.values()),
            "model_selection": trained.note, **tracking.environment_tags()}
    params = {"model.width": plan.paper_width, "model.depth": plan.depth, "model.input_size": plan.paper_input_size,
              "folds": folds, "test_samples": ",".join(s.id for s in tests), "config_key": plan.config_key}
    save_method = OmegaConf.select(cfg, "fusing.save_method")
    if save_method is not None and save_method not in methods:
        log.warning("%s: fusing.save_method %s is not scored for the ensemble: no predictions.json (Table 3 keeps "
                    "the per-fold ML row)", name, save_method)
    doc = predictions_doc(dataset.root, save_method if save_method in methods else None, scored.saved,
                          ensemble_of_folds=list(train_runs))
    log_fusing_runs(plan.tracking_uri, exp_id, name, tags, params, scored, methods, doc)
    return _summary(scored, name)
