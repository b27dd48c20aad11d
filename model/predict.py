"""``python -m model.predict MODEL VOLUME --planes {rc,cp,pr,3,9} --vote {soft,majority} --out OUT.h5``

Segment a whole preprocessed volume (values in [0, 1]) with a trained model by multi-axes
prediction fusing (paper, Eq. 4/5). MODEL is a ``.keras`` file or an MLflow model URI
(``runs:/<run id>/model``, with ``--tracking-uri``), or a registered version ``models:/<name>/<version>`` /
``models:/<name>@<alias>`` (``python -m sweep.register``: its fold models predict as one ensemble);
several MODELs (e.g. the 4 fold models of a config) predict as one ensemble: their probabilities are averaged per slice batch before the planes are fused. VOLUME is an HDF5 file (``--dataset``) or a
folder of TIFF slices. OUT.h5 gets ``labels`` (uint8, the input's shape) and, with
``--probabilities``, ``probabilities`` (float16, classes last, the plane average P_avr); with
``--uncertainty`` the uint8 maps ``confidence``, ``disagreement`` and ``plane_classes`` (see
model.fusion.uncertainty_maps). ``--out seg.zarr`` writes an OME-Zarr store instead (labels as a
multiscale pyramid, the other outputs beside them). VOLUME may also be a ``.zarr`` store.

Where the planes are fused is ``--fuse-on``: ``device`` (the volume, each rotated plane and one fused accumulator
in the device's memory, end to end; model.resident_device), ``host`` (the same in RAM; model.resident), ``files``
(per-plane files, below), ``auto`` (default: the device if it is a GPU that holds the memory estimate, else RAM,
else files; the choice and the estimate are printed before the first slice and recorded in OUT's attribute
``fuse_on``). The models run as one compiled function (model.forward), ``--batch-size auto`` slices at a time (what
the free memory holds), in ``--precision auto`` (the training's policy on a GPU, float32 on a CPU).

Rotations of the 9-plane path run where ``--rotate-on`` says: ``device`` (Keras ops on the
network's device), ``cpu`` (scipy on ``--workers`` threads, default all cores of this process),
``auto`` (the device when it is a GPU). ``--workers`` > 1 also overlaps slab I/O with compute.

Everything that can be wrong is checked before the first slice is predicted: OUT exists
(``--overwrite``), the volume (NaN, values outside [0, 1]), the model's number of classes, free
disk (the uncompressed upper bound, or ``--max-disk``; before each further plane again, from the
sizes of the plane files actually written). Outputs are written to temporary files and renamed at the end: an interrupted run leaves no
half-written OUT. With ``--fuse-on files``, per-plane files go to ``--work-dir`` (default ``OUT.planes/``) and are reused
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

import numpy as np

from data.errors import DataError
from data.volume import NUM_CLASSES, VolumeRef, check_image, is_zarr_path, open_volume, volume_ref
from model.disk import check_disk, estimate_disk_bytes, file_digest
from model.fuse import fuse_planes, input_voxel_size_um
from model.fusion import VOTES
from model.forward import FOLD_VOTES
from model.validation import PRECISIONS
from model.inference import Source, SlicePredictor, predict_plane
from model.planes import PLANE_SETS, PLANES, plane_set
from model.rotate import ROTATE_ON, available_cores, make_rotation
from model.server_health import ServerUnreachable, check_server

log = logging.getLogger(__name__)


class PredictError(ValueError):
    """A bad argument or input; the message names the file or option."""


STORE_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def check_model_store(specs: tp.Sequence[str], tracking_uri: tp.Optional[str]) -> None:
    """A model looked up in MLflow needs a store that exists: without ``--tracking-uri`` (or MLFLOW_TRACKING_URI),
    or with a ``sqlite:///`` file that is not there, MLflow would create an empty ./mlflow.db (or that file) and
    then fail to find the model; refused before anything is written. A server must answer (:func:`check_tracking_server`)."""
    stored = [s for s in specs if str(s).startswith(STORE_SCHEMES)]
    if not stored:
        return
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise PredictError(f"--tracking-uri: {stored[0]} is looked up in an MLflow store: give --tracking-uri (or set "
                           "MLFLOW_TRACKING_URI)")
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise PredictError(f"--tracking-uri: {db} does not exist (an MLflow store holding {stored[0]} was expected)")
    check_tracking_server(uri)


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking server must answer /health within ``timeout_s`` (and accept API requests): MLflow's own
    retries would take minutes to say the same."""
    try:
        check_server(uri, timeout_s)
    except ServerUnreachable as exc:
        raise PredictError(f"--tracking-uri: {exc}") from None


