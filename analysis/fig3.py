"""Paper Fig. 3: mean IoU (over folds and classes) against FLOPs for depth, width, input size and compound scaling."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import pandas as pd

BASELINE = {"width": 32, "depth": 3, "input_size": 384}


def _panel(ax, df: pd.DataFrame, label: str = "", **kw) -> None:
    df = df.sort_values("flops")
    ax.errorbar(df["flops"], df["mean_iou"], yerr=df["mean_iou_se"].fillna(0), marker="o", capsize=3, label=label, **kw)


def plot_fig3(table: pd.DataFrame, out_dir: tp.Union[str, Path], *, title: str = "") -> list[Path]:
    """Four panels as in the paper; error bars = standard error over folds. Writes fig3.png and fig3.pdf."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    b = BASELINE
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5), sharey=True)
    panels = [
        ("(a) depth d", table[(table.width == b["width"]) & (table.input_size == b["input_size"])], "depth"),
        ("(b) width c0", table[(table.depth == b["depth"]) & (table.input_size == b["input_size"])], "width"),
        ("(c) input size IS", table[(table.width == b["width"]) & (table.depth == b["depth"])], "input_size"),
    ]
    for ax, (name, df, var) in zip(axes, panels):
        if not df.empty:
            _panel(ax, df, color="C0")
            for _, r in df.iterrows():
                ax.annotate(f"{var}={r[var]}" + ("" if r.n_folds == 4 else f" ({r.n_folds} folds)"),
                            (r.flops, r.mean_iou), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(name)
    ax = axes[3]
    for i, ((size, depth), df) in enumerate(table.groupby(["input_size", "depth"])):
        _panel(ax, df, label=f"IS={size}², d={depth}", color=plt.cm.viridis(i / max(1, table.groupby(["input_size", "depth"]).ngroups - 1)))
    ax.set_title("(d) compound: width along each curve")
    ax.legend(fontsize=6, ncol=2)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs per image (forward, trained model)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean IoU (bone, DL, RM), mean ± SE over folds")
    fig.suptitle(title or "Scaling the U-net (paper Fig. 3)")
    fig.tight_layout()
    paths = [out_dir / "fig3.png", out_dir / "fig3.pdf"]
    for p in paths:
        tmp = p.with_name(f".{p.name}.tmp{p.suffix}")
        fig.savefig(tmp, dpi=120)
        tmp.replace(p)
    plt.close(fig)
    return paths
