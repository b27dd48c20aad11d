"""Paper Table 3 (DR, BIC, BV/TV of WF, HQ and ML segmentations of the test samples) from the fusing runs'
predictions, as CSV, Markdown, LaTeX.

A fusing run may carry the artifact ``predictions.json`` = {"dataset": folder, "method": m, "samples": {id: HDF5
file with ``labels``}}, which Table 3 reads. The ML row comes from the config's fold-ensemble run (tag
``ensemble_of_folds``; its predictions.json also has ``"ensemble_of_folds": [0, 1, 2, 3]``) when there is one:
one prediction per sample, no standard error; else (older stores, or ``ml_from="folds"``) it is the mean of the
measures over the per-fold runs' predictions, as in the paper.
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

from analysis.formatting import tex_escape, tex_unicode, write_table_files
from analysis.results import EXPECTED_FOLDS, latest_finished, se100
from analysis.store import RunRecord
from analysis.table2 import METHODS, TAG_ENSEMBLE, ensemble_folds, ensemble_runs, fusing_key

PREDICTIONS_ARTIFACT = "predictions.json"
DEFAULT_PREDICTION_METHOD = "avr_9"  # paper, Fig. 5 caption: the ML segmentation is "Avr., 9-planes"


MEASURES = (("dr_mm_per_year", "DR [mm/year]", ".3f"), ("bic_percent", "BIC [%]", ".1f"),
            ("bv_tv_percent", "BV/TV [%]", ".1f"))
SEGMENTATIONS = ("WF", "HQ", "ML")
ENSEMBLE = "ensemble"  # the key of the fold ensemble's document in a predictions mapping (else: fold numbers)
ML_FROM = ("auto", "ensemble", "folds")


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
                doc = _read_predictions(client, r, tmp)
                if doc is not None:
                    found[fold] = doc
                    break
    return found


def _read_predictions(client, r: RunRecord, tmp: str) -> tp.Optional[dict]:
    """The run's parsed ``predictions.json`` plus ``run_id`` and ``method``; None if it has none."""
    if PREDICTIONS_ARTIFACT not in {a.path for a in client.list_artifacts(r.run_id)}:
        return None
    local = client.download_artifacts(r.run_id, PREDICTIONS_ARTIFACT, str(Path(tmp) / r.run_id))
    doc = json.loads(Path(local).read_text(encoding="utf-8"))
    doc["run_id"] = r.run_id
    doc.setdefault("method", r.tags["fusing_method"])
    return doc


def find_ensemble_predictions(client, fusing: tp.Iterable[RunRecord], config_key: str, *,
                              prefer: str = DEFAULT_PREDICTION_METHOD) -> tp.Optional[dict]:
    """Table 3's ML row from the fold ensemble: the parsed ``predictions.json`` of the config's fold-ensemble run
    (method ``prefer`` first, then Table 2 order), with ``ensemble_of_folds``; None if no ensemble run has one."""
    runs = ensemble_runs(fusing, config_key)
    order = [prefer] + [m for m in METHODS if m != prefer]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in the report output
    with tempfile.TemporaryDirectory(prefix="scaling-unet-analysis-") as tmp:
        for m in (m for m in order if m in runs):
            doc = _read_predictions(client, runs[m], tmp)
            if doc is not None:
                doc.setdefault("ensemble_of_folds", ensemble_folds(runs[m]))
                doc["ensemble_tag"] = runs[m].tags[TAG_ENSEMBLE]
                return doc
    return None


def ml_predictions(client, fusing: tp.Sequence[RunRecord], config_key: str, *, ml_from: str = "auto",
                   prefer: str = DEFAULT_PREDICTION_METHOD) -> dict[tp.Union[int, str], dict]:
    """Where Table 3's ML row comes from: ``{"ensemble": doc}`` of the fold ensemble (``auto``: when it exists),
    else fold → doc of the per-fold runs (:func:`find_predictions`). ValueError names ``ml_from`` if unknown."""
    if ml_from not in ML_FROM:
        raise ValueError(f"ml_from: must be one of {ML_FROM}, got {ml_from!r}")
    if ml_from != "folds":
        doc = find_ensemble_predictions(client, fusing, config_key, prefer=prefer)
        if doc is not None or ml_from == "ensemble":
            return {ENSEMBLE: doc} if doc is not None else {}
    return dict(find_predictions(client, fusing, config_key, prefer=prefer))


def _path(text: str) -> Path:
    return Path(str(text)).expanduser().resolve()


def default_measures():
    from analysis.measures import implant_measures  # written separately; imported only when Table 3 is built

    return implant_measures