def load_model(spec: str, *, tracking_uri: tp.Optional[str] = None):
    """A Keras model from a ``.keras`` file, ``runs:/<id>/<path>``, or a registered version ``models:/<name>/<version>``
    or ``models:/<name>@<alias>`` (resolved in the registry of ``tracking_uri``); returns (model, identity string).

    A registered version holds every ``.keras`` file of its folder (``python -m sweep.register``: one per fold): with
    several it returns (their list, sorted by fold, identity), one ensemble. The identity names the URI and the
    digest of each file, so plane files of another version (an alias moved) are not reused."""
    import keras

    from model.registry import fold_order, is_registry_uri, resolve_model_uri
    from model.server_health import redact_uri

    path = Path(spec)
    paths = [path]
    dst: tp.Optional[Path] = None
    if spec.startswith(STORE_SCHEMES):
        import mlflow

        check_model_store([spec], tracking_uri)

        dst = Path(tempfile.mkdtemp(prefix="scaling-unet-model-"))
        try:
            source = resolve_model_uri(spec, tracking_uri) if is_registry_uri(spec) else spec
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri))
        except Exception as exc:  # MLflow raises many types for a missing run/artifact/version/server
            shutil.rmtree(dst, ignore_errors=True)
            where = redact_uri(tracking_uri or "the default tracking URI")
            raise PredictError(f"MODEL: cannot fetch {spec} from {where} ({' '.join(redact_uri(str(exc)).split())})") from None
        files = [local] if local.is_file() else sorted(local.rglob("*.keras"), key=fold_order)
        if not files:
            shutil.rmtree(dst, ignore_errors=True)
            raise PredictError(f"MODEL: {spec} holds no .keras file")
        paths = files if is_registry_uri(spec) else files[:1]  # a run's model/ folder: its one model, as before
        model_id = f"{spec}:{'+'.join(file_digest(p) for p in paths)}"
    else:
        if not path.is_file():
            raise PredictError(f"MODEL: {path}: file does not exist")
        if path.suffix != ".keras":
            raise PredictError(f"MODEL: {path}: expected a .keras file, runs:/<id>/model or models:/<name>/<version>")
        model_id = file_digest(path)
    models = []
    try:
        for p in paths:
            name = f"{spec} ({p.name})" if len(paths) > 1 else str(p)
            if not zipfile.is_zipfile(p):  # Keras says "File not found" for a file that exists but is no archive
                raise PredictError(f"MODEL: {name}: not a Keras model file (a .keras file is a zip archive)")
            try:
                models.append(keras.saving.load_model(p, compile=False))
            except Exception as exc:  # Keras raises ValueError/OSError/zipfile errors for broken files
                raise PredictError(f"MODEL: {name}: cannot load ({exc})") from None
            check_model(models[-1], name)
    finally:
        if dst is not None:
            shutil.rmtree(dst, ignore_errors=True)
    return (models[0] if len(models) == 1 else models), model_id


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
    """Full-slice inference (reflect-padded to 2^depth), softmax probabilities, in one compiled function
    (model.forward); a model built under a multi-replica strategy spreads each batch over its replicas."""
    return models_predictor([model], batch_size=batch_size)


