"""Paper Table 2 (multi-axes prediction fusing) from the fusing runs in MLflow, as CSV, Markdown, LaTeX.

Fusing runs (experiment ``<experiment>-fusing``): one FINISHED run per (config, fold, method), tags
``config_key``, ``fold``, ``task=fusing``, ``fusing_method``; metrics ``iou_bone``,
``iou_degradation_layer``, ``iou_residual_material``, ``mean_iou``.
"""

from __future__ import annotations

import math
import typing as tp
from pathlib import Path

import pandas as pd

from analysis.formatting import cell, tex_escape, tex_unicode, write_table_files
from analysis.results import EXPECTED_FOLDS, IOU_METRICS, latest_finished, mean_of_classes, se100
from analysis.store import RunRecord
from model.planes import TABLE2_METHODS

METHODS = tuple(TABLE2_METHODS)  # row order of Table 2, as the fusing runs name them
METHOD_LABELS = {"baseline_rc": "Baseline S_rc", "baseline_cp": "Baseline S_cp", "baseline_pr": "Baseline S_pr",
                 "avr_3": "Avr 3-planes", "mv_3": "MV 3-planes", "avr_9": "Avr 9-planes", "mv_9": "MV 9-planes"}
LATEX_LABELS = {"baseline_rc": r"Baseline $S_{rc}$", "baseline_cp": r"Baseline $S_{cp}$",
                "baseline_pr": r"Baseline $S_{pr}$"}
TABLE2_COLUMNS = (("iou_bone", "Bone"), ("iou_degradation_layer", "Degradation layer"),
                  ("iou_residual_material", "Residual material"), ("mean_iou", "Average"))


def fusing_key(r: RunRecord) -> tp.Optional[tuple]:
    """(config_key, method, fold) of a fusing run; None for anything else."""
    t = r.tags
    if t.get("task", "fusing") != "fusing" or t.get("fusing_method") not in METHODS or "config_key" not in t:
        return None
    fold = r.fold()
    return None if fold is None else (t["config_key"], t["fusing_method"], fold)


def fusing_configs(fusing: tp.Iterable[RunRecord]) -> dict[str, int]:
    """config_key → number of FINISHED fusing runs (one per method and fold)."""
    done, _, _ = latest_finished(fusing, fusing_key)
    out: dict[str, int] = {}
    for key, _m, _f in done:
        out[key] = out.get(key, 0) + 1
    return out


def choose_config(fusing: tp.Sequence[RunRecord], config_key: tp.Optional[str] = None) -> tuple[str, str]:
    """The config for Tables 2/3 and a one-line note why. ValueError if there is none (or not the one asked)."""
    counts = fusing_configs(fusing)
    if config_key is not None:
        if config_key not in counts:
            known = ", ".join(f"{k} ({n} runs)" for k, n in sorted(counts.items())) or "none"
            raise ValueError(f"no FINISHED fusing runs for config {config_key!r} (configs with fusing runs: {known})")
        return config_key, f"config {config_key} (--config-key), {counts[config_key]} fusing runs"
    if not counts:
        raise ValueError("no FINISHED fusing runs")
    if len(counts) == 1:
        key = next(iter(counts))
        return key, f"config {key}, the only one with fusing runs ({counts[key]} runs)"
    latest = {}
    done, _, _ = latest_finished(fusing, fusing_key)
    for (k, _m, _f), r in done.items():
        latest[k] = max(latest.get(k, 0), r.end_time)
    key = max(counts, key=lambda k: (counts[k], latest[k]))
    others = ", ".join(f"{k} ({n})" for k, n in sorted(counts.items()) if k != key)
    return key, (f"config {key}, the one with most fusing runs ({counts[key]}); others: {others} "
                 "(choose with --config-key)")


def describe_config(fusing: tp.Iterable[RunRecord], key: str) -> str:
    """``c0=…, d=…, IS=…²`` of the config's fusing runs, with how the fusing sweep chose it (tag ``model_selection``)."""
    for r in fusing:
        if r.tags.get("config_key") == key:
            w, d, s = (r.int_param(p) for p in ("model.width", "model.depth", "model.input_size"))
            if None not in (w, d, s):
                how = r.tags.get("model_selection")
                return f"c0={w}, d={d}, IS={s}²" + (f"; {how}" if how else "")
    return ""


def table2(fusing: tp.Iterable[RunRecord], config_key: str, *,
           expected_folds: tp.Sequence[int] = EXPECTED_FOLDS) -> pd.DataFrame:
    """One row per method (paper order): mean and SE over folds ×100 per column, folds used, ``complete``."""
    done, _, _ = latest_finished(fusing, fusing_key)
    rows = []
    for method in METHODS:
        runs = sorted((r for (k, m, _f), r in done.items() if k == config_key and m == method), key=lambda r: r.fold())
        folds = [r.fold() for r in runs]
        row: dict[str, tp.Any] = {"method": method, "label": METHOD_LABELS[method], "n_folds": len(runs),
                                  "folds": ",".join(map(str, folds)),
                                  "missing_folds": ",".join(str(f) for f in expected_folds if f not in folds),
                                  "complete": set(expected_folds) <= set(folds)}
        for name in IOU_METRICS:
            vals = [r.metric(name) for r in runs]
            if name == "mean_iou":
                vals = [v if not math.isnan(v) else mean_of_classes(r) for v, r in zip(vals, runs)]
            mean, se = se100(vals)
            row[name], row[f"{name}_se"] = mean * 100, se * 100
            row[f"{name}_n"] = sum(not math.isnan(v) for v in vals)
        rows.append(row)
    return pd.DataFrame(rows)


