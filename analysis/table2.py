"""Paper Table 2 (multi-axes prediction fusing) from the fusing runs in MLflow, as CSV, Markdown, LaTeX.

Fusing runs (experiment ``<experiment>-fusing``): one FINISHED run per (config, fold, method), tags
``config_key``, ``fold``, ``task=fusing``, ``fusing_method``; metrics ``iou_bone``,
``iou_degradation_layer``, ``iou_residual_material``, ``mean_iou``. Fold-ensemble runs
(``python -m sweep +experiment=fusing fusing.ensemble=true``): the same tags and metrics, but no ``fold``;
instead ``ensemble_of_folds`` (e.g. ``0,1,2,3``). They give the extra rows "<method>, 4-fold ensemble":
one value per class (the ensemble's IoU), no standard error. Stores without them give the 7 rows alone.
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
TAG_ENSEMBLE = "ensemble_of_folds"  # fold-ensemble fusing runs (sweep.jobs.fusing.run_ensemble_fusing)
METHOD_LABELS = {"baseline_rc": "Baseline S_rc", "baseline_cp": "Baseline S_cp", "baseline_pr": "Baseline S_pr",
                 "avr_3": "Avr 3-planes", "mv_3": "MV 3-planes", "avr_9": "Avr 9-planes", "mv_9": "MV 9-planes"}
LATEX_LABELS = {"baseline_rc": r"Baseline $S_{rc}$", "baseline_cp": r"Baseline $S_{cp}$",
                "baseline_pr": r"Baseline $S_{pr}$"}
TABLE2_COLUMNS = (("iou_bone", "Bone"), ("iou_degradation_layer", "Degradation layer"),
                  ("iou_residual_material", "Residual material"), ("mean_iou", "Average"))


def _is_fusing_method_run(r: RunRecord) -> bool:
    t = r.tags
    return t.get("task", "fusing") == "fusing" and t.get("fusing_method") in METHODS and "config_key" in t


def fusing_key(r: RunRecord) -> tp.Optional[tuple]:
    """(config_key, method, fold) of a per-fold fusing run; None for anything else (fold-ensemble runs too)."""
    if not _is_fusing_method_run(r) or r.tags.get(TAG_ENSEMBLE):
        return None
    fold = r.fold()
    return None if fold is None else (r.tags["config_key"], r.tags["fusing_method"], fold)


def ensemble_key(r: RunRecord) -> tp.Optional[tuple]:
    """(config_key, method, folds text) of a fold-ensemble fusing run; None for anything else."""
    if not _is_fusing_method_run(r) or not r.tags.get(TAG_ENSEMBLE):
        return None
    return r.tags["config_key"], r.tags["fusing_method"], r.tags[TAG_ENSEMBLE]


def ensemble_folds(r: RunRecord) -> list[int]:
    """The folds of a fold-ensemble run (tag ``ensemble_of_folds``); unreadable entries are left out."""
    return [int(f) for f in str(r.tags.get(TAG_ENSEMBLE, "")).split(",") if f.strip().isdigit()]


def ensemble_runs(fusing: tp.Iterable[RunRecord], config_key: str) -> dict[str, RunRecord]:
    """method → the config's FINISHED fold-ensemble run, in Table 2 order; of several ensembles (fold sets) the
    one of most folds, then the latest."""
    done, _, _ = latest_finished(fusing, ensemble_key)
    best: dict[str, RunRecord] = {}
    for (k, m, _folds), r in done.items():
        old = best.get(m)
        if k == config_key and (old is None or (len(ensemble_folds(r)), r.end_time)
                                > (len(ensemble_folds(old)), old.end_time)):
            best[m] = r
    return {m: best[m] for m in METHODS if m in best}


def fusing_configs(fusing: tp.Iterable[RunRecord]) -> dict[str, int]:
    """config_key → number of FINISHED fusing runs (one per method and fold, and one per fold-ensemble method)."""
    fusing = list(fusing)
    out: dict[str, int] = {}
    for keyfn in (fusing_key, ensemble_key):
        done, _, _ = latest_finished(fusing, keyfn)
        for key, *_rest in done:
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
    for keyfn in (fusing_key, ensemble_key):
        done, _, _ = latest_finished(fusing, keyfn)
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


def _fold_row(method: str, label: str, runs: tp.Sequence[RunRecord], folds: tp.Sequence[int],
              expected_folds: tp.Sequence[int], ensemble: str) -> dict[str, tp.Any]:
    """One Table 2 row: mean and SE ×100 of ``runs`` per column (one run: its value, SE NaN)."""
    row: dict[str, tp.Any] = {"method": method, "label": label, "ensemble_of_folds": ensemble, "n_folds": len(folds),
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
    return row


def ensemble_label(method: str, n_folds: int) -> str:
    """Table 2 extension (not in the paper): the row of a method applied to the n-fold ensemble's probabilities,
    e.g. "Avr 9-planes, 4-fold ensemble"."""
    return f"{METHOD_LABELS[method]}, {n_folds}-fold ensemble"


def table2(fusing: tp.Iterable[RunRecord], config_key: str, *,
           expected_folds: tp.Sequence[int] = EXPECTED_FOLDS) -> pd.DataFrame:
    """One row per method (paper order): mean and SE over folds ×100 per column, folds used, ``complete``; then one
    row per method scored for the config's fold ensemble (one value per column, SE NaN; ``ensemble_of_folds`` set)."""
    fusing = list(fusing)
    done, _, _ = latest_finished(fusing, fusing_key)
    rows = []
    for method in METHODS:
        runs = sorted((r for (k, m, _f), r in done.items() if k == config_key and m == method), key=lambda r: r.fold())
        rows.append(_fold_row(method, METHOD_LABELS[method], runs, [tp.cast(int, r.fold()) for r in runs],
                              expected_folds, ""))
    for method, r in ensemble_runs(fusing, config_key).items():
        folds = ensemble_folds(r)
        rows.append(_fold_row(method, ensemble_label(method, len(folds)), [r], folds, expected_folds,
                              r.tags[TAG_ENSEMBLE]))
    return pd.DataFrame(rows)