def models_predictor(models: tp.Sequence, *, batch_size: int = 4, fold_vote: str = "soft",
                     fold_disagreement: bool = False) -> SlicePredictor:
    """One model or a fold ensemble (:func:`ensemble_predictor`'s votes) as one compiled function (model.forward),
    so the models share each batch on the device; models on several replicas go through model.devices instead."""
    from model.devices import replicas_of
    from model.forward import compiled_predictor
    from model.unet import infer_depth, predict_full_slice

    depths = {infer_depth(m) for m in models}
    if len(depths) == 1 and all(replicas_of(m) == 1 for m in models):
        if len(models) == 1 and not fold_disagreement:
            fold_vote = "soft"  # one model: its probabilities, whatever the fold vote
        return compiled_predictor(list(models), depth=depths.pop(), batch_size=batch_size, fold_vote=fold_vote,
                                  fold_disagreement=fold_disagreement)

    def single(model):
        depth = infer_depth(model)
        return lambda slices: predict_full_slice(model, slices, depth, batch_size=batch_size, probabilities=True)

    return ensemble_predictor([single(m) for m in models], fold_vote, fold_disagreement=fold_disagreement)


def ensemble_predictor(predictors: tp.Sequence[SlicePredictor], vote: str = "soft", *,
                       fold_disagreement: bool = False) -> SlicePredictor:
    """The fold models as one (paper Eq. 4/5 applied over folds): ``soft`` averages their softmax probabilities per
    slice batch; ``majority`` averages their one-hot labels (vote shares), so the planes' soft vote on top counts
    the votes of folds × planes. One batch of every model in memory, never a volume.

    ``fold_disagreement``: one more channel after the classes, the fraction of the models whose label (argmax)
    differs from the ensemble's (model.inference keeps it as the plane file's fold disagreement map)."""
    if vote not in FOLD_VOTES:
        raise PredictError(f"--fold-vote: must be one of {FOLD_VOTES}, got {vote!r}")
    if len(predictors) == 1 and not fold_disagreement:
        return predictors[0]

    def predict(slices):
        total, labels = None, []
        for p in predictors:
            probs = np.asarray(p(slices), dtype=np.float32)
            labels.append(probs.argmax(-1))
            if vote == "majority":
                probs = (labels[-1][..., None] == np.arange(probs.shape[-1])).astype(np.float32)
            total = probs if total is None else total + probs
        mean = total / len(predictors)
        if not fold_disagreement:
            return mean
        ensemble = mean.argmax(-1)
        differ = sum((lab != ensemble).astype(np.float32) for lab in labels) / len(predictors)
        return np.concatenate([mean, differ[..., None]], axis=-1)

    return predict


def load_models(specs: tp.Sequence[str], *, tracking_uri: tp.Optional[str] = None) -> tuple[list, str]:
    """Every model of an ensemble (each checked as :func:`load_model` does); returns (models, identity string).

    A registered version with several fold models (``models:/<name>/<version>``) adds all of them, in fold order."""
    if not specs:
        raise PredictError("MODEL: give at least one model")
    if len(set(specs)) != len(specs):
        dup = sorted({s for s in specs if list(specs).count(s) > 1})
        raise PredictError(f"MODEL: {dup[0]} is given more than once (an ensemble averages distinct models)")
    loaded = [load_model(spec, tracking_uri=tracking_uri) for spec in specs]
    models = [x for m, _ in loaded for x in (m if isinstance(m, list) else [m])]
    ids = [i for _, i in loaded]
    return models, ids[0] if len(ids) == 1 else "ensemble(" + ",".join(ids) + ")"


def default_work_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".planes")


