"""Sweep results per config from the runs read once (analysis.store): one row per config, folds counted (never
guessed), gaps reported.

Everything (Fig. 3 table, Table 2, Pareto front, missing-run report) is computed in memory from the
:class:`analysis.store.RunRecord` objects that :func:`analysis.store.read_runs` returns.
"""

from __future__ import annotations

import math
import typing as tp

import pandas as pd

from analysis.store import RunRecord, read_runs

EXPECTED_FOLDS = (0, 1, 2, 3)
GRID = {"width": (32, 64, 96, 112), "depth": (3, 4, 5, 6), "input_size": (384, 512, 640)}
CLASS_METRICS = ("iou_bone", "iou_degradation_layer", "iou_residual_material")
IOU_METRICS = CLASS_METRICS + ("mean_iou",)
OPTUNA = "optuna"
TAG_IS_PARENT = "is_parent"  # sweep.tracking.client.TAG_IS_PARENT (analysis never imports sweep/)
TAG_SKIPPED = "skipped_reason"  # sweep.resources.memory: a run the sweep did not queue (estimated GPU memory)
# What a config's FINISHED fold runs used, summed (sweep.tracking.cost logs them per run, every attempt).
COST_METRICS = {"cpu_core_hours": "cpu_core_hours_used", "used_gpu_hours": "used_gpu_hours",
                "gpu_energy_kwh": "gpu_energy_kwh"}
TAG_FOLD_PRUNED = "fold_pruned"  # sweep.core.fold_pruning: a fold not trained, its config significantly worse
TAG_HALVED = "batch_halved"  # sweep.resources.memory: a run trained at a smaller global batch than configured (GPU memory)


# ----------------------------------------------------------------------------------------------- folds


def latest_finished(records: tp.Iterable[RunRecord], key: tp.Callable[[RunRecord], tp.Optional[tuple]]
                    ) -> tuple[dict[tuple, RunRecord], dict[tuple, list[RunRecord]], dict[tuple, list[RunRecord]]]:
    """Group runs by ``key`` (None = skip): the latest FINISHED run per key, the FINISHED duplicates it
    replaced, and the runs that did not finish (FAILED, KILLED, RUNNING) per key."""
    done: dict[tuple, RunRecord] = {}
    dupes: dict[tuple, list[RunRecord]] = {}
    other: dict[tuple, list[RunRecord]] = {}
    for r in records:
        k = key(r)
        if k is None:
            continue
        if not r.finished:
            other.setdefault(k, []).append(r)
            continue
        old = done.get(k)
        if old is None:
            done[k] = r
        else:
            keep, drop = (r, old) if r.end_time >= old.end_time else (old, r)
            done[k] = keep
            dupes.setdefault(k, []).append(drop)
    return done, dupes, other


def training_fold_key(r: RunRecord) -> tp.Optional[tuple]:
    """(config_key, fold) of a training fold run; None for parent runs and runs without those tags."""
    if r.tags.get(TAG_IS_PARENT) == "true" or "config_key" not in r.tags:
        return None
    fold = r.fold() if "fold" in r.tags else None
    if fold is None:
        return None
    return (r.tags["config_key"], fold)


def se100(values: tp.Sequence[float]) -> tuple[float, float]:
    """mean ± standard error over folds (paper: SE = std(ddof=1)/sqrt(n); NaN for one value)."""
    from model.evaluation import mean_and_standard_error

    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return mean_and_standard_error(vals)


