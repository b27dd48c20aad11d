"""``python -m analysis.segment SCAN --model M [--model M ...] --out DIR``: a raw scan to labels, measures and a picture.

What a beamline user does with a new scan (paper: ~20 min per sample instead of days by hand), in one command:

1. prepare: the training preprocessing (data.prepare): resample to the model's voxel size, clip to the scan's
   0.5 / 99.9 % percentiles, scale to [0, 1];
2. predict: multi-axes prediction fusing (model.predict; 9 planes, soft vote by default) with the given model or
   the fold models as one ensemble, with the uncertainty maps;
3. measure: DR (Eq. 1), BIC (Eq. 2), BV/TV (Eq. 3) and their intervals from the plane disagreement
   (analysis.measures, analysis.intervals);
4. picture: the middle slice of each plane with labels and disagreement (``overview.png``);
5. report: ``report.json`` and ``report.md`` — measures, seconds per phase and per sample, the models (URIs and
   digests), the scan and its preprocessing.

SCAN is an HDF5 file (``--dataset``), a Zarr store or a folder of TIFF slices, of any voxel size: the size is read
from the scan's metadata (HDF5 attribute ``voxel_size_um`` / ``element_size_um``, OME-Zarr scale, TIFF resolution)
or given with ``--voxel-size``; a scan whose voxel size is unknown is refused. The model's voxel size is read from
its MLflow training run (``data.prepare.voxel_size_um``) or given with ``--model-voxel-size``. DIR is written
atomically (built beside it, renamed when complete); an existing DIR needs ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
import typing as tp
from pathlib import Path

from analysis.intervals import measure_intervals
from analysis.measures import implant_measures
from data.atomic import atomic_dir
from data.errors import DataError
from data.fingerprint import scan_digest
from data.manifest import Sample
from data.prepare import PAPER_CLIP_PERCENTILES, prepare_sample
from data.volume import VolumeRef, check_image, volume_ref
from data.voxel_size import scan_voxel_size_um
from model.figures import segmentation_overview
from model.fusion import VOTES
from model.planes import PLANE_SETS
from model.predict import FOLD_VOTES, PredictError, check_model_store, load_models, run_prediction
from model.streaming import PhaseTimes

log = logging.getLogger(__name__)

MODEL_VOXEL_PARAM = "data.prepare.voxel_size_um"  # the training run's param (conf/data/*.yaml)
PREPROCESSING_VOXEL_PARAM = "preprocessing.voxel_size_um"  # what data.prepare wrote in the training data
CLIP_PARAMS = ("preprocessing.clip_low_percentile", "preprocessing.clip_high_percentile")
PAPER_MINUTES_PER_SAMPLE = 20.0  # paper: a new scan segmented in ~20 min instead of days by hand
MEASURES = (("dr_mm_per_year", "DR (mm/year)"), ("bic_percent", "BIC (%)"), ("bv_tv_percent", "BV/TV (%)"))


class SegmentError(ValueError):
    """A bad argument or input; the message names the file or option."""


def scan_voxel_size(ref: VolumeRef, given: tp.Optional[float]) -> tuple[float, str]:
    """The scan's voxel edge in µm and where it came from; refused when neither given nor in the metadata."""
    if given is not None:
        if not (given > 0 and math.isfinite(given)):
            raise SegmentError(f"--voxel-size: must be a positive number of µm, got {given}")
        return float(given), "--voxel-size"
    found = scan_voxel_size_um(ref)
    if found is None:
        raise SegmentError(f"SCAN: {ref}: its voxel size is unknown (no voxel_size_um / element_size_um attribute, "
                           "OME-Zarr scale or TIFF resolution); give --voxel-size UM")
    return found, "scan metadata"