def table3_values(predictions: tp.Mapping[tp.Union[int, str], dict], *, roi_um: float = 100.0,
                  measures_fn: tp.Optional[tp.Callable[..., dict]] = None, slab: int = 64
                  ) -> tuple[dict[str, dict[str, tp.Any]], list[str]]:
    """Measures per test sample: {"WF": dict|None, "HQ": dict, "ML": [dict per fold], "folds": [...], "days": t}.

    HQ = the sample's ``label`` in the dataset, WF = its ``wf_label``; ML = each fold's prediction file, or with
    ``predictions = {"ensemble": doc}`` the fold ensemble's one file (``"ensemble": folds`` in the values).
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

    for fold, doc in sorted(predictions.items(), key=lambda kv: (isinstance(kv[0], str), kv[0])):
        source = "the ensemble" if fold == ENSEMBLE else f"fold {fold}"
        folder = _path(doc["dataset"])
        if folder not in datasets:
            datasets[folder] = load_dataset(folder)
        ds = datasets[folder]
        for sid, pred_path in sorted(doc.get("samples", {}).items()):
            try:
                sample = ds.by_id(sid)
            except KeyError:
                notes.append(f"{source}: sample {sid!r} is not in dataset {folder}; skipped")
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
                    notes.append(f"{source}, sample {sid!r}: {pred_path} has no uncertainty maps; no ML interval")
            if fold == ENSEMBLE:  # one prediction of all its folds' models
                v["ensemble"] = [int(f) for f in doc.get("ensemble_of_folds", [])]
                v["folds"].extend(v["ensemble"])
            else:
                v["folds"].append(fold)
            v["methods"].add(doc.get("method", ""))
    for sid, v in values.items():
        if v["WF"] is None:
            notes.append(f"sample {sid!r} has no wf_label in its dataset: WF row left empty")
    return values, notes


def table3(values: tp.Mapping[str, dict], *, expected_folds: tp.Sequence[int] = EXPECTED_FOLDS,
           calibration: tp.Any = None) -> pd.DataFrame:
    """Long table: one row per (sample, segmentation) with each measure, its relative difference to HQ in %,
    and for ML the standard error over folds and the folds used; ``ml_source`` says whether ML is the fold
    ensemble's prediction (``ensemble``, no SE) or the mean over the fold models' predictions (``folds``).
    ``calibration`` (analysis.calibration.Calibration): ML rows also get the conformal interval
    (``*_conf_lo``, ``*_conf_hi``); the table's ``attrs["calibration"]`` describes it."""
    rows = []
    for sid in sorted(values):
        v = values[sid]
        hq = v["HQ"]
        for seg in SEGMENTATIONS:
            row: dict[str, tp.Any] = {"sample": sid, "segmentation": seg, "days": v.get("days"),
                                      "n_folds": len(v["folds"]) if seg == "ML" else None,
                                      "folds": ",".join(map(str, sorted(v["folds"]))) if seg == "ML" else "",
                                      "complete": (set(expected_folds) <= set(v["folds"])) if seg == "ML" else True,
                                      "ml_source": ml_source(v) if seg == "ML" else ""}
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
                if calibration is not None:
                    lo, hi = calibration.interval(key, x) if seg == "ML" else (math.nan, math.nan)
                    row[f"{key}_conf_lo"], row[f"{key}_conf_hi"] = lo, hi
            rows.append(row)
    df = pd.DataFrame(rows)
    if calibration is not None:
        df.attrs["calibration"] = calibration.describe()
    return df


MEASURES_ARTIFACT = "table3/measures.json"


def run_measures(df: pd.DataFrame, samples: tp.Iterable[str]) -> dict[str, tp.Any]:
    """Table 3's rows of ``samples`` as a JSON document: per sample and segmentation each measure with its
    plane-disagreement interval (``plane``) and, with a calibration, its conformal interval (``conformal``)."""
    keep = set(samples)
    out: dict[str, tp.Any] = {"calibration": df.attrs.get("calibration"), "samples": {}}
    for r in df[df["sample"].isin(keep)].to_dict("records"):
        seg: dict[str, tp.Any] = {"ml_source": r["ml_source"] or None}
        for key, _h, _f in MEASURES:
            m = {"value": _finite(r[key]), "relative_to_hq_percent": _finite(r[f"{key}_rel_percent"])}
            if r["segmentation"] == "ML":
                m["plane"] = [_finite(r[f"{key}_lo"]), _finite(r[f"{key}_hi"])]
                if f"{key}_conf_lo" in r:
                    m["conformal"] = [_finite(r[f"{key}_conf_lo"]), _finite(r[f"{key}_conf_hi"])]
            seg[key] = m
        out["samples"].setdefault(r["sample"], {})[r["segmentation"]] = seg
    return out


def _finite(x: tp.Any) -> tp.Optional[float]:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def log_measures_to_runs(client, predictions: tp.Mapping[tp.Union[int, str], dict], df: pd.DataFrame) -> list[str]:
    """Item 4 of the measures' intervals: each fusing run whose prediction Table 3 measured gets its rows
    (values, plane and conformal intervals, the calibration) as the artifact ``table3/measures.json``,
    so the numbers and their intervals travel with the run. Returns the run ids written."""
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for doc in predictions.values():
            run_id = doc.get("run_id")
            if not run_id:
                continue
            path = Path(tmp) / run_id / "measures.json"
            path.parent.mkdir()
            path.write_text(json.dumps(run_measures(df, doc.get("samples", {})), indent=1) + "\n")
            client.log_artifact(run_id, str(path), artifact_path=str(Path(MEASURES_ARTIFACT).parent))
            written.append(run_id)
    return written


