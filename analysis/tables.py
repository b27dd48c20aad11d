"""Paper Table 2 (multi-axes prediction fusing) and Table 3 (DR, BIC, BV/TV) from MLflow, as CSV, Markdown, LaTeX.

Fusing runs (experiment ``<experiment>-fusing``): one FINISHED run per (config, fold, method), tags
``config_key``, ``fold``, ``task=fusing``, ``fusing_method``; metrics ``iou_bone``,
``iou_degradation_layer``, ``iou_residual_material``, ``mean_iou``. A run may carry the artifact
``predictions.json`` = {"dataset": folder, "method": m, "samples": {id: HDF5 file with ``labels``}},
which Table 3 reads.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import typing as tp
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import (EXPECTED_FOLDS, IOU_METRICS, RunRecord, atomic_write_csv,
                              atomic_write_text, latest_finished, mean_of_classes, se100)
from model.planes import TABLE2_METHODS

METHODS = tuple(TABLE2_METHODS)  # row order of Table 2, as the fusing runs name them
METHOD_LABELS = {"baseline_rc": "Baseline S_rc", "baseline_cp": "Baseline S_cp", "baseline_pr": "Baseline S_pr",
                 "avr_3": "Avr 3-planes", "mv_3": "MV 3-planes", "avr_9": "Avr 9-planes", "mv_9": "MV 9-planes"}
LATEX_LABELS = {"baseline_rc": r"Baseline $S_{rc}$", "baseline_cp": r"Baseline $S_{cp}$",
                "baseline_pr": r"Baseline $S_{pr}$"}
TABLE2_COLUMNS = (("iou_bone", "Bone"), ("iou_degradation_layer", "Degradation layer"),
                  ("iou_residual_material", "Residual material"), ("mean_iou", "Average"))
PREDICTIONS_ARTIFACT = "predictions.json"
DEFAULT_PREDICTION_METHOD = "avr_9"  # paper, Fig. 5 caption: the ML segmentation is "Avr., 9-planes"


# ----------------------------------------------------------------------------------------------- Table 2


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


def _cell(mean: float, se: float, fmt: str, pm: str) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:{fmt}}" if math.isnan(se) else f"{mean:{fmt}}{pm}{se:{fmt}}"


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
            text = _cell(r[c], r[f"{c}_se"], ".2f", " ± ")
            cells.append(f"**{text}**" if i in best[c] else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± standard error over {n_expected} cross-validation folds, ×100; best per column in bold"
                 + (" (among complete rows)." if (~df.complete).any() and df.complete.any() else "."))
    for note in _incomplete_note(df, n_expected):
        lines.append(f"\\* {note}")
    return "\n".join(lines) + "\n"


_TEX_UNICODE = (("×", r"$\times$"), ("²", r"$^2$"), ("±", r"$\pm$"), ("µ", r"$\mu$"), ("−", "$-$"), ("–", "--"),
                ("∈", r"$\in$"))


def _tex_unicode(text: str) -> str:
    """The few non-ASCII characters the tables use, as LaTeX (pdflatex-safe)."""
    for a, b in _TEX_UNICODE:
        text = text.replace(a, b)
    return text


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(a, b)
    return _tex_unicode(text)


def table2_latex(df: pd.DataFrame, *, caption: str = "", n_expected: int = len(EXPECTED_FOLDS)) -> str:
    best = {c: best_rows(df, c) for c, _ in TABLE2_COLUMNS}
    out = [r"\begin{table}[ht]", r"\centering"]
    if caption:
        out.append(r"\caption{" + _tex_escape(caption) + "}")
    out += [r"\begin{tabular}{l" + "c" * len(TABLE2_COLUMNS) + "}", r"\toprule",
            "Method & " + " & ".join(("IoU " if c != "mean_iou" else "") + h for c, h in TABLE2_COLUMNS) + r" \\",
            r"\midrule"]
    for i, r in df.iterrows():
        label = LATEX_LABELS.get(r.method, _tex_escape(r.label)) + ("$^{*}$" if not r.complete else "")
        cells = []
        for c, _ in TABLE2_COLUMNS:
            text = _tex_unicode(_cell(r[c], r[f"{c}_se"], ".2f", r" $\pm$ "))
            cells.append(r"\textbf{" + text + "}" if i in best[c] else text)
        out.append(label + " & " + " & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    notes = [f"Mean $\\pm$ standard error over {n_expected} folds, $\\times 100$; best per column in bold."]
    notes += ["$^{*}$ " + _tex_escape(n) for n in _incomplete_note(df, n_expected)]
    out += [r"\par\smallskip{\footnotesize " + r" \\ ".join(notes) + "}", r"\end{table}"]
    return "\n".join(out) + "\n"


def write_table2(df: pd.DataFrame, out_dir: tp.Union[str, Path], *, title: str = "") -> list[Path]:
    out_dir = Path(out_dir)
    cols = ["method", "label", "n_folds", "folds", "missing_folds", "complete"]
    cols += [f"{m}{s}" for m, _ in TABLE2_COLUMNS for s in ("", "_se", "_n")]
    return [atomic_write_csv(df[cols], out_dir / "table2.csv"),
            atomic_write_text(out_dir / "table2.md", table2_markdown(df, title=title)),
            atomic_write_text(out_dir / "table2.tex", table2_latex(df, caption=title))]


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


# ----------------------------------------------------------------------------------------------- Table 3

MEASURES = (("dr_mm_per_year", "DR [mm/year]", ".3f"), ("bic_percent", "BIC [%]", ".1f"),
            ("bv_tv_percent", "BV/TV [%]", ".1f"))
SEGMENTATIONS = ("WF", "HQ", "ML")


def find_predictions(client, fusing: tp.Iterable[RunRecord], config_key: str, *,
                     prefer: str = DEFAULT_PREDICTION_METHOD) -> dict[int, dict]:
    """fold → parsed ``predictions.json`` (plus ``run_id``) of the config's fusing runs; per fold the run of
    method ``prefer`` is tried first, then the others in Table 2 order."""
    done, _, _ = latest_finished(fusing, fusing_key)
    order = [prefer] + [m for m in METHODS if m != prefer]
    by_fold: dict[int, list[RunRecord]] = {}
    for (k, m, f), r in done.items():
        if k == config_key:
            by_fold.setdefault(f, []).append(r)
    found: dict[int, dict] = {}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in the report output
    with tempfile.TemporaryDirectory(prefix="scaling-unet-analysis-") as tmp:
        for fold, runs in sorted(by_fold.items()):
            for r in sorted(runs, key=lambda r: order.index(r.tags["fusing_method"])):
                names = {a.path for a in client.list_artifacts(r.run_id)}
                if PREDICTIONS_ARTIFACT not in names:
                    continue
                local = client.download_artifacts(r.run_id, PREDICTIONS_ARTIFACT, str(Path(tmp) / r.run_id))
                doc = json.loads(Path(local).read_text(encoding="utf-8"))
                doc["run_id"] = r.run_id
                doc.setdefault("method", r.tags["fusing_method"])
                found[fold] = doc
                break
    return found


def _path(text: str) -> Path:
    return Path(str(text)).expanduser().resolve()


def default_measures():
    from analysis.measures import implant_measures  # written separately; imported only when Table 3 is built

    return implant_measures


def table3_values(predictions: tp.Mapping[int, dict], *, roi_um: float = 100.0,
                  measures_fn: tp.Optional[tp.Callable[..., dict]] = None, slab: int = 64
                  ) -> tuple[dict[str, dict[str, tp.Any]], list[str]]:
    """Measures per test sample: {"WF": dict|None, "HQ": dict, "ML": [dict per fold], "folds": [...], "days": t}.

    HQ = the sample's ``label`` in the dataset, WF = its ``wf_label``; ML = each fold's prediction file.
    Returns (values, notes about what was skipped)."""
    import h5py

    from data.manifest import load_dataset
    from data.volume import open_volume

    fn = measures_fn or default_measures()
    notes: list[str] = []
    datasets: dict[Path, tp.Any] = {}
    values: dict[str, dict[str, tp.Any]] = {}

    def measure(arr, sample) -> dict:
        return fn(arr, voxel_size_um=sample.voxel_size_um, roi_um=roi_um, initial_volume_mm3=sample.initial_volume_mm3,
                  initial_surface_mm2=sample.initial_surface_mm2, days=sample.implantation_days, slab=slab)

    def interval(f, sample, fused: dict) -> dict:
        from analysis.intervals import measure_intervals

        return measure_intervals(f["labels"], f["disagreement"], f["plane_classes"], fused=fused,
                                 voxel_size_um=sample.voxel_size_um, roi_um=roi_um,
                                 initial_volume_mm3=sample.initial_volume_mm3,
                                 initial_surface_mm2=sample.initial_surface_mm2, days=sample.implantation_days,
                                 slab=slab) if fn is default_measures() else {}  # a stand-in measure has no interval

    for fold, doc in sorted(predictions.items()):
        folder = _path(doc["dataset"])
        if folder not in datasets:
            datasets[folder] = load_dataset(folder)
        ds = datasets[folder]
        for sid, pred_path in sorted(doc.get("samples", {}).items()):
            try:
                sample = ds.by_id(sid)
            except KeyError:
                notes.append(f"fold {fold}: sample {sid!r} is not in dataset {folder}; skipped")
                continue
            if sample.label is None:
                notes.append(f"sample {sid!r} has no reference label (HQ) in {folder}; skipped")
                continue
            v = values.get(sid)
            if v is None:
                with open_volume(sample.label) as vol:
                    hq = measure(vol, sample)
                wf = None
                if sample.wf_label is not None:
                    with open_volume(sample.wf_label) as vol:
                        wf = measure(vol, sample)
                v = values[sid] = {"HQ": hq, "WF": wf, "ML": [], "folds": [], "days": sample.implantation_days,
                                   "methods": set()}
            with h5py.File(_path(pred_path), "r") as f:
                ml = measure(f["labels"], sample)
                v["ML"].append(ml)
                if "disagreement" in f and "plane_classes" in f:  # written by fusing with uncertainty maps
                    v.setdefault("ML_interval", []).append(interval(f, sample, ml))
                else:
                    notes.append(f"fold {fold}, sample {sid!r}: {pred_path} has no uncertainty maps; no ML interval")
            v["folds"].append(fold)
            v["methods"].add(doc.get("method", ""))
    for sid, v in values.items():
        if v["WF"] is None:
            notes.append(f"sample {sid!r} has no wf_label in its dataset: WF row left empty")
    return values, notes


def table3(values: tp.Mapping[str, dict], *, expected_folds: tp.Sequence[int] = EXPECTED_FOLDS) -> pd.DataFrame:
    """Long table: one row per (sample, segmentation) with each measure, its relative difference to HQ in %,
    and for ML the standard error over folds and the folds used."""
    rows = []
    for sid in sorted(values):
        v = values[sid]
        hq = v["HQ"]
        for seg in SEGMENTATIONS:
            row: dict[str, tp.Any] = {"sample": sid, "segmentation": seg, "days": v.get("days"),
                                      "n_folds": len(v["folds"]) if seg == "ML" else None,
                                      "folds": ",".join(map(str, sorted(v["folds"]))) if seg == "ML" else "",
                                      "complete": (set(expected_folds) <= set(v["folds"])) if seg == "ML" else True}
            for key, _h, _f in MEASURES:
                if seg == "ML":
                    x, se = se100([m.get(key, math.nan) for m in v["ML"]])
                else:
                    src = v[seg]
                    x, se = (math.nan if src is None else float(src.get(key, math.nan))), math.nan
                ref = float(hq.get(key, math.nan))
                rel = math.nan if seg == "HQ" or math.isnan(x) or math.isnan(ref) or ref == 0 else (x - ref) / ref * 100
                row[key], row[f"{key}_rel_percent"], row[f"{key}_se"] = x, rel, se
                ends = [i[key] for i in v.get("ML_interval", []) if key in i] if seg == "ML" else []
                # mean over folds of each end (folds without maps give none)
                row[f"{key}_lo"] = float(np.mean([e[0] for e in ends])) if ends else math.nan
                row[f"{key}_hi"] = float(np.mean([e[1] for e in ends])) if ends else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def _t3_cell(x: float, rel: float, fmt: str, lo: float = math.nan, hi: float = math.nan) -> str:
    if math.isnan(x):
        return "–"
    cell = f"{x:{fmt}}" if math.isnan(rel) else f"{x:{fmt}} ({rel:+.1f}%)"
    return cell if math.isnan(lo) or math.isnan(hi) else f"{cell} [{lo:{fmt}}, {hi:{fmt}}]"


def _t3_cells(r, fmt_of=lambda c: c) -> list[str]:
    return [fmt_of(_t3_cell(getattr(r, k), getattr(r, f"{k}_rel_percent"), f, getattr(r, f"{k}_lo", math.nan),
                            getattr(r, f"{k}_hi", math.nan))) for k, _h, f in MEASURES]


def _t3_notes(df: pd.DataFrame, roi_um: float, method: str, config: str, n_expected: int) -> list[str]:
    ml = df[df.segmentation == "ML"]
    n = sorted(set(int(x) for x in ml.n_folds.dropna()))
    notes = [f"Relative difference to HQ, (x − HQ)/HQ, in brackets. ML: mean of the measures over the predictions "
             f"of the {'/'.join(map(str, n)) or 0} fold models (fusing method {method}{', ' + config if config else ''}). "
             f"BV/TV in a region of interest of {roi_um:g} µm around the implant."]
    if any(not math.isnan(x) for k, _h, _f in MEASURES for x in ml.get(f"{k}_lo", [])):
        notes[0] += (" ML [lo, hi]: the plane-disagreement interval (README, 'Uncertainty'): the measure with the "
                     "uncertain voxels of its class (RM for DR, bone for BIC and BV/TV) removed where any plane "
                     "disagrees, and added where any plane assigns the class; mean over folds.")
    for r in ml.itertuples():
        if not r.complete:
            notes.append(f"{r.sample}: ML mean over {int(r.n_folds)} of {n_expected} folds only (folds {r.folds}).")
    return notes


def table3_markdown(df: pd.DataFrame, *, roi_um: float = 100.0, method: str = DEFAULT_PREDICTION_METHOD,
                    config: str = "", title: str = "", n_expected: int = len(EXPECTED_FOLDS)) -> str:
    lines = [title, ""] if title else []
    lines.append("| Sample | Segmentation | " + " | ".join(h for _k, h, _f in MEASURES) + " |")
    lines.append("|---|---|" + "---:|" * len(MEASURES))
    for r in df.itertuples():
        seg = r.segmentation + ("*" if not r.complete else "")
        cells = _t3_cells(r)
        lines.append(f"| {r.sample} | {seg} | " + " | ".join(cells) + " |")
    lines.append("")
    notes = _t3_notes(df, roi_um, method, config, n_expected)
    lines.append(notes[0])
    lines += [f"\\* {n}" for n in notes[1:]]
    return "\n".join(lines) + "\n"


def table3_latex(df: pd.DataFrame, *, roi_um: float = 100.0, method: str = DEFAULT_PREDICTION_METHOD,
                 config: str = "", caption: str = "", n_expected: int = len(EXPECTED_FOLDS)) -> str:
    heads = {"dr_mm_per_year": r"DR [mm/year]", "bic_percent": r"BIC [\%]", "bv_tv_percent": r"BV/TV [\%]"}
    out = [r"\begin{table}[ht]", r"\centering"]
    if caption:
        out.append(r"\caption{" + _tex_escape(caption) + "}")
    out += [r"\begin{tabular}{ll" + "r" * len(MEASURES) + "}", r"\toprule",
            "Sample & Segmentation & " + " & ".join(heads[k] for k, _h, _f in MEASURES) + r" \\", r"\midrule"]
    last = None
    for r in df.itertuples():
        if last is not None and r.sample != last:
            out.append(r"\midrule")
        seg = r.segmentation + ("$^{*}$" if not r.complete else "")
        cells = _t3_cells(r, lambda c: _tex_unicode(c.replace("%", r"\%")))
        out.append(f"{_tex_escape(r.sample) if r.sample != last else ''} & {seg} & " + " & ".join(cells) + r" \\")
        last = r.sample
    out += [r"\bottomrule", r"\end{tabular}"]
    notes = [_tex_escape(n) for n in _t3_notes(df, roi_um, method, config, n_expected)]
    notes = notes[:1] + ["$^{*}$ " + n for n in notes[1:]]
    out += [r"\par\smallskip{\footnotesize " + r" \\ ".join(notes) + "}", r"\end{table}"]
    return "\n".join(out) + "\n"


def write_table3(df: pd.DataFrame, out_dir: tp.Union[str, Path], *, roi_um: float = 100.0,
                 method: str = DEFAULT_PREDICTION_METHOD, config: str = "", title: str = "") -> list[Path]:
    out_dir = Path(out_dir)
    kw = dict(roi_um=roi_um, method=method, config=config)
    return [atomic_write_csv(df, out_dir / "table3.csv"),
            atomic_write_text(out_dir / "table3.md", table3_markdown(df, title=title, **kw)),
            atomic_write_text(out_dir / "table3.tex", table3_latex(df, caption=title, **kw))]
