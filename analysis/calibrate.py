"""``python -m analysis calibrate --model M [--model M ...] --scans DATASET [--alpha 0.1] [--out calibration.json]``

A calibration table for the implant measures' conformal intervals (analysis.calibration): every scan of DATASET
with a high-quality label (``label_quality: HQ``; a ``data.prepare`` dataset at the models' voxel size, e.g. the
user's HQ-labelled scans, or synthetic explants from ``python -m data.synth --n-train 0 --n-test N``) is predicted
by the model ensemble (9 planes, soft vote) and by each member alone; DR, BIC and BV/TV of the fused labels, of
each member's and of the HQ label give the errors the table is fitted on.

With one ``models:/<name>/<version>`` model the table is also logged as the artifact ``calibration.json`` of the
version's run (``--log-to-model``, default on), where ``analysis.segment --calibration auto`` finds it. Exit
status: 0 written; 2 bad input (one ``error:`` line naming the option or file, nothing written).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import typing as tp
from pathlib import Path

from analysis.calibration import CALIBRATION_FILE, DEFAULT_ALPHA, MEASURES, Calibration, check_alpha, fit_calibration

log = logging.getLogger(__name__)


class CalibrateError(ValueError):
    """A bad argument or input; the message names the option or file."""


def hq_samples(dataset_dir: Path, ids: tp.Optional[tp.Sequence[str]] = None) -> tuple[tp.Any, list]:
    """(dataset, its samples with an HQ label): the scans a calibration can use; ``ids`` picks some of them."""
    from data.manifest import load_dataset

    ds = load_dataset(dataset_dir)
    hq = [s for s in ds.samples if s.label is not None and s.label_quality == "HQ"]
    if ids:
        unknown = sorted(set(ids) - {s.id for s in hq})
        if unknown:
            raise CalibrateError(f"--sample: {unknown[0]} is not an HQ-labelled sample of {dataset_dir}")
        hq = [s for s in hq if s.id in set(ids)]
    if not hq:
        raise CalibrateError(f"--scans: {dataset_dir} has no sample with an HQ label (label_quality: HQ)")
    return ds, hq


def sample_measures(labels, sample, roi_um: float) -> dict[str, float]:
    """DR (Eq. 1), BIC (Eq. 2), BV/TV (Eq. 3) of a label volume of ``sample`` (its voxel size, initial implant
    volume and surface, implantation time)."""
    from analysis.measures import implant_measures

    m = implant_measures(labels, voxel_size_um=sample.voxel_size_um, roi_um=roi_um,
                         initial_volume_mm3=sample.initial_volume_mm3, initial_surface_mm2=sample.initial_surface_mm2,
                         days=sample.implantation_days or None)
    return {k: float(m[k]) for k in MEASURES}


def scan_record(models: tp.Sequence, model_id: str, sample, *, roi_um: float = 100.0, planes: str = "9",
                vote: str = "soft", batch_size: tp.Union[int, str] = "auto", members: bool = True,
                work: Path) -> dict[str, tp.Any]:
    """One calibration (or test) record: the ML measures of the ensemble's fused labels, their plane-disagreement
    interval, each member's measures (each model alone, the same planes and vote), and the HQ label's."""
    import h5py

    from analysis.intervals import measure_intervals
    from data.fingerprint import scan_digest
    from model.predict import run_prediction

    def predict(ms: tp.Sequence, ident: str, out: Path) -> Path:
        return run_prediction([ident], sample.image, out, model=(list(ms), ident), planes=planes, vote=vote,
                              uncertainty=True, values_checked=True, batch_size=batch_size, progress=False,
                              work_dir=work / "planes", fuse_on="host", overwrite=True)

    seg = predict(models, model_id, work / f"{sample.id}.h5")
    with h5py.File(seg, "r") as f:
        ml = sample_measures(f["labels"], sample, roi_um)
        kw = dict(voxel_size_um=sample.voxel_size_um, roi_um=roi_um, initial_volume_mm3=sample.initial_volume_mm3,
                  initial_surface_mm2=sample.initial_surface_mm2, days=sample.implantation_days or None)
        plane = measure_intervals(f["labels"], f["disagreement"], f["plane_classes"], **kw)
    seg.unlink()
    per_member: dict[str, list[float]] = {k: [] for k in MEASURES}
    if members and len(models) > 1:
        for i, m in enumerate(models):
            out = predict([m], f"{model_id}#member{i}", work / f"{sample.id}-member{i}.h5")
            with h5py.File(out, "r") as f:
                for k, v in sample_measures(f["labels"], sample, roi_um).items():
                    per_member[k].append(v)
            out.unlink()
    from data.volume import open_volume

    with open_volume(sample.label) as lab:
        hq = sample_measures(lab, sample, roi_um)
    return {"id": sample.id, "digest": scan_digest(sample.image.path), "ml": ml, "hq": hq,
            "members": {k: v for k, v in per_member.items() if v}, "plane": {k: list(v) for k, v in plane.items()}}


def records_for(specs: tp.Sequence[str], dataset_dir: Path, *, ids: tp.Optional[tp.Sequence[str]] = None,
                tracking_uri: tp.Optional[str] = None, roi_um: float = 100.0, members: bool = True,
                batch_size: tp.Union[int, str] = "auto") -> list[dict[str, tp.Any]]:
    """:func:`scan_record` of every HQ-labelled sample of ``dataset_dir`` (models loaded once)."""
    from model.predict import load_models

    _, samples = hq_samples(dataset_dir, ids)
    models, model_id = load_models(list(specs), tracking_uri=tracking_uri)
    out = []
    with tempfile.TemporaryDirectory(prefix="scaling-unet-calibrate-") as tmp:
        for i, s in enumerate(samples, 1):
            out.append(scan_record(models, model_id, s, roi_um=roi_um, members=members, batch_size=batch_size,
                                   work=Path(tmp)))
            log.info("calibrate: %d/%d %s done", i, len(samples), s.id)
    return out


def version_run(spec: str, tracking_uri: tp.Optional[str]) -> tp.Optional[str]:
    """The run behind a registered version ``models:/<name>/<version>`` (where its calibration table lives)."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    if not str(spec).startswith("models:/"):
        return None
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    base, _ = ModelsArtifactRepository.split_models_uri(spec)
    found = get_model_name_and_version(client, base)
    if len(found) != 2:
        return None
    return client.get_model_version(*found).run_id