def ml_source(v: tp.Mapping[str, tp.Any]) -> str:
    """``ensemble`` if a sample's ML values are the fold ensemble's prediction, else ``folds``."""
    return ENSEMBLE if v.get("ensemble") else "folds"


def _t3_cell(x: float, rel: float, fmt: str, lo: float = math.nan, hi: float = math.nan,
             conf_lo: float = math.nan, conf_hi: float = math.nan) -> str:
    if math.isnan(x):
        return "–"
    cell = f"{x:{fmt}}" if math.isnan(rel) else f"{x:{fmt}} ({rel:+.1f}%)"
    cell = cell if math.isnan(lo) or math.isnan(hi) else f"{cell} [{lo:{fmt}}, {hi:{fmt}}]"
    if math.isnan(conf_lo) or math.isnan(conf_hi):
        return cell
    conf = "unbounded" if math.isinf(conf_hi - conf_lo) else f"{conf_lo:{fmt}}–{conf_hi:{fmt}}"
    return f"{cell} ⟨{conf}⟩"


def _t3_cells(r, fmt_of=lambda c: c) -> list[str]:
    return [fmt_of(_t3_cell(getattr(r, k), getattr(r, f"{k}_rel_percent"), f, getattr(r, f"{k}_lo", math.nan),
                            getattr(r, f"{k}_hi", math.nan), getattr(r, f"{k}_conf_lo", math.nan),
                            getattr(r, f"{k}_conf_hi", math.nan))) for k, _h, f in MEASURES]


def _t3_notes(df: pd.DataFrame, roi_um: float, method: str, config: str, n_expected: int) -> list[str]:
    ml = df[df.segmentation == "ML"]
    n = sorted(set(int(x) for x in ml.n_folds.dropna()))
    ensemble = "ml_source" in ml and (ml.ml_source == ENSEMBLE).any()
    folds = '/'.join(map(str, n)) or "0"
    where = f"fusing method {method}{', ' + config if config else ''}"
    how = (f"the measures of the prediction of the {folds}-fold ensemble ({where}; the fold models' softmax "
           f"probabilities averaged: one prediction, no standard error)" if ensemble else
           f"mean of the measures over the predictions of the {folds} fold models ({where})")
    notes = [f"Relative difference to HQ, (x − HQ)/HQ, in brackets. ML: {how}. "
             f"BV/TV in a region of interest of {roi_um:g} µm around the implant."]
    if any(not math.isnan(x) for k, _h, _f in MEASURES for x in ml.get(f"{k}_lo", [])):
        notes[0] += (" ML [lo, hi]: the plane-disagreement interval (README, 'Uncertainty'): the measure with the "
                     "uncertain voxels of its class (RM for DR, bone for BIC and BV/TV) removed where any plane "
                     "disagrees, and added where any plane assigns the class"
                     + ("." if ensemble else "; mean over folds."))
    if df.attrs.get("calibration"):
        notes[0] += (f" ML ⟨lo–hi⟩: the conformal interval ({df.attrs['calibration']}): the ML value corrected by the "
                     "calibration's median error, ± the error that bounds the HQ value in that share of new scans "
                     "(docs/measures.md, measured coverage).")
    for r in ml.itertuples():
        if not r.complete:
            what = "the ensemble of" if getattr(r, "ml_source", "") == ENSEMBLE else "mean over"
            notes.append(f"{r.sample}: ML {what} {int(r.n_folds)} of {n_expected} folds only (folds {r.folds}).")
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
        out.append(r"\caption{" + tex_escape(caption) + "}")
    out += [r"\begin{tabular}{ll" + "r" * len(MEASURES) + "}", r"\toprule",
            "Sample & Segmentation & " + " & ".join(heads[k] for k, _h, _f in MEASURES) + r" \\", r"\midrule"]
    last = None
    for r in df.itertuples():
        if last is not None and r.sample != last:
            out.append(r"\midrule")
        seg = r.segmentation + ("$^{*}$" if not r.complete else "")
        cells = _t3_cells(r, lambda c: tex_unicode(c.replace("%", r"\%")))
        out.append(f"{tex_escape(r.sample) if r.sample != last else ''} & {seg} & " + " & ".join(cells) + r" \\")
        last = r.sample
    out += [r"\bottomrule", r"\end{tabular}"]
    notes = [tex_escape(n) for n in _t3_notes(df, roi_um, method, config, n_expected)]
    notes = notes[:1] + ["$^{*}$ " + n for n in notes[1:]]
    out += [r"\par\smallskip{\footnotesize " + r" \\ ".join(notes) + "}", r"\end{table}"]
    return "\n".join(out) + "\n"


def write_table3(df: pd.DataFrame, out_dir: tp.Union[str, Path], *, roi_um: float = 100.0,
                 method: str = DEFAULT_PREDICTION_METHOD, config: str = "", title: str = "") -> list[Path]:
    kw = dict(roi_um=roi_um, method=method, config=config)
    return write_table_files(out_dir, "table3", df, table3_markdown(df, title=title, **kw),
                             table3_latex(df, caption=title, **kw))
