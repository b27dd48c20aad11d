"""Build every figure and table the runs allow (``python -m analysis reports``), and the missing-run report.

Each builder takes the :class:`analysis.store.Runs` read once from MLflow, writes its files atomically
under ``out`` and returns a :class:`Part` (files written, one-line notes, warnings). A part whose runs do
not exist is skipped with a note (``Part.skipped``); only an unreadable store or a missing training
experiment is an error (:class:`analysis.store.StoreError`, raised by ``read_runs``).
"""

from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path

import pandas as pd

from analysis.formatting import atomic_write_csv
from analysis.results import (EXPECTED_FOLDS, config_table_from_runs, fig3_configs, fmt_int, halved_configs,
                              fold_pruned_configs, missing_training, skipped_configs)
from analysis.store import Runs, read_runs, tracking_client
from data.atomic import atomic_write_text

MISSING_COLUMNS = ["kind", "config_key", "width", "depth", "input_size", "method", "present_folds", "missing_folds",
                   "note"]


@dataclasses.dataclass
class Part:
    name: str
    written: list[Path] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    skipped: tp.Optional[str] = None  # why nothing was built


def fig3_part(runs: Runs, out: tp.Union[str, Path]) -> Part:
    """Fig. 3 (PNG, PDF) and configs.csv from the training runs (Optuna trials left out)."""
    from analysis.fig3 import fig3_note, plot_fig3

    part = Part("Fig. 3")
    table = config_table_from_runs(runs.training)
    if table.empty:
        part.skipped = f"no FINISHED training fold runs (other than Optuna trials) in experiment {runs.experiment!r}"
        return part
    chosen, left = fig3_configs(table)
    for r in chosen[~chosen.complete].itertuples():
        part.warnings.append(f"c0={r.width} d={r.depth} IS={r.input_size} ({r.config_key}): only folds {r.folds} "
                             f"FINISHED; plotted hollow as {r.n_folds}/{len(EXPECTED_FOLDS)} folds")
    for r in left.itertuples():
        part.warnings.append(f"config {r.config_key} (c0={r.width} d={r.depth} IS={r.input_size}) not plotted: "
                             "another config key for the same grid point has more folds")
    skipped = skipped_configs(runs.training)
    for (w, d, s), why in sorted(skipped.items()):
        part.warnings.append(f"c0={w} d={d} IS={s}: not trained, {why}")
    halved = halved_configs(chosen)
    for (w, d, s), why in sorted(halved.items()):
        part.warnings.append(f"c0={w} d={d} IS={s}: trained at a halved batch, {why}")
    pruned = fold_pruned_configs(runs.training)
    for (w, d, s), why in sorted(pruned.items()):
        part.warnings.append(f"c0={w} d={d} IS={s}: {why}")
    part.written += plot_fig3(chosen, out, skipped=skipped, halved=halved, pruned=pruned)
    if skipped or halved or pruned:  # what the note under the figure says about them, also on the console
        part.notes.append("note under the figure: " + fig3_note(chosen, n_expected=len(EXPECTED_FOLDS),
                                                                 skipped=skipped, halved=halved, pruned=pruned))
    table = table.assign(in_fig3=table.config_key.isin(chosen.config_key))
    part.written.append(atomic_write_csv(table, Path(out) / "configs.csv"))
    part.notes.append(f"{len(chosen)} configs plotted from {int(table.n_folds.sum())} fold runs")
    return part


def table2_part(runs: Runs, out: tp.Union[str, Path], config_key: tp.Optional[str] = None) -> tuple[Part, tp.Optional[str]]:
    """Table 2 (CSV, Markdown, LaTeX); also returns the config key it used (for Table 3)."""
    from analysis.table2 import choose_config, describe_config, table2, write_table2

    part = Part("Table 2")
    if runs.fusing is None:
        part.skipped = f"no fusing experiment {runs.fusing_experiment!r}"
        return part, None
    try:
        key, why = choose_config(runs.fusing, config_key)
    except ValueError as e:
        part.skipped = f"{e} in experiment {runs.fusing_experiment!r}"
        return part, None
    df = table2(runs.fusing, key)
    desc = describe_config(runs.fusing, key)
    title = f"Table 2: multi-axes prediction fusing, IoU ×100 (config {key}{', ' + desc if desc else ''})"
    part.written += write_table2(df, out, title=title)
    part.notes.append(why)
    ens = df[df.ensemble_of_folds != ""]
    if not ens.empty:
        part.notes.append(f"fold-ensemble rows ({', '.join(ens.method)}; folds {', '.join(sorted(set(ens.folds)))}): "
                          "one value per column, marked with † in the table")
    for r in df[~df.complete].itertuples():
        what = "an ensemble of " if r.ensemble_of_folds else ""
        part.warnings.append(f"Table 2, {r.label}: {what}{r.n_folds} of {len(EXPECTED_FOLDS)} folds "
                             f"(missing {r.missing_folds}); marked with * in the table")
    return part, key