def config_rows(done: tp.Mapping[tuple, RunRecord], *, expected_folds: tp.Sequence[int] = EXPECTED_FOLDS) -> pd.DataFrame:
    """One row per config_key from its (deduplicated) FINISHED fold runs."""
    groups: dict[str, list[RunRecord]] = {}
    for (key, _fold), r in done.items():
        groups.setdefault(key, []).append(r)
    rows = []
    for key, kids in groups.items():
        kids.sort(key=lambda r: r.fold())
        first = kids[0]
        folds = [r.fold() for r in kids]
        row: dict[str, tp.Any] = {
            "config_key": key, "width": first.int_param("model.width"), "depth": first.int_param("model.depth"),
            "input_size": first.int_param("model.input_size"), "flops": first.metrics.get("flops"),
            "params": first.metrics.get("params"), "paper_flops": first.metrics.get("paper_flops"),
            "n_folds": len(kids), "folds": ",".join(map(str, folds)),
            "complete": set(expected_folds) <= set(folds),
            "experiment": ",".join(sorted({r.tags.get("experiment", "") for r in kids} - {""})),
            "batch_halved": next((r.tags[TAG_HALVED] for r in kids if r.tags.get(TAG_HALVED)), ""),
        }
        for col, metric in COST_METRICS.items():  # what the folds used (sweep.tracking.cost); NaN where not reported
            vals = [r.metrics[metric] for r in kids if metric in r.metrics]
            row[col] = float(sum(vals)) if vals else math.nan
        for name in IOU_METRICS:
            vals = [r.metric(name) for r in kids]
            if name == "mean_iou":  # a run without mean_iou but with the three classes still counts
                vals = [v if not math.isnan(v) else mean_of_classes(r) for v, r in zip(vals, kids)]
            row[name], row[f"{name}_se"] = se100(vals)
            row[f"{name}_n"] = sum(not math.isnan(v) for v in vals)
        rows.append(row)
    cols = ["config_key", "width", "depth", "input_size", "flops", "params", "paper_flops", "n_folds", "folds",
            "complete", "experiment"] + [f"{m}{s}" for m in IOU_METRICS for s in ("", "_se", "_n")] + ["batch_halved",
                                                                                             *COST_METRICS]
    if not rows:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame(rows)[cols].sort_values(["input_size", "depth", "width", "config_key"]).reset_index(drop=True)


def mean_of_classes(r: RunRecord) -> float:
    """The mean IoU of a run from its three class IoUs (when ``mean_iou`` itself is missing)."""
    vals = [r.metric(m) for m in CLASS_METRICS]
    return math.nan if any(math.isnan(v) for v in vals) else sum(vals) / 3


def is_optuna(r: RunRecord) -> bool:
    return r.tags.get("experiment") == OPTUNA


def grid_runs(training: tp.Iterable[RunRecord]) -> list[RunRecord]:
    """Training runs for Fig. 3: everything except the Optuna search (its trials are fold 0 of other configs)."""
    return [r for r in training if not is_optuna(r)]


def config_table_from_runs(training: tp.Iterable[RunRecord], *,
                           expected_folds: tp.Sequence[int] = EXPECTED_FOLDS) -> pd.DataFrame:
    done, _, _ = latest_finished(grid_runs(training), training_fold_key)
    return config_rows(done, expected_folds=expected_folds)