def parse_size(text: str) -> int:
    """``20G``, ``512M``, ``1.5T`` or plain bytes → bytes (powers of 1024)."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise PredictError(f"--max-disk: {text!r} is not a size (e.g. 20G, 512M, or bytes)") from None
    if value <= 0:
        raise PredictError(f"--max-disk: must be positive, got {text!r}")
    return int(value * scale)


def check_inputs(volume: VolumeRef, out: Path, *, planes: tp.Sequence[str], overwrite: bool, probabilities: bool,
                 tiff: tp.Optional[Path], work_dir: Path, check_out: bool = True, scan_values: bool = True,
                 uncertainty: bool = False, max_disk: tp.Optional[int] = None, plane_files: bool = True) -> Source:
    """All input checks that need no model: OUT, the volume's values, free disk. Returns the source.

    ``scan_values=False`` reads only the shape: for the fuse step (it never reads the volume) and for
    tasks whose volumes the submitting process has already scanned. ``plane_files=False``: the prediction may
    run in memory (model.resident), so only the outputs' disk is checked here (:func:`check_plane_disk` later).
    """
    for target, opt in ((out, "--out"), (tiff, "--tiff"), (work_dir, "--work-dir")):
        if target is None or (opt != "--work-dir" and not check_out):
            continue
        blocked = next((p for p in Path(target).absolute().parents if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise PredictError(f"{opt}: {target}: {blocked} is a file, not a folder")
    if Path(work_dir).exists() and not Path(work_dir).is_dir():
        raise PredictError(f"--work-dir: {work_dir} is an existing file, not a folder")
    if check_out:
        for target, opt in ((out, "--out"), (tiff, "--tiff")):
            if target is not None and Path(target).is_dir() and not (opt == "--out" and is_zarr_path(target)):
                raise PredictError(f"{opt}: {target} is a directory; give a file name (--overwrite replaces files only)")
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
    need = estimate_disk_bytes(source.shape, planes, probabilities=probabilities, tiff=tiff is not None,
                               uncertainty=uncertainty)
    if max_disk is not None:  # the user's bound replaces the uncompressed upper bound
        check_disk(work_dir, max_disk, f"--max-disk {max_disk / 2**30:.2f} GiB (output, plane and temporary files)")
        return source
    if check_out:
        check_disk(Path(out).parent, need["output"], f"the output {out}")
    if plane_files:
        check_plane_disk(work_dir, source, planes)
    return source


def check_plane_disk(work_dir: Path, source: Source, planes: tp.Sequence[str]) -> None:
    """Free disk for the plane files still to write (those of a restart are kept) and one plane's temporaries."""
    need = estimate_disk_bytes(source.shape, planes)
    done = sum(plane_path(work_dir, p).stat().st_size for p in planes if plane_path(work_dir, p).is_file())
    check_disk(work_dir, max(0, need["planes"] - done) + need["temporary"], f"the plane files in {work_dir}")


def check_disk_as_written(work_dir: Path, written: tp.Sequence[Path], remaining: tp.Sequence[str], shape,
                          max_disk: tp.Optional[int]) -> None:
    """Before the next plane: the remaining planes need as much as the largest plane file so far (they
    hold the same probabilities, compressed alike), plus the temporary rotated files; with ``--max-disk``
    what is written already counts against that bound."""
    if not written or not remaining:
        return
    sizes = [p.stat().st_size for p in written if p.is_file()]
    need = max(sizes, default=0) * len(remaining) + estimate_disk_bytes(shape, remaining)["temporary"]
    if max_disk is not None and sum(sizes) + need > max_disk:
        raise PredictError(f"--max-disk: {sum(sizes) / 2**30:.2f} GiB written, the {len(remaining)} remaining planes "
                           f"need ~{need / 2**30:.2f} GiB more, over {max_disk / 2**30:.2f} GiB; the plane files "
                           f"in {work_dir} are kept, a rerun with a larger --max-disk resumes")
    check_disk(work_dir, need, f"the remaining {len(remaining)} plane files in {work_dir} (from the sizes written)")


def plane_path(work_dir: Path, plane: str) -> Path:
    return Path(work_dir) / f"{plane}.h5"