def table3_part(runs: Runs, out: tp.Union[str, Path], config_key: tp.Optional[str] = None, *, roi_um: float = 100.0,
                measures_fn: tp.Optional[tp.Callable[..., dict]] = None, ml_from: str = "auto",
                calibration: tp.Any = None) -> Part:
    """Table 3 (CSV, Markdown, LaTeX) from the ``predictions.json`` artifacts of the config's fusing runs: ML from
    the fold-ensemble run when there is one (``ml_from``: auto, ensemble, folds), else from the per-fold runs."""
    from analysis.table2 import choose_config, describe_config
    from analysis.table3 import (ENSEMBLE, MEASURES_ARTIFACT, default_measures, log_measures_to_runs, ml_predictions,
                                 table3, table3_values, write_table3)

    part = Part("Table 3")
    if runs.fusing is None:
        part.skipped = f"no fusing experiment {runs.fusing_experiment!r}"
        return part
    try:
        key, _why = choose_config(runs.fusing, config_key)
    except ValueError as e:
        part.skipped = f"{e} in experiment {runs.fusing_experiment!r}"
        return part
    if measures_fn is None:
        try:
            measures_fn = default_measures()
        except ImportError as e:
            part.skipped = f"analysis.measures cannot be imported ({e})"
            return part
    try:
        preds = ml_predictions(tracking_client(runs.tracking_uri), runs.fusing, key, ml_from=ml_from)
    except Exception as e:  # noqa: BLE001 - an artifact store this machine cannot read: skip the part, say why
        part.skipped = f"cannot read the predictions.json artifacts of config {key}: {e}"
        return part
    if not preds:
        what = "fold-ensemble run" if ml_from == "ensemble" else "fusing run"
        part.skipped = f"no {what} of config {key} has a predictions.json artifact"
        return part
    try:
        values, notes = table3_values(preds, roi_um=roi_um, measures_fn=measures_fn)
    except (OSError, ValueError, KeyError) as e:  # DataError is a ValueError: a dataset or prediction not here
        part.skipped = f"cannot read the test samples or predictions: {e}"
        return part
    if not values:
        part.skipped = "predictions.json names no usable test sample"
        part.notes += notes
        return part
    df = table3(values, calibration=calibration)
    try:
        logged = log_measures_to_runs(tracking_client(runs.tracking_uri), preds, df)
        part.notes.append(f"measures with their intervals logged to {len(logged)} fusing run(s) as {MEASURES_ARTIFACT}")
    except Exception as e:  # noqa: BLE001 - a read-only store still gets its tables
        part.notes.append(f"could not log the measures to the fusing runs: {e}")
    methods = sorted({m for v in values.values() for m in v["methods"]} - {""}) or ["?"]
    desc = describe_config(runs.fusing, key)
    part.written += write_table3(df, out, roi_um=roi_um, method="/".join(methods), config=f"config {key}" + (f", {desc}" if desc else ""),
                                 title="Table 3: degradation rate, bone-to-implant contact, BV/TV per test sample")
    if ENSEMBLE in preds:
        doc = preds[ENSEMBLE]
        source = (f"ML from the fold-ensemble run {str(doc.get('run_id', '?'))[:8]} (folds "
                  f"{','.join(map(str, doc.get('ensemble_of_folds', [])))}, {doc.get('method', '?')})")
    else:
        source = f"ML from the predictions of folds {sorted(preds)}"
    part.notes += [f"{len(values)} test samples, {source} (config {key})"] + notes
    missing = [f for f in EXPECTED_FOLDS if f not in preds]
    if missing and ENSEMBLE not in preds:
        part.warnings.append(f"Table 3: no predictions.json for fold(s) {missing}; ML is the mean of "
                             f"{len(preds)} fold(s), marked with *")
    return part


def pareto_part(runs: Runs, out: tp.Union[str, Path]) -> Part:
    from analysis.pareto import optuna_table, write_pareto

    part = Part("Pareto front")
    df = optuna_table(runs.training)
    if df.empty:
        part.skipped = f"no FINISHED runs tagged experiment=optuna in {runs.experiment!r}"
        return part
    grid, _ = fig3_configs(config_table_from_runs(runs.training))
    part.written += write_pareto(df, out, grid=grid)
    part.notes.append(f"{int(df.pareto.sum())} of {len(df)} Optuna configs on the front")
    return part