def model_voxel_size(specs: tp.Sequence[str], given: tp.Optional[float], tracking_uri: tp.Optional[str]
                     ) -> tuple[float, str]:
    """The voxel size the models were trained at: ``--model-voxel-size`` or their MLflow training runs' params (what
    data.prepare recorded in the training data, ``preprocessing.voxel_size_um``; older runs: the config's)."""
    if given is not None:
        if not (given > 0 and math.isfinite(given)):
            raise SegmentError(f"--model-voxel-size: must be a positive number of µm, got {given}")
        return float(given), "--model-voxel-size"
    found: set[float] = set()
    used = MODEL_VOXEL_PARAM
    for spec in specs:
        if not spec.startswith(("runs:/", "models:/")):
            raise SegmentError(f"--model-voxel-size: {spec} does not say the voxel size it was trained at; give the "
                               "voxel size of its training data (the paper's: 5.0)")
        for params in _training_params(spec, tracking_uri):
            key = next((k for k in (PREPROCESSING_VOXEL_PARAM, MODEL_VOXEL_PARAM) if k in params), None)
            if key is None:
                raise SegmentError(f"--model-voxel-size: the training run of {spec} has no param {MODEL_VOXEL_PARAM}; "
                                   "give the voxel size of its training data")
            found.add(float(params[key]))
            used = key
    if len(found) != 1:
        raise SegmentError(f"--model: the models were trained at different voxel sizes {sorted(found)} µm")
    return found.pop(), f"MLflow param {used}"


def training_clip_percentiles(specs: tp.Sequence[str], given: tp.Optional[tp.Sequence[float]],
                              tracking_uri: tp.Optional[str]) -> tuple[tuple[float, float], str]:
    """The grey-value clip percentiles to apply: ``--clip-percentiles``, else those data.prepare used on the models'
    training data (MLflow params ``preprocessing.clip_*_percentile``), else the paper's 0.5 / 99.9."""
    if given is not None:
        return (float(given[0]), float(given[1])), "--clip-percentiles"
    found: set[tuple[float, float]] = set()
    for spec in specs:
        if not spec.startswith(("runs:/", "models:/")):
            return tuple(PAPER_CLIP_PERCENTILES), "the paper's default (a .keras file does not record its preprocessing)"
        for params in _training_params(spec, tracking_uri):
            if CLIP_PARAMS[0] not in params or CLIP_PARAMS[1] not in params:
                return tuple(PAPER_CLIP_PERCENTILES), "the paper's default (the training run did not record them)"
            found.add((float(params[CLIP_PARAMS[0]]), float(params[CLIP_PARAMS[1]])))
    if len(found) != 1:
        raise SegmentError(f"--clip-percentiles: the models' training data were clipped differently {sorted(found)}; "
                           "give the percentiles")
    return found.pop(), "the training run's preprocessing (MLflow params preprocessing.clip_*_percentile)"


def _training_params(spec: str, tracking_uri: tp.Optional[str]) -> list[dict]:
    """The params of the training runs behind a ``runs:/`` or ``models:/`` model (a registered version's run names
    its fold runs in the tag ``fold_run_ids``, python -m sweep.register)."""
    from mlflow.tracking import MlflowClient

    from model.registry import is_registry_uri, resolve_model_uri

    client = MlflowClient(tracking_uri)
    try:
        uri = resolve_model_uri(spec, tracking_uri) if is_registry_uri(spec) else spec
        if not uri.startswith("runs:/"):
            raise SegmentError(f"--model-voxel-size: {spec} is not stored in a run; give the voxel size it was "
                               "trained at")
        run = client.get_run(uri.removeprefix("runs:/").split("/")[0])
        ids = [i for i in run.data.tags.get("fold_run_ids", "").split(",") if i]
        return [client.get_run(i).data.params for i in ids] if ids else [run.data.params]
    except SegmentError:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing run, version or server: one line naming the model
        raise SegmentError(f"--model: {spec}: cannot read its training run ({' '.join(str(exc).split())[:300]})") from None


