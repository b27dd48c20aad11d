"""``python -m model.predict MODEL VOLUME --planes {rc,cp,pr,3,9} --vote {soft,majority} --out OUT.h5``

Segment a whole preprocessed volume (values in [0, 1]) with a trained model by multi-axes
prediction fusing (paper, Eq. 4/5). MODEL is a ``.keras`` file or an MLflow model URI
(``runs:/<run id>/model``, with ``--tracking-uri``). VOLUME is an HDF5 file (``--dataset``) or a
folder of TIFF slices. OUT.h5 gets ``labels`` (uint8, the input's shape) and, with
``--probabilities``, ``probabilities`` (float16, classes last, the plane average P_avr).

Everything that can be wrong is checked before the first slice is predicted: OUT exists
(``--overwrite``), the volume (NaN, values outside [0, 1]), the model's number of classes, free
disk. Outputs are written to temporary files and renamed at the end: an interrupted run leaves no
half-written OUT. Per-plane files go to ``--work-dir`` (default ``OUT.planes/``) and are reused
when a run is restarted; they are deleted after the fuse step unless ``--keep-planes``.
``--plane NAME`` runs one plane task only and ``--fuse-only`` only the fuse step (how the SLURM
array of ``python -m sweep.predict`` splits the work).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import zipfile
import typing as tp
from pathlib import Path

from data.errors import DataError
from data.volume import NUM_CLASSES, VolumeRef, check_image, open_volume, volume_ref
from model.fusion import VOTES
from model.inference import (PLANE_SETS, PLANES, Source, SlicePredictor, check_disk, estimate_disk_bytes, file_digest,
                             fuse_planes, plane_set, predict_plane)

log = logging.getLogger(__name__)


class PredictError(ValueError):
    """A bad argument or input; the message names the file or option."""


def load_model(spec: str, *, tracking_uri: tp.Optional[str] = None):
    """A Keras model from a ``.keras`` file or ``runs:/<id>/<path>``; returns (model, identity string)."""
    import keras

    path = Path(spec)
    dst: tp.Optional[Path] = None
    if spec.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow

        dst = Path(tempfile.mkdtemp(prefix="scaling-unet-model-"))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(dst), tracking_uri=tracking_uri))
        except Exception as exc:  # MLflow raises many types for a missing run/artifact/server
            shutil.rmtree(dst, ignore_errors=True)
            raise PredictError(f"MODEL: cannot fetch {spec} from {tracking_uri or 'the default tracking URI'} ({exc})") from None
        files = [local] if local.is_file() else sorted(local.rglob("*.keras"))
        if not files:
            raise PredictError(f"MODEL: {spec} holds no .keras file")
        path = files[0]
        model_id = f"{spec}:{file_digest(path)}"
    else:
        if not path.is_file():
            raise PredictError(f"MODEL: {path}: file does not exist")
        if path.suffix != ".keras":
            raise PredictError(f"MODEL: {path}: expected a .keras file or runs:/<id>/model")
        model_id = file_digest(path)
    if not zipfile.is_zipfile(path):  # Keras says "File not found" for a file that exists but is no archive
        if dst is not None:
            shutil.rmtree(dst, ignore_errors=True)
        raise PredictError(f"MODEL: {path}: not a Keras model file (a .keras file is a zip archive)")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises ValueError/OSError/zipfile errors for broken files
        raise PredictError(f"MODEL: {path}: cannot load ({exc})") from None
    finally:
        if dst is not None:
            shutil.rmtree(dst, ignore_errors=True)
    check_model(model, str(path))
    return model, model_id


def check_model(model, name: str, num_classes: int = NUM_CLASSES) -> None:
    """The model must map (H, W, 1) slices to ``num_classes`` class scores per pixel."""
    out = tuple(model.output_shape)
    inp = tuple(model.input_shape)
    if len(out) != 4 or out[-1] != num_classes:
        raise PredictError(f"MODEL: {name}: output has {out[-1] if out else '?'} classes (shape {out}), "
                           f"expected {num_classes} (background, bone, degradation layer, residual material)")
    if len(inp) != 4 or inp[-1] != 1:
        raise PredictError(f"MODEL: {name}: input shape {inp}, expected (batch, H, W, 1) grey-value slices")


def keras_predictor(model, *, batch_size: int = 4) -> SlicePredictor:
    """Full-slice inference (reflect-padded to 2^depth), softmax probabilities."""
    from model.unet import infer_depth, predict_full_slice

    depth = infer_depth(model)

    def predict(slices):
        return predict_full_slice(model, slices, depth, batch_size=batch_size, probabilities=True)

    return predict


def default_work_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".planes")


def check_inputs(volume: VolumeRef, out: Path, *, planes: tp.Sequence[str], overwrite: bool, probabilities: bool,
                 tiff: tp.Optional[Path], work_dir: Path, check_out: bool = True, scan_values: bool = True) -> Source:
    """All input checks that need no model: OUT, the volume's values, free disk. Returns the source.

    ``scan_values=False`` reads only the shape: for the fuse step (it never reads the volume) and for
    tasks whose volumes the submitting process has already scanned.
    """
    if check_out:
        for target, opt in ((out, "--out"), (tiff, "--tiff")):
            if target is not None and Path(target).exists() and not overwrite:
                raise PredictError(f"{opt}: {target} exists; give --overwrite to replace it")
            if target is not None and Path(target).resolve() == volume.path.resolve():
                raise PredictError(f"{opt}: {target} is the input volume")
    if scan_values:
        shape = check_image(volume, field="image", require_unit_range=True).shape
    else:
        with open_volume(volume) as vol:
            shape = tuple(vol.shape)
    source = Source(volume, tp.cast(tuple, tuple(int(s) for s in shape)))
    need = estimate_disk_bytes(source.shape, planes, probabilities=probabilities, tiff=tiff is not None)
    if check_out:
        check_disk(Path(out).parent, need["output"], f"the output {out}")
    check_disk(work_dir, need["planes"] + need["temporary"], f"the plane files in {work_dir}")
    return source


def plane_path(work_dir: Path, plane: str) -> Path:
    return Path(work_dir) / f"{plane}.h5"


def run_prediction(model_spec: str, volume: VolumeRef, out: Path, *, planes: str = "3", vote: str = "soft",
                   probabilities: bool = False, tiff: tp.Optional[Path] = None, overwrite: bool = False,
                   work_dir: tp.Optional[Path] = None, keep_planes: bool = False, batch_size: int = 4,
                   tracking_uri: tp.Optional[str] = None, only_plane: tp.Optional[str] = None,
                   fuse_only: bool = False, progress: bool = True, model: tp.Optional[tuple] = None,
                   values_checked: bool = False) -> Path:
    """The whole CLI as a function; returns OUT (or the plane file with ``only_plane``).

    ``model``: an already loaded (model, identity) from :func:`load_model`; ``values_checked``: the
    volume's values were scanned by the caller (``python -m sweep.predict`` checks all volumes first).
    """
    names = plane_set(planes)
    if vote not in VOTES:
        raise PredictError(f"--vote: must be one of {VOTES}, got {vote!r}")
    if only_plane is not None and only_plane not in names:
        raise PredictError(f"--plane: {only_plane!r} is not one of the planes of --planes {planes}: {list(names)}")
    out = Path(out)
    work_dir = Path(work_dir) if work_dir else default_work_dir(out)
    source = check_inputs(volume, out, planes=[only_plane] if only_plane else names, overwrite=overwrite,
                          probabilities=probabilities, tiff=tiff, work_dir=work_dir, check_out=only_plane is None,
                          scan_values=not (values_checked or fuse_only))
    if not fuse_only:
        keras_model, model_id = model or load_model(model_spec, tracking_uri=tracking_uri)
        predictor = keras_predictor(keras_model, batch_size=batch_size)
        for name in [only_plane] if only_plane else names:
            predict_plane(source, name, predictor, plane_path(work_dir, name), model_id=model_id,
                          batch_size=batch_size, tmp_dir=work_dir, progress=progress)
        if only_plane:
            return plane_path(work_dir, only_plane)
    paths = [plane_path(work_dir, n) for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PredictError(f"--work-dir: plane files missing for the fuse step: {missing}")
    fuse_planes(paths, out, method=vote, probabilities=probabilities, tiff_path=tiff, inputs=[volume.path],
                attrs={"source": str(volume), "planes_set": planes}, progress=progress)
    if not keep_planes:
        for p in paths:
            p.unlink(missing_ok=True)
        if work_dir == default_work_dir(out) and work_dir.is_dir() and not any(work_dir.iterdir()):
            work_dir.rmdir()
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m model.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", metavar="MODEL", help=".keras file or runs:/<run id>/model")
    ap.add_argument("volume", metavar="VOLUME", help="HDF5 file (see --dataset) or folder of TIFF slices")
    ap.add_argument("--dataset", default="image", help="HDF5 dataset of VOLUME (default: image)")
    ap.add_argument("--planes", default="3", choices=list(PLANE_SETS), help="slicing planes (default: 3)")
    ap.add_argument("--vote", default="soft", choices=VOTES, help="soft (Eq. 4) or majority (Eq. 5) voting")
    ap.add_argument("--out", required=True, type=Path, help="output HDF5 file (dataset labels)")
    ap.add_argument("--probabilities", action="store_true", help="also write probabilities (float16, classes last)")
    ap.add_argument("--tiff", type=Path, help="also write the labels as one multi-page TIFF (Fiji, Avizo, 3D Slicer)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT / --tiff")
    ap.add_argument("--work-dir", type=Path, help="per-plane files (default: OUT.planes/)")
    ap.add_argument("--keep-planes", action="store_true", help="keep the per-plane probability files")
    ap.add_argument("--batch-size", type=int, default=4, help="slices per forward pass (default: 4)")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="for runs:/ models")
    ap.add_argument("--plane", choices=list(PLANES), help="run this plane task only (cluster array task)")
    ap.add_argument("--fuse-only", action="store_true", help="only the fuse step, from the plane files")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.batch_size < 1:
        print("error: --batch-size: must be at least 1", file=sys.stderr)
        return 2
    try:
        result = run_prediction(args.model, volume_ref(args.volume, args.dataset), args.out, planes=args.planes,
                                vote=args.vote, probabilities=args.probabilities, tiff=args.tiff,
                                overwrite=args.overwrite, work_dir=args.work_dir, keep_planes=args.keep_planes,
                                batch_size=args.batch_size, tracking_uri=args.tracking_uri, only_plane=args.plane,
                                fuse_only=args.fuse_only, progress=not args.no_progress)
    except (PredictError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