def _is_ensemble(df: pd.DataFrame) -> pd.Series:
    return df.ensemble_of_folds.fillna("").astype(str) != "" if "ensemble_of_folds" in df else pd.Series(False, df.index)


def best_rows(df: pd.DataFrame, column: str, decimals: int = 2) -> set[int]:
    """Indices of the best (highest) mean in ``column`` at the printed precision; ties are all best.
    Only complete per-fold rows compete (unless no row is complete): the ensemble rows are one value, not a
    mean over folds, and Table 2 compares the fusing methods of single fold models."""
    df = df[~_is_ensemble(df)]
    pool = df[df.complete] if df.complete.any() else df
    vals = pool[column].round(decimals).dropna()
    if vals.empty:
        return set()
    return set(vals.index[vals == vals.max()])


def _incomplete_note(df: pd.DataFrame, n_expected: int) -> list[str]:
    notes = []
    for r, ens in zip(df.itertuples(), _is_ensemble(df)):
        if ens:
            if not r.complete:
                notes.append(f"{r.label}: an ensemble of folds {r.folds} only (missing {r.missing_folds}).")
        elif r.n_folds == 0:
            notes.append(f"{r.label}: no FINISHED run (missing folds {r.missing_folds}).")
        elif not r.complete:
            notes.append(f"{r.label}: mean over {r.n_folds} of {n_expected} folds only (folds {r.folds}; "
                         f"missing {r.missing_folds}).")
    return notes


def _ensemble_note(df: pd.DataFrame) -> tp.Optional[str]:
    """The footnote of the fold-ensemble rows (marked †); None without them."""
    ens = df[_is_ensemble(df)]
    if ens.empty:
        return None
    sets = " / ".join(sorted(set(ens.folds)))
    return (f"One value per column, not a mean over folds (no standard error): the IoU of one model, the ensemble "
            f"of the fold models (folds {sets}; their softmax probabilities averaged per slice, then the planes "
            "fused by the row's method), on the same test samples; not compared for bold.")


def table2_markdown(df: pd.DataFrame, *, title: str = "", n_expected: int = len(EXPECTED_FOLDS)) -> str:
    best = {c: best_rows(df, c) for c, _ in TABLE2_COLUMNS}
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| Method | " + " | ".join(f"IoU {h}" if c != "mean_iou" else h for c, h in TABLE2_COLUMNS) + " |")
    lines.append("|---|" + "---:|" * len(TABLE2_COLUMNS))
    ens = _is_ensemble(df)
    for i, r in df.iterrows():
        label = r.label + ("†" if ens[i] else "") + ("*" if not r.complete else "")
        cells = []
        for c, _ in TABLE2_COLUMNS:
            text = cell(r[c], r[f"{c}_se"], ".2f", " ± ")
            cells.append(f"**{text}**" if i in best[c] else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    per_fold = df[~_is_ensemble(df)]
    lines.append(f"Mean ± standard error over {n_expected} cross-validation folds, ×100; best per column in bold"
                 + (" (among complete rows)." if (~per_fold.complete).any() and per_fold.complete.any() else "."))
    if _ensemble_note(df):
        lines.append(f"† {_ensemble_note(df)}")
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
    ens = _is_ensemble(df)
    for i, r in df.iterrows():
        label = (tex_escape(r.label) + r"$^{\dagger}$" if ens[i] else LATEX_LABELS.get(r.method, tex_escape(r.label))
                 ) + ("$^{*}$" if not r.complete else "")
        cells = []
        for c, _ in TABLE2_COLUMNS:
            text = tex_unicode(cell(r[c], r[f"{c}_se"], ".2f", r" $\pm$ "))
            cells.append(r"\textbf{" + text + "}" if i in best[c] else text)
        out.append(label + " & " + " & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    notes = [f"Mean $\\pm$ standard error over {n_expected} folds, $\\times 100$; best per column in bold."]
    if _ensemble_note(df):
        notes.append(r"$^{\dagger}$ " + tex_escape(tp.cast(str, _ensemble_note(df))))
    notes += ["$^{*}$ " + tex_escape(n) for n in _incomplete_note(df, n_expected)]
    out += [r"\par\smallskip{\footnotesize " + r" \\ ".join(notes) + "}", r"\end{table}"]
    return "\n".join(out) + "\n"


def write_table2(df: pd.DataFrame, out_dir: tp.Union[str, Path], *, title: str = "") -> list[Path]:
    cols = ["method", "label", "ensemble_of_folds", "n_folds", "folds", "missing_folds", "complete"]
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
