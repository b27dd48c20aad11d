"""Read sweep results back from MLflow: one row per config, folds counted (never guessed), gaps reported.

All runs of the training experiment and of the fusing experiment are read with ONE paginated
``search_runs`` over both experiment ids (:func:`read_runs`), turned into plain :class:`RunRecord`
objects, and everything else (Fig. 3 table, Table 2, Pareto front, missing-run report) is computed
from those records in memory.

Training runs (experiment ``scaling-unet``): one run per (config, fold), tags ``config_key``, ``fold``,
``experiment`` (compound/depth/width/input_size/optuna/single); params ``model.width``, ``model.depth``,
``model.input_size``; metrics ``mean_iou``, ``iou_*``, ``flops``, ``params``, ``paper_flops``. Parent
runs (tag ``is_parent=true``, no ``fold``) are ignored.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing as tp
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd

from model.server_health import ServerUnreachable, check_server, redact_uri

EXPECTED_FOLDS = (0, 1, 2, 3)
GRID = {"width": (32, 64, 96, 112), "depth": (3, 4, 5, 6), "input_size": (384, 512, 640)}
CLASS_METRICS = ("iou_bone", "iou_degradation_layer", "iou_residual_material")
IOU_METRICS = CLASS_METRICS + ("mean_iou",)
OPTUNA = "optuna"
TAG_IS_PARENT = "is_parent"  # sweep.dispatch.TAG_IS_PARENT (analysis never imports sweep/)
TAG_SKIPPED = "skipped_reason"  # sweep.resources: a run the sweep did not queue (estimated GPU memory)
TAG_HALVED = "batch_halved"  # sweep.resources: a run trained at a smaller global batch than configured (GPU memory)


class StoreError(ValueError):
    """The tracking store cannot be read (unreachable server, no sqlite file, no such experiment)."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What the analysis needs of one MLflow run (plain values; metrics are the latest values)."""

    run_id: str
    experiment_id: str
    status: str
    start_time: int
    end_time: int
    run_name: str
    tags: tp.Mapping[str, str]
    params: tp.Mapping[str, str]
    metrics: tp.Mapping[str, float]

    @classmethod
    def from_run(cls, run) -> "RunRecord":
        i = run.info
        return cls(run_id=i.run_id, experiment_id=str(i.experiment_id), status=str(i.status),
                   start_time=int(i.start_time or 0), end_time=int(i.end_time or i.start_time or 0),
                   run_name=i.run_name or "", tags=dict(run.data.tags), params=dict(run.data.params),
                   metrics=dict(run.data.metrics))

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    def fold(self) -> tp.Optional[int]:
        v = self.tags.get("fold", self.params.get("fold"))
        try:
            return None if v is None else int(v)
        except ValueError:
            return None

    def int_param(self, name: str) -> tp.Optional[int]:
        v = self.params.get(name)
        try:
            return None if v is None else int(float(v))
        except ValueError:
            return None

    def metric(self, name: str) -> float:
        v = self.metrics.get(name)
        return math.nan if v is None else float(v)


@dataclasses.dataclass
class Runs:
    """The runs of the training experiment and (if it exists) of the fusing experiment."""

    tracking_uri: str
    experiment: str
    fusing_experiment: str
    training: list[RunRecord]
    fusing: tp.Optional[list[RunRecord]]  # None: the fusing experiment does not exist
    read_s: float = 0.0
    search_calls: int = 0


# ----------------------------------------------------------------------------------------------- store


