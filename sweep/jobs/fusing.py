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
"""

from __future__ import annotations

import dataclasses
import json
import logging
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


def select_trained_config(cfg: DictConfig, plan: RunPlan) -> TrainedConfig:
    """Resolve ``fusing.model`` against the training experiment; ConfigError naming the field if impossible."""
    check_fusing(cfg)
    selection = str(OmegaConf.select(cfg, "fusing.model", default="best"))
    exp = tracking.ensure_experiment(plan.tracking_uri, plan.experiment)
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
    exp = tracking.ensure_experiment(plan.tracking_uri, plan.experiment)
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


def run_fusing(cfg: DictConfig) -> dict[str, float]:
    """One fusing job: 9 plane predictions per test sample, 7 methods scored, 1 + 7 MLflow runs."""
    plan = plan_run(cfg)
    check_fusing(cfg)
    tracking.check_tracking_uri(plan.tracking_uri)
    trained = select_trained_config(cfg, plan)
    plan = fusing_plan(plan, trained)
    log.info("%s: fusing the fold-%d model of config %s (%s), %s", plan.run_name, plan.fold, trained.config_key,
             trained.name, trained.note)
    train_run = trained_run(plan)
    dataset = load_dataset(ensure_dataset(cfg))
    tests = [s for s in dataset.samples if s.split == "test" and s.label is not None]
    if not tests:
        raise ConfigError("data.dataset", f"{dataset.manifest}: no test samples with labels")
    exp_id = tracking.ensure_experiment(plan.tracking_uri, fusing_experiment(cfg))
    done = finished_fusing(plan.tracking_uri, exp_id).get((plan.config_key, plan.fold))
    if done is not None:
        log.info("%s: fusing already FINISHED; skipping", plan.run_name)
        return done
    _discard_partial(plan.tracking_uri, exp_id, plan)

    from model.evaluation import iou_metrics
    from model.figures import fig4_plane_probabilities, fig5_overlay
    from model.inference import PLANE_SETS, evaluate_methods, predict_plane
    from model.predict import check_inputs, keras_predictor, load_model
    from model.rotate import make_rotation

    methods = table2_methods()
    save_method = OmegaConf.select(cfg, "fusing.save_method")
    root = Path(cfg.paths.work) / "fusing" / plan.config_key / f"fold{plan.fold}"
    t0 = time.perf_counter()
    model, model_id = load_model(f"runs:/{train_run.info.run_id}/model", tracking_uri=plan.tracking_uri)
    predictor = keras_predictor(model, batch_size=int(cfg.fusing.batch_size))
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
    metrics = {m: iou_metrics(cm) for m, cm in cms.items()}
    seconds = time.perf_counter() - t0

    tags = {tracking.TAG_CONFIG_KEY: plan.config_key, tracking.TAG_FOLD: str(plan.fold), TAG_TASK: "fusing",
            "experiment": str(cfg.get("experiment_name", "fusing")), "trained_run_id": train_run.info.run_id,
            "model_selection": trained.note, **tracking.environment_tags()}
    params = {"model.width": plan.paper_width, "model.depth": plan.depth, "model.input_size": plan.paper_input_size,
              "fold": plan.fold, "test_samples": ",".join(s.id for s in tests), "config_key": plan.config_key}
    parent = tracking.RunRecorder(plan.tracking_uri, exp_id, run_name=f"{plan.run_name}-fusing", tags=tags)
    with parent:
        parent_id = parent.start()
        parent.log_params(params)
        for m, values in metrics.items():
            child = tracking.RunRecorder(plan.tracking_uri, exp_id, run_name=f"{plan.run_name}-{m}",
                                         tags={**tags, TAG_METHOD: m, PARENT_TAG: parent_id})
            with child:
                child.start()
                child.log_params({**params, "planes": methods[m][0], "vote": methods[m][1]})
                child.log_metrics(values)
                if m == save_method:
                    child.log_text(json.dumps({"dataset": _portable(dataset.root), "method": m,
                                               "samples": {k: _portable(v) for k, v in saved.items()}}, indent=1),
                                   "predictions.json")
                child.finish("FINISHED")
        parent.log_metrics({f"{m}.{k}": v for m, vals in metrics.items() for k, v in vals.items()})
        parent.log_metrics({"fusing_time_s": seconds})
        for fig in figures:
            parent.log_artifact(fig)
        parent.finish("FINISHED")
    best = max(metrics, key=lambda m: metrics[m]["mean_iou"])
    log.info("%s: fusing done in %.0f s; best mean IoU %.4f (%s)", plan.run_name, seconds, metrics[best]["mean_iou"], best)
    return {"mean_iou": metrics["avr_9"]["mean_iou"], **{f"{m}.mean_iou": v["mean_iou"] for m, v in metrics.items()}}

