"""The head-to-head table of docs/benchmarks.md: the scaled U-net's Table 2 rows beside 2D nnU-Net's.

    .venv/bin/python benchmarks/nnunet_table.py --table2 docs/demo_run/table2.csv \\
        --store demo/work/mlflow.db --nnunet "equal budget=benchmarks/results/nnunet_126s_2026-12-07.json" ...

Runs in the project's venv (no torch). Our rows: Table 2 of one demo run (IoU ×100 on the 3 test scans, mean ± SE
over the 4 folds, and the 4-fold ensemble) with the training seconds and images seen of its fold runs and the
fusing seconds per test scan from MLflow. nnU-Net's rows: each ``benchmarks/nnunet_compare.py`` result (single folds
mean ± SE, the ensemble of its folds), labelled by the text before ``=``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import typing as tp
from pathlib import Path

import pandas as pd

from analysis import formatting

CLASSES = ("iou_bone", "iou_degradation_layer", "iou_residual_material", "mean_iou")
OUR_ROWS = {("baseline_rc", False): "scaled U-net, Baseline S_rc (one plane set, as nnU-Net 2d)",
            ("avr_9", False): "scaled U-net, Avr 9-planes", ("avr_9", True): "scaled U-net, Avr 9-planes, 4-fold ensemble"}


def cell(mean: tp.Optional[float], se: tp.Optional[float] = math.nan) -> str:
    """Table 2's cell format (analysis.formatting.cell); the JSON writes a missing value as null."""
    return formatting.cell(math.nan if mean is None else float(mean), math.nan if se is None else float(se),
                           ".2f", " ± ")


def our_costs(store: Path, experiment: str) -> dict[str, float]:
    """Per fold: training seconds and images seen (iterations × batch); fusing seconds per test scan."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store.resolve()}")
    exp = client.get_experiment_by_name(experiment)
    fus = client.get_experiment_by_name(experiment + "-fusing")
    if exp is None or fus is None:
        raise SystemExit(f"error: --store: no experiment {experiment!r} (and its -fusing) in {store}")
    folds = [r for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
             if "iterations" in r.data.metrics and r.data.params.get("fold") is not None]
    seconds = [r.data.metrics["train_time_s"] for r in folds]
    images = [r.data.metrics["iterations"] * float(r.data.params.get("train.batch_size", 8)) for r in folds]
    fusing = {r.info.run_name: r.data.metrics.get("fusing_time_s", math.nan)
              for r in client.search_runs([fus.experiment_id]) if "fusing_time_s" in r.data.metrics}
    per_fold = [v for k, v in fusing.items() if "ensemble" not in k]
    ens = [v for k, v in fusing.items() if "ensemble" in k]
    return {"train_s": sum(seconds) / len(seconds), "images": sum(images) / len(images), "n_folds": len(folds),
            "fuse_s": sum(per_fold) / len(per_fold) if per_fold else math.nan, "fuse_ens_s": ens[0] if ens else math.nan}


def rows(table2: pd.DataFrame, costs: dict[str, float], n_test: int,
         nnunet: tp.Sequence[tuple[str, dict]]) -> list[str]:
    head = ("| Method | IoU Bone | IoU DL | IoU RM | Average | train s / fold | 2-core machine s / fold | "
            "images seen / fold | predict s / test scan |")
    out = [head, "|---|" + "---:|" * 8]
    for (method, ens), label in OUR_ROWS.items():
        sel = table2[(table2.method == method) & (table2.ensemble_of_folds.notna() == ens)]
        if sel.empty:
            continue
        r = sel.iloc[0]
        cells = [cell(r[c], math.nan if ens else r[f"{c}_se"]) for c in CLASSES]
        fuse = (costs["fuse_ens_s"] if ens else costs["fuse_s"]) / n_test
        out.append(f"| {label} | " + " | ".join(cells) + f" | {costs['train_s']:.0f} | {costs['machine_s']:.0f} | "
                   f"{costs['images']:.0f} | "
                   f"{fuse:.1f} (9 planes, all 7 methods) |")
    for name, doc in nnunet:
        tr = [t for t in doc["training"].values()]
        train_s = sum(t["train_seconds"] for t in tr) / len(tr)
        images = sum(t["images_seen"] for t in tr) / len(tr)
        its = sum(t["iterations"] for t in tr) / len(tr)
        mse = doc["single_folds_mean_se"]
        singles = [v for k, v in doc["predictions"].items() if k != "ensemble"]
        pred = sum(v["predict_seconds_per_scan"] for v in singles) / len(singles)
        out.append(f"| 2D nnU-Net, {name}, {len(tr)} fold(s) | " + " | ".join(cell(mse[c]["mean"], mse[c]["se"])
                                                                             for c in CLASSES)
                   + f" | {train_s:.0f} ({its:.0f} it.) | {train_s:.0f} | {images:.0f} | {pred:.1f} |")
        ens = doc["predictions"].get("ensemble")
        if ens and len(ens.get("folds", [])) > 1:
            out.append(f"| 2D nnU-Net, {name}, {len(ens['folds'])}-fold ensemble | "
                       + " | ".join(cell(ens[c]) for c in CLASSES)
                       + f" | | | | {ens['predict_seconds_per_scan']:.1f} |")
    return out


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table2", type=Path, default=Path("docs/demo_run/table2.csv"))
    ap.add_argument("--store", type=Path, default=Path("demo/work/mlflow.db"))
    ap.add_argument("--experiment", default="scaling-unet-table2")
    ap.add_argument("--n-test", type=int, default=3, help="test scans Table 2 scored (default 3)")
    ap.add_argument("--phases", type=Path, default=Path("docs/demo_run/phases.json"),
                    help="the demo's phase times: the Table 2 training's wall time / 4 = machine seconds per fold")
    ap.add_argument("--nnunet", action="append", default=[], metavar="LABEL=JSON")
    args = ap.parse_args(argv)
    nn = []
    for item in args.nnunet:
        label, _, path = item.partition("=")
        nn.append((label, json.loads(Path(path).read_text())))
    costs = our_costs(args.store, args.experiment)
    phases = {p["phase"]: p["seconds"] for p in json.loads(args.phases.read_text())}
    costs["machine_s"] = phases.get("table2", math.nan) / max(costs["n_folds"], 1)  # folds train side by side
    print("\n".join(rows(pd.read_csv(args.table2), costs, args.n_test, nn)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
