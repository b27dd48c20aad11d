"""One parent MLflow run per config with its fold runs nested under it (mean ± standard error).

The paper reports every number as mean ± standard error over the 4 folds. The parent run of a
config carries those as metrics (``mean_iou`` and ``mean_iou_se``, ...), the config's params
(without the fold) and tags ``n_folds`` / ``folds`` / ``complete``; each FINISHED fold run gets
the tag ``mlflow.parentRunId``, so the MLflow UI shows configs as rows with their folds nested.
"""

from __future__ import annotations

import logging
import math
import re
import typing as tp
from collections import defaultdict

from model.evaluation import mean_and_standard_error
from sweep.tracking import client as tracking
from sweep.tracking.client import TAG_IS_PARENT

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
# Final metrics worth a mean ± SE; static model facts are copied, not averaged.
AVERAGED = ("iou_bone", "iou_degradation_layer", "iou_residual_material", "mean_iou", "final_val_loss",
            "iterations", "best_iteration", "wall_time_s", "train_time_s", "images_per_s")
STATIC = ("flops", "params", "receptive_field", "paper_receptive_field", "paper_flops", "paper_params")


def parent_name(child_name: str) -> str:
    return re.sub(r"-fold\d+$", "", child_name or "config")


def show_best_fold(uri: str, parent_id: str, kids: tp.Sequence[tp.Any]) -> None:
    """The parent row of the runs table shows the best fold's Dataset and Models (its dataset inputs and its logged
    model, linked as the parent's output), so a collapsed table is not a column of "-"; tag ``best_fold``."""
    best = max(kids, key=lambda r: r.data.metrics.get("mean_iou", float("-inf")))
    try:
        client = tracking._client(uri)
        full = client.get_run(best.info.run_id)
        if full.inputs is not None and full.inputs.dataset_inputs:
            client.log_inputs(parent_id, datasets=list(full.inputs.dataset_inputs))
        fold = best.data.tags[tracking.TAG_FOLD]
        if full.outputs is not None and full.outputs.model_outputs:
            best_fold_model(client, best.info.experiment_id, parent_id, fold, full.outputs.model_outputs[-1].model_id)
            parent = client.get_run(parent_id)
            have = {o.model_id for o in parent.outputs.model_outputs} if parent.outputs is not None else set()
            new = [o for o in full.outputs.model_outputs if o.model_id not in have]  # a link twice: IntegrityError
            if new:
                client.log_outputs(parent_id, models=new)
        tracking.set_run_tags(uri, parent_id, {"best_fold": fold, "best_fold_run_id": best.info.run_id})
    except Exception as exc:  # noqa: BLE001 - the UI's columns: the parent's metrics are what matters
        log.warning("parent run %s: could not show the best fold's dataset and model: %s", parent_id, exc)


BEST_FOLD_MODEL = "best-fold"


def best_fold_model(client, experiment_id: str, parent_id: str, fold: str, model_id: str) -> str:
    """MLflow 3.17's Models column lists the logged models whose source run is the row's run (not its linked
    outputs): the parent gets one named ``best-fold``, no files, tagged with the fold model it points to
    (``fold_model_uri``); kept once per parent, its tags follow a new best fold. Returns its model id."""
    tags = {"best_fold": str(fold), "fold_model_id": model_id, "fold_model_uri": f"models:/{model_id}"}
    found = client.search_logged_models(experiment_ids=[experiment_id],
                                        filter_string=f"source_run_id = '{parent_id}' AND name = '{BEST_FOLD_MODEL}'")
    if found:
        ref = found[0].model_id
        client.set_logged_model_tags(ref, tags)
        return ref
    return client.create_logged_model(experiment_id=experiment_id, name=BEST_FOLD_MODEL, source_run_id=parent_id,
                                      tags=tags).model_id


def link_parent_runs(uri: str, experiment_id: str, config_keys: tp.Optional[tp.Iterable[str]] = None,
                     num_folds: int = 4) -> dict[str, str]:
    """Create or update the parent run of each config (all, or those in ``config_keys``); returns key → parent id."""
    wanted = None if config_keys is None else set(config_keys)
    runs = tracking.find_runs(uri, experiment_id)
    parents: dict[str, tp.Any] = {}
    children: dict[str, list] = defaultdict(list)
    for r in runs:
        key = r.data.tags.get(tracking.TAG_CONFIG_KEY)
        if key is None or (wanted is not None and key not in wanted):
            continue
        if r.data.tags.get(TAG_IS_PARENT) == "true":
            parents[key] = r
        elif r.info.status == "FINISHED" and tracking.TAG_FOLD in r.data.tags:
            children[key].append(r)
    out = {}
    for key, kids in sorted(children.items()):
        kids.sort(key=lambda r: int(r.data.tags[tracking.TAG_FOLD]))
        folds = [int(r.data.tags[tracking.TAG_FOLD]) for r in kids]
        parent = parents.get(key)
        tags = {tracking.TAG_CONFIG_KEY: key, TAG_IS_PARENT: "true", "n_folds": str(len(kids)),
                "folds": ",".join(map(str, folds)), "complete": str(sorted(set(folds)) == list(range(num_folds))).lower()}
        for name in ("experiment",):
            if name in kids[0].data.tags:
                tags[name] = kids[0].data.tags[name]
        rec = tracking.RunRecorder(uri, experiment_id, run_id=None if parent is None else parent.info.run_id,
                                   run_name=parent_name(kids[0].info.run_name), tags=tags)
        # The parent spans its folds, so the UI's duration and start columns mean something.
        rec.start_time = min(c.info.start_time for c in kids)
        parent_id = rec.start()
        rec.set_tags(tags)
        common = {k: v for k, v in kids[0].data.params.items() if k != "fold"
                  and all(c.data.params.get(k) == v for c in kids)}
        rec.log_params(common)
        metrics: dict[str, float] = {}
        for m in AVERAGED:
            vals = [c.data.metrics[m] for c in kids if m in c.data.metrics and not math.isnan(c.data.metrics[m])]
            if vals:
                metrics[m], se = mean_and_standard_error(vals)
                if not math.isnan(se):
                    metrics[f"{m}_se"] = se
        for m in STATIC:
            if m in kids[0].data.metrics:
                metrics[m] = kids[0].data.metrics[m]
        metrics["n_folds"] = len(kids)
        rec.log_metrics(metrics)
        show_best_fold(uri, parent_id, kids)
        for c in kids:
            if c.data.tags.get(PARENT_TAG) != parent_id:
                tracking.set_run_tags(uri, c.info.run_id, {PARENT_TAG: parent_id})
        rec.finish("FINISHED", end_time=max(c.info.end_time or c.info.start_time for c in kids))
        if tags["complete"] != "true":
            log.warning("config %s (%s): only folds %s are FINISHED", key, parent_name(kids[0].info.run_name), folds)
        out[key] = parent_id
    return out