def best_rows(df: pd.DataFrame, column: str, decimals: int = 2) -> set[int]:
    """Indices of the best (highest) mean in ``column`` at the printed precision; ties are all best.
    Only complete rows compete, unless no row is complete."""
    pool = df[df.complete] if df.complete.any() else df
    vals = pool[column].round(decimals).dropna()
    if vals.empty:
        return set()
    return set(vals.index[vals == vals.max()])


def _incomplete_note(df: pd.DataFrame, n_expected: int) -> list[str]:
    notes = []
    for r in df.itertuples():
        if r.n_folds == 0:
            notes.append(f"{r.label}: no FINISHED run (missing folds {r.missing_folds}).")
        elif not r.complete:
            notes.append(f"{r.label}: mean over {r.n_folds} of {n_expected} folds only (folds {r.folds}; "
                         f"missing {r.missing_folds}).")
    return notes


def table2_markdown(df: pd.DataFrame, *, title: str = "", n_expected: int = len(EXPECTED_FOLDS)) -> str:
    best = {c: best_rows(df, c) for c, _ in TABLE2_COLUMNS}
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| Method | " + " | ".join(f"IoU {h}" if c != "mean_iou" else h for c, h in TABLE2_COLUMNS) + " |")
    lines.append("|---|" + "---:|" * len(TABLE2_COLUMNS))
    for i, r in df.iterrows():
        label = r.label + ("*" if not r.complete else "")
        cells = []
        for c, _ in TABLE2_COLUMNS:
            text = cell(r[c], r[f"{c}_se"], ".2f", " ± ")
            cells.append(f"**{text}**" if i in best[c] else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± standard error over {n_expected} cross-validation folds, ×100; best per column in bold"
                 + (" (among complete rows)." if (~df.complete).any() and df.complete.any() else "."))
    for note in _incomplete_note(df, n_expected):
        lines.append(f"\\* {note}")
    return "\n".join(lines) + "\n"


def table2_latex(df: pd.DataFrame, *, caption: str = "", n_expected: int = len(EXPECTED_FOLDS)) -> str:
    best = {c: best_rows(df, c) for c, _ in TABLE2_COLUMNS}
    out = [r"\begin{table}[ht]", r"\centering"]
    if caption:
        out.append(r"\caption{" + tex_escape(caption) + "}")
    out += [r"\begin{tabular}{l" + "c" * len(TABLE2_COLUMNS) + "}", r"\toprule",
            "Method & " + " & ".join(("IoU " if c != "mean_iou" else "") + h for c, h in TABLE2_COLUMNS) + r" \\",
            r"\midrule"]
    for i, r in df.iterrows():
        label = LATEX_LABELS.get(r.method, tex_escape(r.label)) + ("$^{*}$" if not r.complete else "")
        cells = []
        for c, _ in TABLE2_COLUMNS:
            text = tex_unicode(cell(r[c], r[f"{c}_se"], ".2f", r" $\pm$ "))
            cells.append(r"\textbf{" + text + "}" if i in best[c] else text)
        out.append(label + " & " + " & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    notes = [f"Mean $\\pm$ standard error over {n_expected} folds, $\\times 100$; best per column in bold."]
    notes += ["$^{*}$ " + tex_escape(n) for n in _incomplete_note(df, n_expected)]
    out += [r"\par\smallskip{\footnotesize " + r" \\ ".join(notes) + "}", r"\end{table}"]
    return "\n".join(out) + "\n"


def write_table2(df: pd.DataFrame, out_dir: tp.Union[str, Path], *, title: str = "") -> list[Path]:
    cols = ["method", "label", "n_folds", "folds", "missing_folds", "complete"]
    cols += [f"{m}{s}" for m, _ in TABLE2_COLUMNS for s in ("", "_se", "_n")]
    return write_table_files(out_dir, "table2", df[cols], table2_markdown(df, title=title),
                             table2_latex(df, caption=title))


def missing_fusing(fusing: tp.Iterable[RunRecord], *, expected_folds: tp.Sequence[int] = EXPECTED_FOLDS) -> list[dict]:
    """Missing (method, fold) fusing runs of every config that has fusing runs, with FAILED/RUNNING runs named."""
    fusing = list(fusing)
    done, dupes, other = latest_finished(fusing, fusing_key)
    rows = []
    for key in sorted(fusing_configs(fusing)):
        rec = next(r for (k, _m, _f), r in done.items() if k == key)
        w, d, s = (rec.int_param(p) for p in ("model.width", "model.depth", "model.input_size"))
        for method in METHODS:
            folds = sorted(f for (k, m, f) in done if k == key and m == method)
            miss = [f for f in expected_folds if f not in folds]
            if not miss:
                continue
            notes = [f"fold {f}: {r.status} run {r.run_id[:8]}" for f in miss for r in other.get((key, method, f), [])]
            rows.append(dict(kind="fusing", config_key=key, width=w, depth=d, input_size=s, method=method,
                             present_folds=",".join(map(str, folds)), missing_folds=",".join(map(str, miss)),
                             note="; ".join(notes) or f"{len(folds)} of {len(expected_folds)} folds FINISHED"))
    for (key, method, fold), rs in sorted(dupes.items()):
        rows.append(dict(kind="fusing (duplicate)", config_key=key, width=None, depth=None, input_size=None,
                         method=method, present_folds=str(fold), missing_folds="",
                         note=f"{len(rs) + 1} FINISHED runs for fold {fold}; the latest is used"))
    return rows