def find_calibration(specs: tp.Sequence[str], tracking_uri: tp.Optional[str]) -> tp.Optional[Calibration]:
    """The calibration table logged with a single registered model version, if any (``--calibration auto``)."""
    if len(specs) != 1:
        return None
    run_id = version_run(specs[0], tracking_uri)
    if run_id is None:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if CALIBRATION_FILE not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="scaling-unet-calibration-") as tmp:
        return Calibration.read(Path(client.download_artifacts(run_id, CALIBRATION_FILE, tmp)))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help=".keras file, runs:/… or models:/… (repeat: "
                    "the ensemble)")
    ap.add_argument("--scans", required=True, type=Path, help="a data.prepare dataset with HQ-labelled samples")
    ap.add_argument("--sample", action="append", default=None, help="only these sample ids (repeat)")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="1 − coverage of the intervals (default 0.1)")
    ap.add_argument("--roi-um", type=float, default=100.0, help="BV/TV region around the implant (default 100)")
    ap.add_argument("--out", type=Path, default=Path(CALIBRATION_FILE), help="the table (default ./calibration.json)")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="for runs:/ and models:/")
    ap.add_argument("--no-members", action="store_true", help="skip each member's own prediction (no normalised "
                    "intervals; K× faster for K models)")
    ap.add_argument("--no-log-to-model", action="store_true", help="do not log the table to the model version's run")
    ap.add_argument("--overwrite", action="store_true")
    return ap


def check_args(args: argparse.Namespace) -> None:
    """Everything checked before a model is loaded: one CalibrateError naming the option or file."""
    try:
        check_alpha(args.alpha)
    except ValueError as exc:
        raise CalibrateError(f"--{exc}") from None
    if not (args.roi_um > 0 and math.isfinite(args.roi_um)):
        raise CalibrateError(f"--roi-um: must be a positive number of µm, got {args.roi_um}")
    out = Path(args.out)
    if out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents):
        raise CalibrateError(f"--out {out}: a folder, or under a file")
    if out.exists() and not args.overwrite:
        raise CalibrateError(f"--out {out}: exists (give --overwrite to replace it)")
    from model.predict import check_model_store

    check_model_store(args.model, args.tracking_uri)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from data.errors import DataError
    from model.predict import PredictError

    try:
        check_args(args)
        hq_samples(args.scans, args.sample)  # the dataset and its HQ samples, before a model is loaded
        records = records_for(args.model, args.scans, ids=args.sample, tracking_uri=args.tracking_uri,
                              roi_um=args.roi_um, members=not args.no_members)
    except (CalibrateError, PredictError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cal = fit_calibration(records, args.alpha, model=" ".join(args.model),
                          note=f"{len(records)} HQ-labelled scans of {Path(args.scans).name}")
    cal.write(args.out)
    print(f"wrote {args.out}: {cal.describe()}")
    for m in MEASURES:
        c = cal.measures[m]
        print(f"  {m}: bias {c.bias:+.4g}, half-width {c.q_absolute:.4g}")
    if not args.no_log_to_model and len(args.model) == 1:
        run_id = version_run(args.model[0], args.tracking_uri)
        if run_id is not None:
            from mlflow.tracking import MlflowClient

            import shutil

            with tempfile.TemporaryDirectory(prefix="scaling-unet-calibration-") as tmp:
                named = Path(tmp) / CALIBRATION_FILE  # the artifact's name, whatever --out was called
                shutil.copyfile(args.out, named)
                MlflowClient(tracking_uri=args.tracking_uri).log_artifact(run_id, str(named))
            print(f"logged {CALIBRATION_FILE} to run {run_id} of {args.model[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