def missing_rows(runs: Runs) -> pd.DataFrame:
    from analysis.table2 import missing_fusing

    rows = missing_training(runs.training)
    if runs.fusing is not None:
        rows += missing_fusing(runs.fusing)
    df = pd.DataFrame(rows, columns=MISSING_COLUMNS)
    for c in ("width", "depth", "input_size"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    return df


def missing_markdown(df: pd.DataFrame, runs: Runs) -> str:
    lines = ["# Missing runs", "",
             f"Expected: every (c0, d, IS) of the compound grid c0 ∈ {{32, 64, 96, 112}} × d ∈ {{3, 4, 5, 6}} × "
             f"IS ∈ {{384, 512, 640}} with folds {','.join(map(str, EXPECTED_FOLDS))} FINISHED in experiment "
             f"`{runs.experiment}`, and for each config with fusing runs in `{runs.fusing_experiment}` all 7 fusing "
             "methods × 4 folds. Incomplete configs are marked in the figures and tables (hollow markers, *), "
             "never averaged as if complete.", ""]
    halved = halved_configs(fig3_configs(config_table_from_runs(runs.training))[0])
    if halved:  # not missing, but not trained as configured either
        lines += [f"Trained at a halved global batch (GPU memory estimate; not missing, `batch_halved` in "
                  f"configs.csv): " + "; ".join(f"c0={w} d={d} IS={s}: {why}" for (w, d, s), why in sorted(halved.items())),
                  ""]
    if df.empty:
        return "\n".join(lines + ["No missing runs.", ""])
    lines += ["| kind | config | c0 | d | IS | method | folds present | folds missing | note |",
              "|---|---|---:|---:|---:|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.kind} | {r.config_key} | {fmt_int(r.width)} | {fmt_int(r.depth)} | {fmt_int(r.input_size)} | "
                     f"{r.method} | {r.present_folds} | {r.missing_folds} | {r.note} |")
    return "\n".join(lines) + "\n"


def missing_warnings(df: pd.DataFrame, max_absent: int = 8) -> list[str]:
    """One warning per incomplete config / method; configs with no run at all summarised when many."""
    absent = df[(df.kind == "training") & (df.present_folds == "")]
    out = []
    for r in df.itertuples():
        if r.kind == "training" and r.present_folds == "" and len(absent) > max_absent:
            continue
        what = f"c0={fmt_int(r.width)} d={fmt_int(r.depth)} IS={fmt_int(r.input_size)}" if fmt_int(r.width) else ""
        if r.method:
            what += f" method {r.method}"
        out.append(f"{r.kind} {r.config_key} {what}".strip() + (f": missing folds {r.missing_folds}" if r.missing_folds else "")
                   + (f" ({r.note})" if r.note else ""))
    if len(absent) > max_absent:
        out.insert(0, f"training: {len(absent)} of 48 grid configs have no FINISHED run (listed in missing.csv)")
    return out


def missing_part(runs: Runs, out: tp.Union[str, Path]) -> Part:
    part = Part("missing runs")
    df = missing_rows(runs)
    part.written.append(atomic_write_csv(df, Path(out) / "missing.csv"))
    part.written.append(atomic_write_text(Path(out) / "missing.md", missing_markdown(df, runs)))
    part.warnings += missing_warnings(df)
    part.notes.append(f"{len(df)} rows" if len(df) else "nothing missing")
    return part


def build_reports(tracking_uri: str, experiment: str = "scaling-unet", fusing_experiment: tp.Optional[str] = None,
                  out: tp.Union[str, Path] = "reports", *, roi_um: float = 100.0, config_key: tp.Optional[str] = None,
                  measures_fn: tp.Optional[tp.Callable[..., dict]] = None, runs: tp.Optional[Runs] = None,
                  ml_from: str = "auto", calibration: tp.Any = None) -> list[Part]:
    """Everything the runs allow; raises StoreError only for an unreadable store / missing training experiment."""
    if runs is None:
        runs = read_runs(tracking_uri, experiment, fusing_experiment)
    Path(out).mkdir(parents=True, exist_ok=True)
    parts = [fig3_part(runs, out)]
    t2, key = table2_part(runs, out, config_key)
    parts.append(t2)
    if key is None and t2.skipped:
        parts.append(Part("Table 3", skipped=t2.skipped))
    else:
        parts.append(table3_part(runs, out, key, roi_um=roi_um, measures_fn=measures_fn, ml_from=ml_from,
                                 calibration=calibration))
    parts.append(pareto_part(runs, out))
    parts.append(missing_part(runs, out))
    return parts