def check_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast instead of creating an empty sqlite file or waiting minutes on HTTP retries."""
    if not uri:
        raise StoreError("empty tracking URI")
    if uri.startswith("sqlite:"):
        path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        if path in ("", ":memory:"):
            raise StoreError(f"tracking URI {uri} names no sqlite file")
        db = Path(path).expanduser()
        if not db.is_file():
            raise StoreError(f"no MLflow store at {uri} (file {db} does not exist)")
        with open(db, "rb") as fh:
            head = fh.read(16)
        if not head:  # mlflow would create its tables in it: a write, from a read-only command
            raise StoreError(f"{db} is empty, not an MLflow store (tracking URI {uri})")
        if head != b"SQLite format 3\x00":
            raise StoreError(f"{db} is not an SQLite database (tracking URI {uri})")
        return
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme in ("http", "https"):
        try:
            check_server(uri, timeout_s)
        except ServerUnreachable as e:
            raise StoreError(str(e)) from None
        return
    if parsed.scheme in ("", "file"):
        folder = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme else uri).expanduser()
        if not folder.is_dir():
            raise StoreError(f"no MLflow file store at {uri}")
        return
    if parsed.scheme.split("+", 1)[0] not in ("postgresql", "mysql", "mssql", "databricks"):
        raise StoreError(f"tracking URI {redact_uri(uri)}: unknown scheme {parsed.scheme!r} "
                         "(use sqlite:///<file>, http(s)://<server> or a database URI)")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def search_all(client, experiment_ids: tp.Sequence[str], page_size: int = 50_000) -> tuple[list[RunRecord], int]:
    """Every active run of the experiments, all pages; returns (records, number of search_runs calls)."""
    out: list[RunRecord] = []
    token, calls = None, 0
    while True:
        page = client.search_runs(list(experiment_ids), max_results=page_size, page_token=token)
        calls += 1
        out.extend(RunRecord.from_run(r) for r in page)
        token = page.token
        if not token:
            return out, calls


def read_runs(tracking_uri: str, experiment: str, fusing_experiment: tp.Optional[str] = None, *,
              need_training: bool = True) -> Runs:
    """All runs of both experiments in one paginated search. StoreError if the store (or, with
    ``need_training``, the training experiment) is missing; an absent fusing experiment gives ``fusing=None``."""
    check_store(tracking_uri)
    fusing_experiment = fusing_experiment or f"{experiment}-fusing"
    t0 = time.perf_counter()
    try:
        client = _client(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        fexp = client.get_experiment_by_name(fusing_experiment)
    except Exception as e:  # noqa: BLE001 - any store failure is "cannot read", with the reason
        raise StoreError(f"cannot read MLflow store {redact_uri(tracking_uri)}: {redact_uri(str(e))}") from None
    if exp is None and need_training:
        raise StoreError(f"no experiment {experiment!r} at {redact_uri(tracking_uri)}")
    ids = [e.experiment_id for e in (exp, fexp) if e is not None]
    try:
        records, calls = search_all(client, ids) if ids else ([], 0)
    except Exception as e:  # noqa: BLE001 - as above
        raise StoreError(f"cannot read MLflow store {redact_uri(tracking_uri)}: {redact_uri(str(e))}") from None
    train_id = None if exp is None else exp.experiment_id
    fusing_id = None if fexp is None else fexp.experiment_id
    return Runs(tracking_uri=tracking_uri, experiment=experiment, fusing_experiment=fusing_experiment,
                training=[r for r in records if r.experiment_id == train_id],
                fusing=None if fexp is None else [r for r in records if r.experiment_id == fusing_id],
                read_s=time.perf_counter() - t0, search_calls=calls)


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
        for name in IOU_METRICS:
            vals = [r.metric(name) for r in kids]
            if name == "mean_iou":  # a run without mean_iou but with the three classes still counts
                vals = [v if not math.isnan(v) else mean_of_classes(r) for v, r in zip(vals, kids)]
            row[name], row[f"{name}_se"] = se100(vals)
            row[f"{name}_n"] = sum(not math.isnan(v) for v in vals)
        rows.append(row)
    cols = ["config_key", "width", "depth", "input_size", "flops", "params", "paper_flops", "n_folds", "folds",
            "complete", "experiment"] + [f"{m}{s}" for m in IOU_METRICS for s in ("", "_se", "_n")] + ["batch_halved"]
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
