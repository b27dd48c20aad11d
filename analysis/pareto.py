"""Pareto front of the ``+experiment=optuna`` search: maximise mean IoU, minimise FLOPs.

Each Optuna trial is one training run (fold 0, tag ``experiment=optuna``); trials of the same config
(same ``config_key``) are one point, the mean over their folds. A point is on the front when no other
point has at least its mean IoU and at most its FLOPs with one of the two strictly better.
"""

from __future__ import annotations

import math
import typing as tp
from pathlib import Path

import pandas as pd

from analysis.formatting import atomic_write_csv
from analysis.results import config_rows, is_optuna, latest_finished, training_fold_key
from analysis.store import RunRecord


def pareto_mask(iou: tp.Sequence[float], flops: tp.Sequence[float]) -> list[bool]:
    """True for the non-dominated points (maximise ``iou``, minimise ``flops``); NaNs are never on the front.
    Equal points do not dominate each other."""
    pts = list(zip(map(float, iou), map(float, flops)))
    out = []
    for i, (a, fa) in enumerate(pts):
        if math.isnan(a) or math.isnan(fa):
            out.append(False)
            continue
        dominated = any(j != i and not (math.isnan(b) or math.isnan(fb)) and b >= a and fb <= fa and (b > a or fb < fa)
                        for j, (b, fb) in enumerate(pts))
        out.append(not dominated)
    return out


def optuna_table(training: tp.Iterable[RunRecord]) -> pd.DataFrame:
    """One row per Optuna config (mean over its FINISHED folds) with ``learning_rate`` and ``pareto``."""
    runs = [r for r in training if is_optuna(r)]
    done, _, _ = latest_finished(runs, training_fold_key)
    df = config_rows(done, expected_folds=(0,))
    if df.empty:
        return df.assign(learning_rate=pd.Series(dtype=float), run_ids=pd.Series(dtype=str),
                         pareto=pd.Series(dtype=bool))
    lr, ids = {}, {}
    for (key, _f), r in done.items():
        lr.setdefault(key, r.params.get("train.learning_rate"))
        ids.setdefault(key, []).append(r.run_id)
    df["learning_rate"] = [float(lr[k]) if lr.get(k) not in (None, "") else math.nan for k in df.config_key]
    df["run_ids"] = [",".join(sorted(ids[k])) for k in df.config_key]
    df["flops"] = df["flops"].astype(float)
    df["pareto"] = pareto_mask(df["mean_iou"], df["flops"])
    return df.sort_values(["flops", "mean_iou"], ascending=[True, False]).reset_index(drop=True)


def write_pareto(df: pd.DataFrame, out_dir: tp.Union[str, Path], *, grid: tp.Optional[pd.DataFrame] = None) -> list[Path]:
    """pareto.csv (every trial, ``pareto`` column) and pareto.png (trials, front as a step line, grid configs grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = ["config_key", "width", "depth", "input_size", "learning_rate", "flops", "params", "mean_iou", "mean_iou_se",
            "n_folds", "folds", "pareto", "run_ids", "iou_bone", "iou_degradation_layer", "iou_residual_material"]
    paths = [atomic_write_csv(df[cols], out_dir / "pareto.csv")]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    if grid is not None and not grid.empty:
        ax.scatter(grid.flops, grid.mean_iou, s=14, color="0.75", label="grid configs (mean over folds)", zorder=1)
    off = df[~df.pareto]
    on = df[df.pareto].sort_values("flops")
    ax.scatter(off.flops, off.mean_iou, s=28, color="C0", alpha=0.6, label=f"Optuna trials ({len(df)})", zorder=2)
    ax.step(on.flops, on.mean_iou, where="post", color="C3", lw=1.5, zorder=3)
    ax.scatter(on.flops, on.mean_iou, s=48, color="C3", edgecolor="k", label=f"Pareto front ({len(on)})", zorder=4)
    for r in on.itertuples():
        ax.annotate(f"c0={r.width} d={r.depth} IS={r.input_size}", (r.flops, r.mean_iou), textcoords="offset points",
                    xytext=(5, -10), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p=None: f"{x / 1e9:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("GFLOPs per image (forward, trained model)")
    ax.set_ylabel("mean IoU (bone, DL, RM)")
    ax.set_title("Optuna search: mean IoU vs FLOPs (maximise IoU, minimise FLOPs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    p = out_dir / "pareto.png"
    tmp = p.with_name(f".{p.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(p)
    plt.close(fig)
    return paths + [p]