def check_out_dir(out: Path, scan: VolumeRef, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SegmentError(f"--out: {out} is a file; give a folder")
    blocked = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise SegmentError(f"--out: {out}: {blocked} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SegmentError(f"--out: {out} exists and is not empty; give --overwrite to replace it")
    if out.resolve() == scan.path.resolve() or out.resolve() in scan.path.resolve().parents:
        raise SegmentError(f"--out: {out} holds the scan {scan.path}; give another folder")


def check_options(*, clip_percentiles: tp.Optional[tp.Sequence[float]], roi_um: float,
                  initial_volume_mm3: tp.Optional[float],
                  initial_surface_mm2: tp.Optional[float], days: tp.Optional[float], batch_size, workers) -> None:
    """Every number option, before the scan is read (they were checked only after 9 planes were predicted)."""
    from model.predict import parse_batch_size

    lo, hi = (float(v) for v in (clip_percentiles if clip_percentiles is not None else PAPER_CLIP_PERCENTILES))
    if not 0 <= lo < hi <= 100:
        raise SegmentError(f"--clip-percentiles: need 0 <= LOW < HIGH <= 100, got {lo:g} {hi:g}")
    if not (math.isfinite(roi_um) and roi_um > 0):
        raise SegmentError(f"--roi-um: must be a positive number of µm, got {roi_um:g}")
    for name, value in (("--initial-volume-mm3", initial_volume_mm3), ("--initial-surface-mm2", initial_surface_mm2),
                        ("--days", days)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SegmentError(f"{name}: must be a positive number, got {value:g}")
    parse_batch_size(batch_size)  # PredictError names --batch-size
    if workers is not None and int(workers) < 1:
        raise SegmentError(f"--workers: must be at least 1, got {workers}")


def check_scan(scan: VolumeRef) -> None:
    """The scan opens as a 3D volume (its file exists, is HDF5/Zarr/TIFF, has the dataset): DataError naming it."""
    from data.volume import open_volume

    try:
        with open_volume(scan):
            pass
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:  # zarr and tifffile raise these for foreign files
        raise DataError(scan.path, scan.dataset, f"not a readable volume ({' '.join(str(exc).split())[:200]})") from None


def _home_free(text: str) -> str:
    """No home paths in a report that is shared: ``~`` stands for the user's home."""
    home = str(Path.home())
    return str(text).replace(home + os.sep, "~" + os.sep) if home not in ("", os.sep) else str(text)


def _environment() -> dict:
    """What produced the report: versions of Python and the libraries that decide the numbers, and the host."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "host": platform.node()}
    for pkg in ("scaling-unet", "keras", "tensorflow", "numpy", "h5py"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _finite(v: float) -> tp.Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def report_markdown(report: dict) -> str:
    """The report for a person: measures with intervals, time per phase, provenance."""
    m, iv = report["measures"], report["intervals"]
    lines = [f"# Segmentation of {report['scan']['name']}", "",
             f"Models: {', '.join(report['models']['specs'])} ({report['prediction']['planes']} planes, "
             f"{report['prediction']['vote']} vote" + (f", fold vote {report['prediction']['fold_vote']}"
                                                        if len(report['models']['specs']) > 1 else "") + ")", "",
             f"Fused on {report['prediction'].get('fuse_on', 'files')}: {report['prediction'].get('why', '')}; batch "
             f"{report['prediction'].get('batch_size', '?')}, precision {report['prediction'].get('precision', '?')}.",
             "",
             "| measure | value | interval (plane disagreement) | conformal interval |", "|---|---|---|---|"]
    cv = report.get("conformal_intervals") or {}
    for key, name in MEASURES:
        v, (lo, hi) = m[key], iv[key]
        fmt = (lambda x: "n/a" if x is None else f"{x:.3f}")
        conf = f"[{fmt(cv[key][0])}, {fmt(cv[key][1])}]" if key in cv else "no calibration"
        if key in cv and v is not None and cv[key] == [None, None]:
            conf = f"unbounded (needs ≥ {report['calibration']['min_scans_for_alpha']} calibration scans)"
        lines.append(f"| {name} | {fmt(v)} | [{fmt(lo)}, {fmt(hi)}] | {conf} |")
    cal = report.get("calibration")
    lines += ["", (f"Conformal intervals: {cal['description']}, from {cal['source']}; measured coverage: "
                   "docs/measures.md." if cal else
                   "No calibration table: the plane-disagreement interval is a worst case with no stated coverage "
                   "(python -m analysis calibrate makes one).")]
    sg, mg = report.get("segmentation"), report.get("measures_grid")
    if sg and mg:
        lines += ["", f"Labels on the scan's grid: {sg['shape']} at {sg['voxel_size_um']} µm"
                  + (" (resampled from the model's grid, nearest neighbour)" if sg["resampled_from_model_grid"] else "")
                  + f"; measures computed on the model's grid, {mg['shape']} at {mg['voxel_size_um']} µm."]
    lines += ["", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["seconds"].items()]
    t = report["seconds"]["total"]
    lines += ["", f"Time for this sample: {t / 60:.1f} min (paper: ~{PAPER_MINUTES_PER_SAMPLE:.0f} min per sample on "
                  "its GPUs).", "",
              f"Scan: shape {report['scan']['shape']} at {report['scan']['voxel_size_um']} µm "
              f"({report['scan']['voxel_size_from']}), resampled to {report['prepared']['shape']} at "
              f"{report['prepared']['voxel_size_um']} µm ({report['prepared']['voxel_size_from']}), clipped to the "
              f"{' / '.join(f'{p:g}' for p in report['prepared']['clip_percentiles'])} % percentiles, "
              f"[{report['prepared']['clip_low']:.4g}, {report['prepared']['clip_high']:.4g}] "
              f"({report['prepared'].get('clip_percentiles_from', '')}), scaled to [0, 1].", ""]
    return "\n".join(lines)


def to_scan_grid(model_grid: Path, out: Path, scan_shape: tp.Sequence[int], model_vs: float, scan_vs: float,
                slab_mb: int = 256) -> list[str]:
    """Every 3D map of ``model_grid`` (labels, confidence, disagreement, plane and fold maps) written to ``out`` at the
    scan's own shape and voxel size: nearest neighbour (labels keep their classes; voxel centres aligned as
    data.prepare aligns them), slab by slab, so memory stays within about ``slab_mb`` whatever the scan. Returns the
    names written."""
    import h5py

    from data.prepare import axis_map, resampled_slabs
    from data.volume import VolumeRef, default_chunks

    scan_shape = tuple(int(n) for n in scan_shape)
    written = []
    with h5py.File(model_grid, "r") as src, h5py.File(out, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        dst.attrs["voxel_size_um"] = float(scan_vs)
        dst.attrs["grid"] = "scan"
        for name, ds in src.items():
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 3:
                continue
            maps = [axis_map(m, n, model_vs, scan_vs) for m, n in zip(ds.shape, scan_shape)]
            depth = max(1, min(scan_shape[0], (int(slab_mb) << 20) // max(1, 2 * ds.dtype.itemsize *
                                                                                 scan_shape[1] * scan_shape[2])))
            o = dst.create_dataset(name, shape=scan_shape, dtype=ds.dtype, chunks=default_chunks(scan_shape),
                                   compression=ds.compression, compression_opts=ds.compression_opts)
            for k, v in ds.attrs.items():
                o.attrs[k] = v
            ref = VolumeRef(Path(model_grid), f"/{name}")
            for zs, block in resampled_slabs(ds, ref, maps, depth, nearest=True, field=name):
                o[zs] = block
            written.append(name)
    return written


def calibration_table(choice: str, specs: tp.Sequence[str], tracking_uri: tp.Optional[str]
                      ) -> tuple[tp.Any, str]:
    """(Calibration or None, where it came from) for ``--calibration``: a file (read and checked now, before any
    model is loaded), ``auto`` (logged with a single registered model version) or ``none``."""
    from analysis.calibrate import find_calibration
    from analysis.calibration import Calibration

    if choice == "none":
        return None, ""
    if choice == "auto":
        try:
            cal = find_calibration(specs, tracking_uri)
        except Exception as exc:  # noqa: BLE001 - no table is not an error: the plane interval is still reported
            log.warning("no calibration table found with %s: %s", specs[0], exc)
            return None, ""
        return (cal, f"the artifact calibration.json of {specs[0]}") if cal is not None else (None, "")
    try:
        return Calibration.read(Path(choice)), _home_free(str(choice))
    except ValueError as exc:
        raise SegmentError(f"--calibration: {exc}") from None


def conformal_report(cal, source: str, measures: tp.Mapping[str, float]) -> dict:
    """The report's conformal intervals (centre ML − bias, half-width q; kind ``conformal``) and the calibration
    they came from; nothing when there is no table."""
    if cal is None:
        return {}
    from analysis.calibration import min_calibration_scans

    out = {}
    for key in cal.measures:
        lo, hi = cal.interval(key, float(measures.get(key, math.nan)))
        out[key] = [lo if math.isfinite(lo) else None, hi if math.isfinite(hi) else None]  # None: unbounded or n/a
    return {"conformal_intervals": out,
            "calibration": {"description": cal.describe(), "source": source, "alpha": cal.alpha, "scans": cal.n,
                            "min_scans_for_alpha": min_calibration_scans(cal.alpha),
                            "scan_ids": [s["id"] for s in cal.scans], "scan_digests": [s["digest"] for s in cal.scans],
                            "model": _home_free(cal.model),
                            "bias": {k: _finite(m.bias) for k, m in cal.measures.items()}}}


def segment_scan(scan: VolumeRef, specs: tp.Sequence[str], out: Path, *, voxel_size_um: tp.Optional[float] = None,
                 model_voxel_size_um: tp.Optional[float] = None, planes: str = "9", vote: str = "soft",
                 fold_vote: str = "soft", clip_percentiles: tp.Optional[tp.Sequence[float]] = None,
                 roi_um: float = 100.0, initial_volume_mm3: tp.Optional[float] = None,
                 initial_surface_mm2: tp.Optional[float] = None, days: tp.Optional[float] = None,
                 tracking_uri: tp.Optional[str] = None, overwrite: bool = False,
                 batch_size: tp.Union[int, str] = "auto", workers: tp.Optional[int] = None,
                 keep_prepared: bool = False, progress: bool = True, slab_mb: int = 256, ome_zarr: bool = False,
                 fuse_on: str = "auto", precision: str = "auto", calibration: str = "auto",
                 keep_model_grid: bool = False) -> dict:
    """The whole command as a function; returns the report (also ``out/report.json``).

    ``calibration``: a calibration table (``python -m analysis calibrate``) for conformal measure intervals: a
    JSON file, ``auto`` (the table logged with a registered model version, if any) or ``none``."""
    t_start = time.perf_counter()
    out = Path(out)
    if planes not in PLANE_SETS:
        raise SegmentError(f"--planes: must be one of {list(PLANE_SETS)}, got {planes!r}")
    if vote not in VOTES:
        raise SegmentError(f"--vote: must be one of {VOTES}, got {vote!r}")
    if fold_vote not in FOLD_VOTES:
        raise SegmentError(f"--fold-vote: must be one of {FOLD_VOTES}, got {fold_vote!r}")
    check_out_dir(out, scan, overwrite)
    check_options(clip_percentiles=clip_percentiles, roi_um=roi_um, initial_volume_mm3=initial_volume_mm3,
                  initial_surface_mm2=initial_surface_mm2, days=days, batch_size=batch_size, workers=workers)
    check_scan(scan)  # before its metadata is read for the voxel size
    scan_vs, scan_vs_from = scan_voxel_size(scan, voxel_size_um)
    check_model_store(specs, tracking_uri)
    model_vs, model_vs_from = model_voxel_size(specs, model_voxel_size_um, tracking_uri)
    clip_percentiles, clip_from = training_clip_percentiles(specs, clip_percentiles, tracking_uri)
    cal, cal_from = calibration_table(calibration, specs, tracking_uri)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    stats = check_image(scan, field="image")  # finite values, before a model is loaded or a voxel written
    if not stats.max > stats.min:
        raise SegmentError(f"SCAN: {scan}: every voxel is {stats.min:g}: a constant scan has no contrast to segment")
    models, model_id = load_models(list(specs), tracking_uri=tracking_uri)
    seconds["check and load"] = time.perf_counter() - t0
    name = scan.path.stem if scan.path.suffix else scan.path.name
    with atomic_dir(out, inputs=[scan.path]) as tmp:
        t0 = time.perf_counter()
        sample = Sample(id=name, image=scan, voxel_size_um=scan_vs, alloy="unknown", beamline="unknown",
                        implantation_days=float(days or 0.0), label_quality="HQ", split="test")
        prepared = prepare_sample(sample, stats, tmp, voxel_size_um=model_vs, clip_percentiles=clip_percentiles,
                                  slab_bytes=int(slab_mb) << 20)
        seconds["prepare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        times = PhaseTimes()
        on_scan_grid = tuple(prepared.shape_out) != tuple(prepared.shape_in) or model_vs != scan_vs
        seg = tmp / ("segmentation_model_grid.h5" if on_scan_grid else "segmentation.h5")
        plan: dict = {}
        # The OME-Zarr store (the scan and its labels for napari / Fiji) is a second output of the same fused volume.
        run_prediction(list(specs), prepared.sample.image, seg, model=(models, model_id), planes=planes, vote=vote,
                       uncertainty=True, values_checked=True, batch_size=batch_size, workers=workers,
                       progress=progress, times=times, fold_vote=fold_vote, work_dir=tmp / "planes",
                       voxel_size_um=model_vs, fuse_on=fuse_on, precision=precision, info=plan,
                       extra_outputs=[(tmp / "segmentation.zarr", True)] if ome_zarr else ())
        seconds["predict"] = time.perf_counter() - t0
        if (tmp / "planes").is_dir() and not any((tmp / "planes").iterdir()):
            (tmp / "planes").rmdir()
        t0 = time.perf_counter()
        import h5py

        kw = dict(voxel_size_um=model_vs, roi_um=roi_um, initial_volume_mm3=initial_volume_mm3,
                  initial_surface_mm2=initial_surface_mm2, days=days)
        with h5py.File(seg, "r") as f:
            measures = implant_measures(f["labels"], **kw)
            intervals = measure_intervals(f["labels"], f["disagreement"], f["plane_classes"], fused=measures, **kw)
        seconds["measures"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        segmentation_overview(prepared.sample.image, seg, tmp / "overview.png",
                              title=f"{name}: {planes} planes, {len(models)} model(s)")
        seconds["picture"] = time.perf_counter() - t0
        if on_scan_grid:  # labels and maps back on the scan's own grid: they overlay the user's scan in any viewer
            t0 = time.perf_counter()
            to_scan_grid(seg, tmp / "segmentation.h5", prepared.shape_in, model_vs, scan_vs, slab_mb)
            if not keep_model_grid:
                seg.unlink()
            seconds["to scan grid"] = time.perf_counter() - t0
        if not keep_prepared:
            (tmp / f"{name}.h5").unlink()
        else:
            (tmp / f"{name}.h5").rename(tmp / "prepared.h5")
        seconds["total"] = time.perf_counter() - t_start
        report = {
            "scan": {"name": scan.path.name, "dataset": scan.dataset, "digest": scan_digest(scan.path),
                     "shape": list(prepared.shape_in),
                     "voxel_size_um": scan_vs, "voxel_size_from": scan_vs_from, "dtype": str(stats.dtype)},
            "prepared": {"shape": list(prepared.shape_out), "voxel_size_um": model_vs, "voxel_size_from": model_vs_from,
                         "clip_percentiles": list(clip_percentiles), "clip_percentiles_from": clip_from,
                         "clip_low": prepared.clip_low,
                         "clip_high": prepared.clip_high, "kept": bool(keep_prepared)},
            "models": {"specs": [_home_free(s) for s in specs], "identity": _home_free(model_id)},
            "prediction": {"planes": planes, "vote": vote, "fold_vote": fold_vote, **plan,
                           "phase_seconds": {k: round(v, 3) for k, v in times.seconds.items()}},
            "segmentation": {"file": "segmentation.h5", "grid": "scan", "shape": list(prepared.shape_in),
                             "voxel_size_um": scan_vs, "resampled_from_model_grid": bool(on_scan_grid),
                             "model_grid_kept": bool(on_scan_grid and keep_model_grid)},
            "measures_grid": {"grid": "model", "shape": list(prepared.shape_out), "voxel_size_um": model_vs},
            "measures": {k: _finite(v) for k, v in measures.items()},
            "intervals": {k: [_finite(lo), _finite(hi)] for k, (lo, hi) in intervals.items()},
            "interval_kind": "plane_disagreement",
            **conformal_report(cal, cal_from, measures),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "minutes_per_sample": round(seconds["total"] / 60, 3),
            "environment": _environment(),
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.md").write_text(report_markdown(report))
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.segment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scan", metavar="SCAN", help="raw scan: HDF5 file (see --dataset), Zarr store or TIFF folder")
    ap.add_argument("--model", action="append", required=True, metavar="MODEL",
                    help=".keras file, runs:/<run id>/model or models:/<name>/<version>; repeat for the fold ensemble")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--dataset", default="image", help="HDF5 dataset / Zarr array of SCAN (default: image)")
    ap.add_argument("--voxel-size", type=float, help="the scan's voxel edge in µm (default: from its metadata)")
    ap.add_argument("--model-voxel-size", type=float,
                    help="voxel edge in µm the models were trained at (default: their MLflow training run's)")
    ap.add_argument("--planes", default="9", choices=list(PLANE_SETS), help="slicing planes (default: 9)")
    ap.add_argument("--vote", default="soft", choices=VOTES, help="over planes: soft (Eq. 4) or majority (Eq. 5)")
    ap.add_argument("--fold-vote", default="soft", choices=FOLD_VOTES, help="over the models of an ensemble")
    ap.add_argument("--clip-percentiles", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                    help="grey-value clip percentiles (default: those of the models' training data, recorded in their "
                         "MLflow runs; else the paper's 0.5 99.9)")
    ap.add_argument("--roi-um", type=float, default=100.0, help="BV/TV region's reach from the implant in µm")
    ap.add_argument("--initial-volume-mm3", type=float, help="DR: initial screw volume v_i")
    ap.add_argument("--initial-surface-mm2", type=float, help="DR: initial screw surface a_i")
    ap.add_argument("--days", type=float, help="DR: implantation time in days")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="for runs:/ and models:/")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    ap.add_argument("--keep-prepared", action="store_true", help="keep the preprocessed scan (prepared.h5)")
    ap.add_argument("--keep-model-grid", action="store_true",
                    help="also keep the labels on the model's grid (segmentation_model_grid.h5); segmentation.h5 is "
                         "always on the scan's own shape and voxel size")
    ap.add_argument("--ome-zarr", action="store_true",
                    help="also write segmentation.zarr: the prepared scan with labels/, probabilities, uncertainty "
                         "(OME-Zarr for napari, Fiji)")
    ap.add_argument("--batch-size", default="auto",
                    help="slices per forward pass (default auto: the largest the memory holds)")
    ap.add_argument("--fuse-on", default="auto", choices=["auto", "device", "host", "files"],
                    help="where the planes are fused: device (GPU memory), host (RAM), files (plane files); "
                         "auto: by the memory estimate, printed and recorded in the report")
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_float16", "mixed_bfloat16"],
                    help="inference dtype policy (auto: the training's on a GPU, float32 on a CPU)")
    ap.add_argument("--workers", type=int, help="CPU threads for rotations and slab I/O (default: all cores)")
    ap.add_argument("--calibration", default="auto",
                    help="calibration table for conformal measure intervals (python -m analysis calibrate): a JSON "
                         "file, auto (the one logged with a registered model version; default) or none")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # MLflow's default backs off for minutes
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = segment_scan(volume_ref(args.scan, args.dataset), args.model, args.out, voxel_size_um=args.voxel_size,
                              model_voxel_size_um=args.model_voxel_size, planes=args.planes, vote=args.vote,
                              fold_vote=args.fold_vote, clip_percentiles=args.clip_percentiles, roi_um=args.roi_um,
                              initial_volume_mm3=args.initial_volume_mm3,
                              initial_surface_mm2=args.initial_surface_mm2, days=args.days,
                              tracking_uri=args.tracking_uri, overwrite=args.overwrite, batch_size=args.batch_size,
                              workers=args.workers, keep_prepared=args.keep_prepared, progress=not args.no_progress,
                              ome_zarr=args.ome_zarr, fuse_on=args.fuse_on, precision=args.precision,
                              calibration=args.calibration, keep_model_grid=args.keep_model_grid)
    except (SegmentError, PredictError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report_markdown(report))
    print(f"wrote {args.out}/: segmentation.h5{', segmentation.zarr' if args.ome_zarr else ''}, overview.png, "
          "report.json, report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
