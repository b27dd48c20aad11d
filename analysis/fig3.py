"""Paper Fig. 3: mean IoU (over folds and classes) against FLOPs for depth, width, input size and compound scaling.

Error bars: standard error over folds. A config with fewer than 4 FINISHED folds is drawn with a hollow
marker and labelled with its number of folds (it is never shown as if complete).
"""

from __future__ import annotations

import typing as tp
from pathlib import Path

import pandas as pd

BASELINE = {"width": 32, "depth": 3, "input_size": 384}
IS_STYLES = {384: ("-", "o"), 512: ("--", "s"), 640: (":", "^")}


def _gflops(x: float, _pos=None) -> str:
    return f"{x / 1e9:g}"


def _panel(ax, df: pd.DataFrame, label: str = "", color="C0", linestyle="-", marker="o") -> None:
    df = df.sort_values("flops")
    ax.errorbar(df["flops"], df["mean_iou"], yerr=df["mean_iou_se"].astype(float).fillna(0), color=color,
                linestyle=linestyle, marker=marker, capsize=3, label=label, markersize=5)
    part = df[~df["complete"].astype(bool)]
    if not part.empty:  # hollow: fewer folds than expected
        ax.plot(part["flops"], part["mean_iou"], linestyle="none", marker=marker, markersize=7,
                markerfacecolor="white", markeredgecolor=color, markeredgewidth=1.5, zorder=5)


def fig3_note(table: pd.DataFrame, *, n_expected: int = 4,
              skipped: tp.Optional[tp.Mapping[tuple[int, int, int], str]] = None,
              halved: tp.Optional[tp.Mapping[tuple[int, int, int], str]] = None,
              pruned: tp.Optional[tp.Mapping[tuple[int, int, int], str]] = None) -> str:
    """The note under Fig. 3: error bars, incomplete configs, and each config not trained or trained at a
    halved batch for GPU memory, with its estimate (the sweep's reason), and the folds fold pruning skipped."""
    complete = table.complete if "complete" in table else table.n_folds >= n_expected
    n_part = int((~complete.astype(bool)).sum()) if len(table) else 0
    note = f"Error bars: standard error over {n_expected} folds."
    if n_part:
        note += (f" Hollow markers: {n_part} config(s) with fewer than {n_expected} FINISHED folds "
                 "(mean over the folds present; see missing.csv).")
    if halved:
        note += "\nTrained at a halved global batch (estimated GPU memory over the launcher's gpu_mem_gb at the " \
                "configured batch; see configs.csv):"
        note += "".join(f"\n  c0={w} d={d} IS={s}²: {why}" for (w, d, s), why in sorted(halved.items()))
    if pruned:
        note += ("\nFolds not trained by fold pruning (fold_pruning.test: significantly worse than the best config on "
                 "the folds both finished; mean over the folds present; see missing.csv):")
        note += "".join(f"\n  c0={w} d={d} IS={s}²: {why}" for (w, d, s), why in sorted(pruned.items()))
    if skipped:
        note += "\nNot trained (estimated GPU memory over the launcher's gpu_mem_gb; see missing.csv):"
        note += "".join(f"\n  c0={w} d={d} IS={s}²: {why}" for (w, d, s), why in sorted(skipped.items()))
    return note


def plot_fig3(table: pd.DataFrame, out_dir: tp.Union[str, Path], *, title: str = "", n_expected: int = 4,
              skipped: tp.Optional[tp.Mapping[tuple[int, int, int], str]] = None,
              halved: tp.Optional[tp.Mapping[tuple[int, int, int], str]] = None,
              pruned: tp.Optional[tp.Mapping[tuple[int, int, int], str]] = None) -> list[Path]:
    """Four panels as in the paper; ``table`` has one row per (width, depth, input size) (results.fig3_configs).
    ``skipped``: configs the sweep did not train, ``halved``: configs trained at a halved batch, each with
    why (named in the note under the figure, :func:`fig3_note`). Writes fig3.png and fig3.pdf."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if "complete" not in table:
        table = table.assign(complete=table.n_folds >= n_expected)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    b = BASELINE
    fig, axes = plt.subplots(1, 4, figsize=(20, 5), sharey=True)
    panels = [
        ("(a) depth d (c0=32, IS=384²)", table[(table.width == b["width"]) & (table.input_size == b["input_size"])], "depth", "d"),
        ("(b) width c0 (d=3, IS=384²)", table[(table.depth == b["depth"]) & (table.input_size == b["input_size"])], "width", "c0"),
        ("(c) input size IS (c0=32, d=3)", table[(table.width == b["width"]) & (table.depth == b["depth"])], "input_size", "IS"),
    ]
    for ax, (name, df, var, short) in zip(axes, panels):
        if not df.empty:
            _panel(ax, df, color="C0")
            for _, r in df.iterrows():
                ax.annotate(f"{short}={r[var]}" + ("" if r.complete else f" ({r.n_folds}/{n_expected} folds)"),
                            (r.flops, r.mean_iou), textcoords="offset points", xytext=(4, 4), fontsize=7)
        else:
            ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", color="0.5")
        ax.set_title(name, fontsize=10)
    ax = axes[3]
    depths = sorted(table.depth.unique())
    for (size, depth), df in table.groupby(["input_size", "depth"]):
        ls, mk = IS_STYLES.get(int(size), ("-.", "D"))
        _panel(ax, df, label=f"IS={size}², d={depth}", color=plt.cm.viridis(depths.index(depth) / max(1, len(depths) - 1) * 0.9),
               linestyle=ls, marker=mk)
    ax.set_title("(d) compound: width c0 along each curve", fontsize=10)
    if not table.empty:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="colour: d, line: IS",
                  title_fontsize=7)
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_gflops))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("GFLOPs per image (forward, trained model)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean IoU (bone, DL, RM), mean ± SE over folds")
    fig.suptitle(title or "Scaling the U-net (paper Fig. 3)")
    note = fig3_note(table, n_expected=n_expected, skipped=skipped, halved=halved, pruned=pruned)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.text(0.01, 0.0, note, fontsize=8, color="0.3", va="top")  # below the axes; bbox_inches="tight" keeps it
    paths = [out_dir / "fig3.png", out_dir / "fig3.pdf"]
    for p in paths:
        tmp = p.with_name(f".{p.name}.tmp{p.suffix}")
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        tmp.replace(p)
    plt.close(fig)
    return paths
