"""Read sweep results back from MLflow: one row per config (its parent run), folds counted, not guessed."""

from __future__ import annotations

import math
import typing as tp

import pandas as pd


def config_table(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """One row per config: width, depth, input_size (paper grid values), FLOPs, params, mean ± SE of IoUs, n_folds.

    Built from the FINISHED fold runs (not the parent runs), so it is right even before parents exist.
    """
    from mlflow.tracking import MlflowClient

    from model.evaluation import mean_and_standard_error

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} at {tracking_uri}")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    groups: dict[str, list] = {}
    for r in runs:
        if "fold" in r.data.tags and "config_key" in r.data.tags and "mean_iou" in r.data.metrics:
            groups.setdefault(r.data.tags["config_key"], []).append(r)
    rows = []
    for key, kids in groups.items():
        p, m = kids[0].data.params, kids[0].data.metrics
        row: dict[str, tp.Any] = {
            "config_key": key, "width": int(p["model.width"]), "depth": int(p["model.depth"]),
            "input_size": int(p["model.input_size"]), "flops": m.get("flops"), "params": m.get("params"),
            "paper_flops": m.get("paper_flops"), "n_folds": len(kids),
            "folds": ",".join(sorted(r.data.tags["fold"] for r in kids)),
        }
        for name in ("mean_iou", "iou_bone", "iou_degradation_layer", "iou_residual_material"):
            vals = [r.data.metrics[name] for r in kids if name in r.data.metrics and not math.isnan(r.data.metrics[name])]
            row[name], row[f"{name}_se"] = mean_and_standard_error(vals) if vals else (math.nan, math.nan)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["input_size", "depth", "width"]).reset_index(drop=True)