def config_table(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """One row per config (Optuna trials left out): width, depth, input_size (paper grid values), FLOPs,
    params, mean ± SE of the IoUs over its FINISHED folds, ``n_folds``, ``folds``, ``complete``.

    Built from the FINISHED fold runs (not the parent runs), so it is right even before parents exist;
    a (config, fold) with several FINISHED runs counts once (the latest)."""
    runs = read_runs(tracking_uri, experiment)
    return config_table_from_runs(runs.training)


def fig3_configs(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One config per (width, depth, input size) for Fig. 3: the one with most folds (then latest key order).

    Returns (chosen, left out); several config keys for one grid point happen when a config value other
    than the grid's (learning rate, profile, ...) changed between sweeps."""
    if table.empty:
        return table, table
    usable = table.dropna(subset=["width", "depth", "input_size", "flops", "mean_iou"])
    ranked = usable.sort_values(["n_folds"], ascending=False, kind="stable")
    chosen = ranked.drop_duplicates(["width", "depth", "input_size"], keep="first")
    left = table[~table.config_key.isin(chosen.config_key)]
    return chosen.sort_values(["input_size", "depth", "width"]).reset_index(drop=True), left.reset_index(drop=True)


def skipped_configs(training: tp.Iterable[RunRecord]) -> dict[tuple[int, int, int], str]:
    """(width, depth, input size) → why, for configs the sweep skipped and that have no FINISHED fold run."""
    finished = {(r.int_param("model.width"), r.int_param("model.depth"), r.int_param("model.input_size"))
                for r in training if r.finished and r.fold() is not None}
    out: dict[tuple[int, int, int], str] = {}
    for r in training:
        why = r.tags.get(TAG_SKIPPED)
        point = (r.int_param("model.width"), r.int_param("model.depth"), r.int_param("model.input_size"))
        if why and None not in point and point not in finished:
            out.setdefault(point, why)  # type: ignore[arg-type]
    return out


def fold_pruned_configs(training: tp.Iterable[RunRecord]) -> dict[tuple[int, int, int], str]:
    """(width, depth, input size) → "folds 2,3: <why>", for configs whose later folds fold pruning skipped
    (sweep.core.fold_pruning: KILLED runs tagged fold_pruned and skipped_reason)."""
    finished = {(r.tags.get("config_key"), r.fold()) for r in training if r.finished}
    by_point: dict[tuple[int, int, int], dict[str, list[int]]] = {}
    for r in training:
        if r.tags.get(TAG_FOLD_PRUNED) != "true" or (r.tags.get("config_key"), r.fold()) in finished:
            continue
        point = (r.int_param("model.width"), r.int_param("model.depth"), r.int_param("model.input_size"))
        if None in point or r.fold() is None:
            continue
        folds = by_point.setdefault(point, {}).setdefault(r.tags.get(TAG_SKIPPED, ""), [])  # type: ignore[arg-type]
        if r.fold() not in folds:
            folds.append(int(r.fold()))  # type: ignore[arg-type]
    return {pt: "; ".join(f"{'folds' if len(f) > 1 else 'fold'} {','.join(map(str, sorted(f)))}: {why}"
                          for why, f in reasons.items()) for pt, reasons in by_point.items()}


def halved_configs(chosen: pd.DataFrame) -> dict[tuple[int, int, int], str]:
    """(width, depth, input size) → why, for the configs of ``chosen`` (Fig. 3's) trained at a halved batch."""
    if chosen.empty or "batch_halved" not in chosen:
        return {}
    return {(int(r.width), int(r.depth), int(r.input_size)): str(r.batch_halved)
            for r in chosen.itertuples() if isinstance(r.batch_halved, str) and r.batch_halved}


def expected_grid() -> list[tuple[int, int, int]]:
    return [(w, d, s) for s in GRID["input_size"] for d in GRID["depth"] for w in GRID["width"]]


def missing_training(training: tp.Iterable[RunRecord], *, expected_folds: tp.Sequence[int] = EXPECTED_FOLDS
                     ) -> list[dict]:
    """Rows for the missing-run report: grid configs without all folds FINISHED (and why, when a run
    FAILED or is still RUNNING), configs outside the grid that are incomplete, and duplicate runs."""
    runs = grid_runs(training)
    done, dupes, other = latest_finished(runs, training_fold_key)
    table = config_rows(done, expected_folds=expected_folds)
    chosen, left = fig3_configs(table)
    rows: list[dict] = []
    unfinished_by_key: dict[str, list[RunRecord]] = {}
    for (key, _f), rs in other.items():
        unfinished_by_key.setdefault(key, []).extend(rs)
    params_by_key = {r.tags.get("config_key"): r for r in runs if "config_key" in r.tags}

    def why(key: str, missing: list[int]) -> str:
        notes = []
        skips: dict[str, list[int]] = {}  # one note for the folds skipped for the same reason (its estimate)
        for r in sorted(unfinished_by_key.get(key, []), key=lambda r: (r.fold() or 0, r.start_time)):
            if r.fold() in missing and not ((key, r.fold()) in done):
                skipped = r.tags.get(TAG_SKIPPED)
                if skipped:
                    if skipped not in skips:
                        notes.append(skipped)
                    folds = skips.setdefault(skipped, [])
                    if r.fold() not in folds:
                        folds.append(r.fold())
                else:
                    notes.append(f"fold {r.fold()}: {r.status} run {r.run_id[:8]}")
        return "; ".join(f"{'folds' if len(skips[n]) > 1 else 'fold'} {','.join(map(str, skips[n]))}: skipped, {n}"
                         if n in skips else n for n in notes)

    present = {(int(r.width), int(r.depth), int(r.input_size)): r for r in chosen.itertuples()}
    for w, d, s in expected_grid():
        r = present.get((w, d, s))
        if r is None:
            keys = [k for k, rec in params_by_key.items()
                    if (rec.int_param("model.width"), rec.int_param("model.depth"), rec.int_param("model.input_size")) == (w, d, s)]
            note = "; ".join(why(k, list(expected_folds)) for k in keys if why(k, list(expected_folds)))
            rows.append(dict(kind="training", config_key=",".join(keys), width=w, depth=d, input_size=s, method="",
                             present_folds="", missing_folds=",".join(map(str, expected_folds)),
                             note=note or "no FINISHED run"))
            continue
        folds = [int(f) for f in str(r.folds).split(",") if f != ""]
        miss = [f for f in expected_folds if f not in folds]
        if miss:
            rows.append(dict(kind="training", config_key=r.config_key, width=w, depth=d, input_size=s, method="",
                             present_folds=r.folds, missing_folds=",".join(map(str, miss)),
                             note=why(r.config_key, miss) or f"{len(folds)} of {len(expected_folds)} folds FINISHED"))
    grid = set(expected_grid())
    for r in chosen.itertuples():
        if (int(r.width), int(r.depth), int(r.input_size)) in grid or r.complete:
            continue
        folds = [int(f) for f in str(r.folds).split(",") if f != ""]
        miss = [f for f in expected_folds if f not in folds]
        rows.append(dict(kind="training (outside grid)", config_key=r.config_key, width=int(r.width), depth=int(r.depth),
                         input_size=int(r.input_size), method="", present_folds=r.folds,
                         missing_folds=",".join(map(str, miss)), note=why(r.config_key, miss)))
    plotted = {(int(r.width), int(r.depth), int(r.input_size)) for r in chosen.itertuples()}
    for (w, d, s), _why in sorted(skipped_configs(training).items()):
        if (w, d, s) in grid or (w, d, s) in plotted:
            continue  # grid points are reported above with the same reason
        keys = [k for k, rec in params_by_key.items()
                if (rec.int_param("model.width"), rec.int_param("model.depth"), rec.int_param("model.input_size")) == (w, d, s)]
        rows.append(dict(kind="training (outside grid)", config_key=",".join(keys), width=w, depth=d, input_size=s,
                         method="", present_folds="", missing_folds=",".join(map(str, expected_folds)),
                         note="; ".join(why(k, list(expected_folds)) for k in keys if why(k, list(expected_folds)))))
    for r in left.itertuples():
        unusable = any(_nan(v) for v in (r.width, r.depth, r.input_size, r.flops, r.mean_iou))
        rows.append(dict(kind="training (not plotted)", config_key=r.config_key, width=_int(r.width),
                         depth=_int(r.depth), input_size=_int(r.input_size), method="", present_folds=r.folds,
                         missing_folds="",
                         note="runs lack model.width/depth/input_size params or flops/mean_iou metrics" if unusable else
                         "another config key with the same width/depth/input size has more folds; "
                         "its config differs in some other value"))
    for (key, fold), rs in sorted(dupes.items()):
        rows.append(dict(kind="training (duplicate)", config_key=key, width=None, depth=None, input_size=None,
                         method="", present_folds=str(fold), missing_folds="",
                         note=f"{len(rs) + 1} FINISHED runs for fold {fold}; the latest is used"))
    return rows


def _nan(v) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def _int(v) -> tp.Optional[int]:
    return None if _nan(v) else int(v)


def fmt_int(v) -> str:
    try:
        return str(int(v))
    except (TypeError, ValueError):
        return ""