def _files_only(only_plane, fuse_only: bool, keep_planes: bool, max_disk) -> tp.Optional[str]:
    """Why a prediction must go through plane files (model.resident's in-memory paths write none), or None."""
    if only_plane:
        return "--plane (one plane task of a cluster array)"
    if fuse_only:
        return "--fuse-only"
    if keep_planes:
        return "--keep-planes"
    if max_disk is not None:
        return "--max-disk (it bounds the plane files)"
    return None


def run_prediction(model_spec: tp.Union[str, tp.Sequence[str]], volume: VolumeRef, out: Path, *, planes: str = "3",
                   vote: str = "soft",
                   probabilities: bool = False, tiff: tp.Optional[Path] = None, overwrite: bool = False,
                   work_dir: tp.Optional[Path] = None, keep_planes: bool = False,
                   batch_size: tp.Union[int, str, None] = "auto",
                   tracking_uri: tp.Optional[str] = None, only_plane: tp.Optional[str] = None,
                   fuse_only: bool = False, progress: bool = True, model: tp.Optional[tuple] = None,
                   values_checked: bool = False, uncertainty: bool = False, workers: tp.Optional[int] = None,
                   rotate_on: str = "auto", max_disk: tp.Optional[int] = None, times=None,
                   fold_vote: str = "soft", voxel_size_um: tp.Optional[float] = None, fuse_on: str = "auto",
                   precision: str = "auto", extra_outputs: tp.Sequence[tuple[Path, bool]] = (),
                   info: tp.Optional[dict] = None) -> Path:
    """The whole CLI as a function; returns OUT (or the plane file with ``only_plane``).

    ``model_spec``: one model, or several (the fold models: an ensemble, :func:`ensemble_predictor`);
    ``model``: an already loaded (model, identity) from :func:`load_model`; ``values_checked``: the
    volume's values were scanned by the caller (``python -m sweep.predict`` checks all volumes first).
    ``fuse_on``: ``auto`` | ``device`` | ``host`` | ``files`` (model.resident); ``batch_size`` ``auto``: the
    largest that fits; ``precision`` ``auto``: the training's on an accelerator, float32 on a CPU.
    ``extra_outputs``: (path, probabilities) of further outputs of the same fused volume (an OME-Zarr beside the
    HDF5), with the same maps. ``info`` (a dict) receives the plan (:class:`model.resident.Plan`).
    """
    from model.resident import FuseOnError, check_fuse_on, plan_prediction

    specs = [model_spec] if isinstance(model_spec, str) else list(model_spec)
    names = plane_set(planes)
    if vote not in VOTES:
        raise PredictError(f"--vote: must be one of {VOTES}, got {vote!r}")
    if fold_vote not in FOLD_VOTES:
        raise PredictError(f"--fold-vote: must be one of {FOLD_VOTES}, got {fold_vote!r}")
    if precision not in PRECISIONS:
        raise PredictError(f"--precision: must be one of {PRECISIONS}, got {precision!r}")
    batch = parse_batch_size(batch_size)
    if only_plane is not None and only_plane not in names:
        raise PredictError(f"--plane: {only_plane!r} is not one of the planes of --planes {planes}: {list(names)}")
    files_only = _files_only(only_plane, fuse_only, keep_planes, max_disk)
    try:
        check_fuse_on(fuse_on, files_only)
    except FuseOnError as exc:
        raise PredictError(str(exc)) from None
    out = Path(out)
    work_dir = Path(work_dir) if work_dir else default_work_dir(out)
    if rotate_on not in ROTATE_ON:
        raise PredictError(f"--rotate-on: must be one of {ROTATE_ON}, got {rotate_on!r}")
    if workers is not None and workers < 1:
        raise PredictError(f"--workers: must be at least 1, got {workers}")
    if tiff is not None and is_zarr_path(tiff):
        raise PredictError(f"--tiff: {tiff} ends in .zarr; give the Zarr store as --out")
    if voxel_size_um is not None and not 0 < voxel_size_um < float("inf"):
        raise PredictError(f"--voxel-size: must be a positive number of micrometres, got {voxel_size_um}")
    zarr_wanted = is_zarr_path(out) or any(is_zarr_path(p) for p, _ in extra_outputs)
    if voxel_size_um is None:  # the input's own metadata; an OME-Zarr store cannot be written without it
        voxel_size_um = input_voxel_size_um(volume, required=zarr_wanted)
    if voxel_size_um is None and zarr_wanted and volume.path.exists():
        raise PredictError(f"--voxel-size: {volume} carries no voxel size (attribute voxel_size_um or OME-Zarr "
                           f"scale); give --voxel-size UM for the OME-Zarr output {out}")
    maybe_in_memory = files_only is None and fuse_on != "files"
    source = check_inputs(volume, out, planes=[only_plane] if only_plane else names, overwrite=overwrite,
                          probabilities=probabilities, tiff=tiff, work_dir=work_dir, check_out=only_plane is None,
                          scan_values=not (values_checked or fuse_only), uncertainty=uncertainty, max_disk=max_disk,
                          plane_files=not maybe_in_memory)
    for extra, _ in extra_outputs:
        if Path(extra).exists() and not overwrite:
            raise PredictError(f"{extra} exists; give --overwrite to replace it")
    workers = workers or available_cores()
    n_models = len(specs)  # the fuse-only step of a cluster job does not load them; a models:/ version may hold several
    meta = {"source": str(volume), "planes_set": planes,
            **({"models": [str(m) for m in specs]} if specs and any(specs) else {})}
    if not fuse_only:
        if model is not None:  # (model, id) of load_model or (models, id) of load_models
            models, model_id = (list(model[0]) if isinstance(model[0], (list, tuple)) else [model[0]]), model[1]
        else:
            models, model_id = load_models(specs, tracking_uri=tracking_uri)
        fold_maps = uncertainty and len(models) > 1
        n_models = len(models)
        if n_models > 1:
            meta["fold_vote"] = fold_vote
        models, chosen_precision = _in_precision(models, precision)
        try:
            plan = plan_prediction(fuse_on, source.shape, [only_plane] if only_plane else names, models, vote=vote,
                                   uncertainty=uncertainty, fold_disagreement=fold_maps, batch_size=batch,
                                   precision=chosen_precision, files_only=files_only)
        except FuseOnError as exc:
            raise PredictError(str(exc)) from None
        log.info("%s", plan.describe())
        if info is not None:
            info.update(plan.as_dict())
        todo = [only_plane] if only_plane else list(names)
        rotation = make_rotation(rotate_on, workers) if any(PLANES[n].rotated for n in todo) else None
        try:
            if plan.fuse_on in ("host", "device"):
                _predict_in_memory(plan, source, names, models, out=out, vote=vote, uncertainty=uncertainty,
                                   fold_vote=fold_vote, fold_maps=fold_maps, probabilities=probabilities, tiff=tiff,
                                   extra_outputs=extra_outputs, meta=meta, rotation=rotation, workers=workers,
                                   times=times, progress=progress, voxel_size_um=voxel_size_um)
                return out
            if maybe_in_memory:  # the disk check that check_inputs left for now
                check_plane_disk(work_dir, source, names)
            predictor = models_predictor(models, batch_size=plan.batch_size, fold_vote=fold_vote,
                                         fold_disagreement=fold_maps)
            if len(models) > 1 and fold_vote != "soft":  # plane files of another fold vote are not reused
                model_id = f"{model_id}|fold_vote={fold_vote}"
            for i, name in enumerate(todo):
                check_disk_as_written(work_dir, [plane_path(work_dir, n) for n in todo[:i]], todo[i:], source.shape,
                                      max_disk)
                predict_plane(source, name, predictor, plane_path(work_dir, name), model_id=model_id,
                              batch_size=plan.batch_size, tmp_dir=work_dir, progress=progress, rotation=rotation,
                              workers=workers, times=times, fold_disagreement=fold_maps)
        finally:
            if rotation is not None:
                rotation.close()
        if only_plane:
            return plane_path(work_dir, only_plane)
    elif info is not None:
        info.update({"fuse_on": "files", "why": "--fuse-only"})
    paths = [plane_path(work_dir, n) for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PredictError(f"--work-dir: plane files missing for the fuse step: {missing}")
    if n_models > 1:
        meta["fold_vote"] = fold_vote
    for target, probs, tif in [(out, probabilities, tiff)] + [(Path(p), pr, None) for p, pr in extra_outputs]:
        fuse_planes(paths, target, method=vote, probabilities=probs, tiff_path=tif, inputs=[volume.path],
                    attrs={**meta, "fuse_on": "files"}, progress=progress, uncertainty=uncertainty,
                    times=times, image=volume, voxel_size_um=voxel_size_um)
    if not keep_planes:
        for p in paths:
            p.unlink(missing_ok=True)
        if work_dir == default_work_dir(out) and work_dir.is_dir() and not any(work_dir.iterdir()):
            work_dir.rmdir()
    return out


def parse_batch_size(value: tp.Union[int, str, None]) -> tp.Optional[int]:
    """``auto`` (or None): from memory (model.resident.auto_batch_size); else a positive number of slices."""
    if value is None or str(value) == "auto":
        return None
    try:
        b = int(value)
    except (TypeError, ValueError):
        raise PredictError(f"--batch-size: must be a positive integer or auto, got {value!r}") from None
    if b < 1:
        raise PredictError(f"--batch-size: must be at least 1, got {value!r}")
    return b


def _in_precision(models: tp.Sequence, precision: str) -> tuple[list, str]:
    """The models computing in ``precision`` (``auto``: model.unet.inference_precision) and that policy."""
    from model.rotate import device_has_accelerator
    from model.unet import inference_precision, with_precision

    chosen = inference_precision(precision, models[0], device_has_accelerator())
    return [with_precision(m, chosen) for m in models], chosen


def _predict_in_memory(plan, source: Source, names: tp.Sequence[str], models: tp.Sequence, *, out: Path, vote: str,
                       uncertainty: bool, fold_vote: str, fold_maps: bool, probabilities: bool, tiff: tp.Optional[Path],
                       extra_outputs: tp.Sequence[tuple[Path, bool]], meta: dict, rotation, workers: int, times,
                       progress: bool, voxel_size_um: tp.Optional[float]) -> None:
    """model.resident's host or device path, then every output written from its accumulator."""
    from model.resident import predict_on_host, write_outputs
    from model.unet import infer_depth

    if plan.fuse_on == "device":
        from model.resident_device import predict_on_device

        acc = predict_on_device(source.ref, source.shape, names, models, depth=infer_depth(models[0]), vote=vote,
                                uncertainty=uncertainty, fold_vote=fold_vote, fold_disagreement=fold_maps,
                                batch_size=plan.batch_size, times=times, progress=progress, rotation=rotation)
    else:
        predictor = models_predictor(models, batch_size=plan.batch_size, fold_vote=fold_vote,
                                     fold_disagreement=fold_maps)
        acc = predict_on_host(source.ref, source.shape, names, predictor, vote=vote, uncertainty=uncertainty,
                              fold_disagreement=fold_maps, batch_size=plan.batch_size, rotation=rotation,
                              workers=workers, times=times, progress=progress)
    outputs = [(out, probabilities, tiff)] + [(Path(p), pr, None) for p, pr in extra_outputs]
    write_outputs(acc, outputs, vote=vote, uncertainty=uncertainty, shape=source.shape, inputs=[source.ref.path],
                  meta={"vote": vote, "planes": list(names), **meta, "fuse_on": plan.fuse_on}, image=source.ref,
                  voxel_size_um=voxel_size_um, times=times, progress=progress)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m model.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", metavar="MODEL", nargs="+",
                    help=".keras file, runs:/<run id>/model or models:/<name>/<version|@alias>; several (e.g. the 4 "
                         "fold models, or a registered version holding them): one ensemble")
    ap.add_argument("volume", metavar="VOLUME", help="HDF5 file or Zarr store (see --dataset) or folder of TIFF slices")
    ap.add_argument("--dataset", default="image", help="HDF5 dataset / Zarr array of VOLUME (default: image)")
    ap.add_argument("--planes", default="3", choices=list(PLANE_SETS), help="slicing planes (default: 3)")
    ap.add_argument("--vote", default="soft", choices=VOTES, help="soft (Eq. 4) or majority (Eq. 5) voting")
    ap.add_argument("--fold-vote", default="soft", choices=FOLD_VOTES,
                    help="several MODELs: average their probabilities (soft) or their labels' votes (majority)")
    ap.add_argument("--out", required=True, type=Path,
                    help="output HDF5 file (dataset labels), or OME-Zarr store NAME.zarr (labels pyramid)")
    ap.add_argument("--voxel-size", type=float, default=None, metavar="UM",
                    help="voxel edge in micrometres (default: VOLUME's voxel_size_um attribute or OME-Zarr scale); "
                         "an OME-Zarr OUT needs it")
    ap.add_argument("--probabilities", action="store_true", help="also write probabilities (float16, classes last)")
    ap.add_argument("--uncertainty", action="store_true",
                    help="also write uint8 maps: confidence (soft-vote probability of the label), disagreement "
                         "(fraction of planes whose label differs), plane_classes (bit c: some plane says c)")
    ap.add_argument("--workers", type=int, default=None,
                    help="CPU threads for rotations and slab I/O (default: all cores of this process)")
    ap.add_argument("--rotate-on", default="auto", choices=ROTATE_ON,
                    help="where 45° rotations run: device (with the network), cpu (threads), auto (device if a GPU)")
    ap.add_argument("--max-disk", default=None,
                    help="disk this run may use (e.g. 20G) instead of the uncompressed upper bound")
    ap.add_argument("--tiff", type=Path, help="also write the labels as one multi-page TIFF (Fiji, Avizo, 3D Slicer)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT / --tiff")
    ap.add_argument("--work-dir", type=Path, help="per-plane files (default: OUT.planes/)")
    ap.add_argument("--keep-planes", action="store_true", help="keep the per-plane probability files")
    ap.add_argument("--batch-size", default="auto",
                    help="slices per forward pass (default auto: the largest the memory holds, at most 8 on a CPU)")
    ap.add_argument("--fuse-on", default="auto", choices=["auto", "device", "host", "files"],
                    help="where the planes are fused: device (GPU memory, end to end), host (RAM), files (plane "
                         "files on disk); auto: the device if it holds the volume, else RAM, else files")
    ap.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                    help="inference dtype policy (default auto: the training's on a GPU, float32 on a CPU)")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="for runs:/ models")
    ap.add_argument("--plane", choices=list(PLANES), help="run this plane task only (cluster array task)")
    ap.add_argument("--fuse-only", action="store_true", help="only the fuse step, from the plane files")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # MLflow's default backs off for minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run_prediction(args.model, volume_ref(args.volume, args.dataset), args.out, planes=args.planes,
                                vote=args.vote, probabilities=args.probabilities, tiff=args.tiff,
                                overwrite=args.overwrite, work_dir=args.work_dir, keep_planes=args.keep_planes,
                                batch_size=args.batch_size, tracking_uri=args.tracking_uri, only_plane=args.plane,
                                fuse_only=args.fuse_only, progress=not args.no_progress,
                                uncertainty=args.uncertainty, workers=args.workers, rotate_on=args.rotate_on,
                                max_disk=None if args.max_disk is None else parse_size(args.max_disk),
                                fold_vote=args.fold_vote, voxel_size_um=args.voxel_size, fuse_on=args.fuse_on,
                                precision=args.precision)
    except (PredictError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
