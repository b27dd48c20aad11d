"""Head-to-head with 2D nnU-Net v2 (issue 31): same data, same 4 folds, same test scans, the project's own IoU.

    .venv-compare/bin/python benchmarks/nnunet_compare.py --prepared DIR --work DIR --out result.json \\
        [--folds 0 1 2 3] (--budget-s S | --epochs N) [--dataset-id 501] [--n-proc-da 1]

Runs in its own venv (``pip install torch==2.13.0``, then ``pip install -e '.[compare]'``; docs in pyproject.toml);
the conversion alone needs only the project's venv (``convert_dataset``, used by tests/test_nnunet_compare.py):
torch and nnunetv2 are imported by the later stages only.

Stages, each skipped when already done (run the same command again to resume):

1. Convert a prepared dataset (``python -m data.prepare``) to nnU-Net's raw format under ``WORK/nnUNet_raw``:
   ``Dataset<id>_ScalingUNet/{imagesTr,labelsTr,imagesTs}`` as NIfTI-1 (written here, no nibabel needed) with the
   manifest's voxel size (mm), and ``dataset.json`` (SimpleITK reader; z-scored images by default: the prepared
   volumes are scaled per sample, so their grey values are not a fixed scale as CT's are). Training images carry
   the labels the project trains on, each training sample's ``label`` (WF, semi-automatic workflow labels, in the
   paper's and data.synth's datasets); the test scans (``split: test``) go to imagesTs only. ``splits_final.json``
   (raw and preprocessed folder): nnU-Net's folds 0..3 are the project's folds 0..3, from ``data.folds.split_fold``
   with ``--fold-seed`` (the project's ``data.fold_seed``, default 0).
2. ``nnUNetv2_plan_and_preprocess -c 2d`` (nnU-Net's own planning, fingerprint, preprocessing, integrity check).
3. ``nnUNetv2_train <id> 2d <fold> -tr nnUNetTrainerBudget -device cpu`` per fold: nnU-Net's trainer with a
   wall-time budget per fold (``--budget-s``) or an epoch count (``--epochs``), see
   benchmarks/nnunet_budget_trainer.py (copied into the nnunetv2 package, where ``-tr`` finds trainers). A fold is
   done when its ``checkpoint_final.pth`` and ``budget_stats.json`` exist.
4. Prediction of every test scan with nnU-Net's predictor (checkpoint_final, nnU-Net's defaults: Gaussian
   sliding window, step 0.5, mirroring): each fold alone, and the ensemble of all ``--folds`` (nnU-Net averages
   the folds' softmax, as ``nnUNetv2_predict -f 0 1 2 3``). nnU-Net's 2D configuration predicts slices along the
   first axis of its transposed volume (``transpose_forward`` in the JSON; [0, 1, 2] for isotropic voxels, i.e.
   the project's S_rc plane set, Table 2's "Baseline S_rc" row, no fusing).
5. Scoring as Table 2 does (sweep.jobs.fusing.predict_and_score): confusion matrices (model.evaluation) against
   each test scan's ``label``, the exact (HQ) labels, summed over the test scans, then IoU per class ×100 and the
   mean over bone, DL and RM; mean ± SE over the single folds. Training seconds, iterations, images seen
   (iterations × batch size) and prediction seconds per scan (nnU-Net's preprocessing, sliding window and
   conversion to labels, in this process; not the file read) go into ``--out`` (JSON, written atomically).

Threads: nnU-Net trains with torch on all cores (``-device cpu``) and ``--n-proc-da`` data-augmentation worker
processes (``nnUNet_n_proc_DA``; default 0 = in the training process, the fastest on 2 cores). torch.compile is
off (``nnUNet_compile=f``; nnU-Net never compiles on the CPU anyway). nnU-Net's validation of each fold's
validation cases after training is skipped unless ``--final-validation`` (it is not part of the comparison).
Whole volumes are read into memory (nnU-Net needs them whole too).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.atomic import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.folds import PAPER_NUM_FOLDS, split_fold  # noqa: E402
from data.manifest import Dataset, Sample, load_dataset  # noqa: E402
from data.volume import open_volume  # noqa: E402
from model.evaluation import CLASS_NAMES, FOREGROUND, confusion_matrix, iou_metrics, mean_and_standard_error  # noqa: E402

DATASET_NAME = "ScalingUNet"
CONFIGURATION = "2d"
PLANS = "nnUNetPlans"
TRAINER = "nnUNetTrainerBudget"
TRAINER_SOURCE = Path(__file__).with_name("nnunet_budget_trainer.py")
CHANNEL_NAMES = {"zscore": "SRmuCT", "CT": "CT"}  # an unknown channel name gets nnU-Net's z-score normalisation
CONVERSION_STAMP = "scaling_unet_conversion.json"
IOU_KEYS = tuple(f"iou_{CLASS_NAMES[c]}" for c in FOREGROUND) + ("mean_iou",)

# --------------------------------------------------------------------------------------------------- NIfTI-1
NIFTI_TYPES = {np.dtype(np.uint8): 2, np.dtype(np.int16): 4, np.dtype(np.int32): 8, np.dtype(np.float32): 16}
NIFTI_UNITS_MM = 2


def nifti_bytes(volume: np.ndarray, spacing_zyx_mm: tp.Sequence[float]) -> bytes:
    """A single-file NIfTI-1 image (header, 4 empty extension bytes, voxels) of a (z, y, x) C-order volume.

    NIfTI's first axis i varies fastest, so the C-order bytes of (z, y, x) are i = x, j = y, k = z: SimpleITK (and
    so nnU-Net's SimpleITKIO) reads the array back as (z, y, x) with spacing (z, y, x). qform and sform are the
    identity rotation scaled by the spacing, origin 0.
    """
    vol = np.ascontiguousarray(volume)
    if vol.ndim != 3 or vol.dtype not in NIFTI_TYPES:
        raise ValueError(f"need a 3D volume of {sorted(map(str, NIFTI_TYPES))}, got {vol.ndim}D {vol.dtype}")
    vol = vol.astype(vol.dtype.newbyteorder("<"), copy=False)
    sz, sy, sx = (float(s) for s in spacing_zyx_mm)
    nz, ny, nx = vol.shape
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)  # sizeof_hdr
    hdr[38] = ord("r")  # regular
    struct.pack_into("<8h", hdr, 40, 3, nx, ny, nz, 1, 1, 1, 1)  # dim
    struct.pack_into("<2h", hdr, 70, NIFTI_TYPES[vol.dtype], vol.dtype.itemsize * 8)  # datatype, bitpix
    struct.pack_into("<8f", hdr, 76, 1.0, sx, sy, sz, 0.0, 0.0, 0.0, 0.0)  # pixdim (pixdim[0] = qfac)
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<2f", hdr, 112, 0.0, 0.0)  # scl_slope 0: values are not scaled
    hdr[123] = NIFTI_UNITS_MM  # xyzt_units
    struct.pack_into("<80s", hdr, 148, b"scaling-unet benchmarks/nnunet_compare.py")  # descrip
    struct.pack_into("<2h", hdr, 252, 1, 1)  # qform_code, sform_code: scanner coordinates
    struct.pack_into("<6f", hdr, 256, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # quatern b, c, d (identity), qoffset
    struct.pack_into("<12f", hdr, 280, sx, 0, 0, 0, 0, sy, 0, 0, 0, 0, sz, 0)  # srow_x, srow_y, srow_z
    struct.pack_into("<4s", hdr, 344, b"n+1\x00")  # magic: header and data in one file
    assert len(hdr) == 348  # pack_into never resizes (slice assignment could)
    return bytes(hdr) + b"\x00\x00\x00\x00" + vol.tobytes()


def write_nifti_gz(path: Path, volume: np.ndarray, spacing_zyx_mm: tp.Sequence[float]) -> Path:
    """``path`` (.nii.gz) atomically; gzip level 1: the files are read once by nnU-Net's preprocessing."""
    with atomic_path(path, suffix=".nii.gz") as tmp:
        with gzip.open(tmp, "wb", compresslevel=1) as fh:
            fh.write(nifti_bytes(volume, spacing_zyx_mm))
    return path


# ---------------------------------------------------------------------------------------------- conversion
def dataset_folder_name(dataset_id: int) -> str:
    """nnU-Net's ``DatasetXXX_Name`` (three digits)."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"--dataset-id must be in 1..999, got {dataset_id}")
    return f"Dataset{dataset_id:03d}_{DATASET_NAME}"


def nnunet_roots(work: Path) -> dict[str, Path]:
    """nnU-Net's three folders (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) under ``work``."""
    return {"raw": work / "nnUNet_raw", "preprocessed": work / "nnUNet_preprocessed", "results": work / "nnUNet_results"}


def nnunet_dirs(work: Path, dataset_id: int) -> dict[str, Path]:
    """The three nnU-Net roots under ``work`` and this dataset's folders in them."""
    name = dataset_folder_name(dataset_id)
    roots = nnunet_roots(work)
    return {**roots, "raw_ds": roots["raw"] / name, "pre_ds": roots["preprocessed"] / name,
            "res_ds": roots["results"] / name / f"{TRAINER}__{PLANS}__{CONFIGURATION}"}


def check_case_id(sample_id: str) -> str:
    """nnU-Net builds file names from case ids: no path separators, no spaces."""
    if not sample_id or any(c in sample_id for c in "/\\ \t") or sample_id.startswith("."):
        raise DataError(None, "id", f"sample id {sample_id!r} cannot be an nnU-Net case id")
    return sample_id


def project_splits(dataset: Dataset, num_folds: int = PAPER_NUM_FOLDS, seed: int = 0) -> list[dict[str, list[str]]]:
    """splits_final.json content: fold k = the project's fold k (data.folds.split_fold), train/val case ids."""
    splits = []
    for fold in range(num_folds):
        train, val = split_fold(dataset, fold, num_folds, seed=seed)
        splits.append({"train": sorted(s.id for s in train), "val": sorted(s.id for s in val)})
    return splits


def spacing_mm(sample: Sample) -> tuple[float, float, float]:
    """The manifest's isotropic voxel size in mm (NIfTI's usual unit), per axis (z, y, x)."""
    return (sample.voxel_size_um / 1000.0,) * 3


def read_volume(ref) -> np.ndarray:
    """A whole volume from the prepared dataset."""
    with open_volume(ref) as vol:
        return np.asarray(vol[...])


def dataset_json(n_train: int, normalization: str) -> dict:
    """nnU-Net's dataset.json for the 4 classes of the project."""
    return {"channel_names": {"0": CHANNEL_NAMES[normalization]},
            "labels": {name: i for i, name in enumerate(CLASS_NAMES)},
            "numTraining": n_train, "file_ending": ".nii.gz",
            "overwrite_image_reader_writer": "SimpleITKIO",  # fixes the axis order nnU-Net reads: (z, y, x)
            "name": DATASET_NAME,
            "description": "scaling-unet prepared dataset (benchmarks/nnunet_compare.py): training samples with "
                           "their training labels, test scans in imagesTs only"}


def conversion_key(dataset: Dataset, fold_seed: int, num_folds: int, normalization: str) -> dict:
    """What a conversion depends on: the manifest's bytes, the fold assignment, the normalisation."""
    return {"manifest_sha256": hashlib.sha256(Path(dataset.manifest).read_bytes()).hexdigest(),
            "fold_seed": fold_seed, "num_folds": num_folds, "normalization": normalization}


def convert_dataset(prepared: tp.Union[str, Path], work: tp.Union[str, Path], *, dataset_id: int = 501,
                    fold_seed: int = 0, num_folds: int = PAPER_NUM_FOLDS, normalization: str = "zscore",
                    log: tp.Callable[[str], None] = print) -> dict:
    """Stage 1: the prepared dataset in nnU-Net's raw format plus splits_final.json; skipped when already done.

    Returns the conversion record (also ``raw_ds/scaling_unet_conversion.json``): case ids, folds, label kinds.
    Refuses a work folder that holds a conversion of another dataset (or other folds).
    """
    dataset = load_dataset(prepared)
    dirs = nnunet_dirs(Path(work).resolve(), dataset_id)
    key = conversion_key(dataset, fold_seed, num_folds, normalization)
    stamp = dirs["raw_ds"] / CONVERSION_STAMP
    if stamp.is_file():
        record = json.loads(stamp.read_text(encoding="utf-8"))
        if record.get("key") != key:
            raise DataError(stamp, "key", "this work folder holds a conversion of another dataset or other folds: "
                                          "use a new --work folder")
        log(f"conversion: done before ({len(record['train_ids'])} training cases, {len(record['test_ids'])} test)")
        _write_splits(dirs, record["splits"])  # planning may not have run yet: keep the preprocessed copy there
        return record
    train = [s for s in dataset.train]
    tests = [s for s in dataset.test if s.label is not None]
    for s in (*train, *tests):
        check_case_id(s.id)
    if not tests:
        raise DataError(dataset.manifest, "samples", "no test samples with labels to score nnU-Net on")
    splits = project_splits(dataset, num_folds, fold_seed)
    t0 = time.perf_counter()
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (dirs["raw_ds"] / sub).mkdir(parents=True, exist_ok=True)
    for s in train:
        write_nifti_gz(dirs["raw_ds"] / "imagesTr" / f"{s.id}_0000.nii.gz",
                       read_volume(s.image).astype(np.float32, copy=False), spacing_mm(s))
        write_nifti_gz(dirs["raw_ds"] / "labelsTr" / f"{s.id}.nii.gz",
                       read_volume(s.label).astype(np.uint8, copy=False), spacing_mm(s))
    for s in tests:
        write_nifti_gz(dirs["raw_ds"] / "imagesTs" / f"{s.id}_0000.nii.gz",
                       read_volume(s.image).astype(np.float32, copy=False), spacing_mm(s))
    atomic_write_json(dirs["raw_ds"] / "dataset.json", dataset_json(len(train), normalization), indent=1)
    _write_splits(dirs, splits)
    record = {"key": key, "dataset_folder": dirs["raw_ds"].name,
              "train_ids": [s.id for s in train], "test_ids": [s.id for s in tests],
              "train_label": "label (" + "/".join(sorted({s.label_quality for s in train})) + ")",
              "test_reference": "label (" + "/".join(sorted({s.label_quality for s in tests})) + ")",
              "voxel_size_um": sorted({s.voxel_size_um for s in (*train, *tests)}), "splits": splits}
    atomic_write_json(stamp, record, indent=1)  # last: a conversion without its stamp is redone
    log(f"conversion: {len(train)} training cases, {len(tests)} test scans in {time.perf_counter() - t0:.1f} s")
    return record


def _write_splits(dirs: dict[str, Path], splits: list[dict]) -> None:
    """splits_final.json in the raw folder (nnU-Net's planner copies it, checking it against an existing one)
    and in the preprocessed folder (where the trainer reads it)."""
    text = json.dumps(splits, indent=1)
    for folder in (dirs["raw_ds"], dirs["pre_ds"]):
        target = folder / "splits_final.json"
        if not target.is_file() or json.loads(target.read_text(encoding="utf-8")) != splits:
            atomic_write_text(target, text)


# --------------------------------------------------------------------------------------------- nnU-Net runs
def nnunet_env(work: Path, n_proc_da: int, extra: tp.Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment nnU-Net reads: its three folders, data-augmentation workers, no torch.compile."""
    env = dict(os.environ)
    roots = nnunet_roots(work)
    env.update({"nnUNet_raw": str(roots["raw"]), "nnUNet_preprocessed": str(roots["preprocessed"]),
                "nnUNet_results": str(roots["results"]), "nnUNet_n_proc_DA": str(n_proc_da),
                # worker pools of preprocessing and the final validation export: 1 on this 2-core machine
                "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"})
    env.update(extra or {})
    return env


def install_trainer() -> Path:
    """Copy the budget trainer into nnunetv2's trainer folder (idempotent): ``-tr`` looks only there (see
    benchmarks/nnunet_budget_trainer.py). Returns the installed file."""
    import nnunetv2

    target = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer" / TRAINER_SOURCE.name
    source = TRAINER_SOURCE.read_bytes()
    if not target.is_file() or target.read_bytes() != source:
        with atomic_path(target, suffix=".py") as tmp:
            tmp.write_bytes(source)
    return target


def nnunet_command(name: str) -> str:
    """nnU-Net's console script of this interpreter's venv."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise SystemExit(f"error: {name} not found beside {Path(sys.executable).name}: run this script with the "
                         f"venv that has the compare extra (.venv-compare/bin/python)")
    return str(path)


def run_logged(cmd: list[str], env: dict[str, str], log_file: Path) -> float:
    """Run ``cmd``, its output into ``log_file``; seconds; SystemExit naming the log on failure."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise SystemExit(f"error: {Path(cmd[0]).name} failed (exit {rc}); log {log_file}:\n" + "\n".join(tail))
    return seconds


def preprocessed_done(dirs: dict[str, Path], train_ids: tp.Sequence[str]) -> bool:
    """Plans written and every training case preprocessed for the 2d configuration."""
    plans = dirs["pre_ds"] / f"{PLANS}.json"
    if not plans.is_file():
        return False
    ident = json.loads(plans.read_text())["configurations"][CONFIGURATION]["data_identifier"]
    folder = dirs["pre_ds"] / ident
    return folder.is_dir() and all((folder / f"{i}.pkl").is_file() for i in train_ids)


def plan_and_preprocess(work: Path, dataset_id: int, record: dict, n_proc_da: int,
                        log: tp.Callable[[str], None]) -> tp.Optional[float]:
    """Stage 2: nnU-Net's planning and 2d preprocessing (with its dataset integrity check); seconds (None if done
    before)."""
    dirs = nnunet_dirs(work, dataset_id)
    seconds: tp.Optional[float] = None
    if preprocessed_done(dirs, record["train_ids"]):
        log("plan and preprocess: done before")
    else:
        cmd = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", CONFIGURATION,
               "-np", "1", "-npfp", "1", "--verify_dataset_integrity"]
        # the planner sets torch's threads to nnUNet_n_proc_DA: 0 (in-process augmentation) is refused there
        seconds = run_logged(cmd, nnunet_env(work, max(1, n_proc_da)), work / "logs" / "plan_and_preprocess.log")
        log(f"plan and preprocess: {seconds:.1f} s")
    on_disk = json.loads((dirs["pre_ds"] / "splits_final.json").read_text())
    if on_disk[:len(record["splits"])] != record["splits"]:
        raise SystemExit(f"error: {dirs['pre_ds'] / 'splits_final.json'} differs from the project's folds")
    return seconds


def plan_summary(work: Path, dataset_id: int) -> dict:
    """What nnU-Net planned for 2d: patch size, batch size, network stages, features, normalisation."""
    plans = json.loads((nnunet_dirs(work, dataset_id)["pre_ds"] / f"{PLANS}.json").read_text())
    cfg = plans["configurations"][CONFIGURATION]
    arch = cfg["architecture"]["arch_kwargs"]
    return {"patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"], "spacing": cfg["spacing"],
            "network": cfg["architecture"]["network_class_name"], "n_stages": arch["n_stages"],
            "features_per_stage": arch["features_per_stage"], "strides": arch["strides"],
            "normalization": cfg["normalization_schemes"], "transpose_forward": plans["transpose_forward"],
            "median_image_size": cfg.get("median_image_size_in_voxels")}


def fold_dir(work: Path, dataset_id: int, fold: int) -> Path:
    return nnunet_dirs(work, dataset_id)["res_ds"] / f"fold_{fold}"


def train_fold(work: Path, dataset_id: int, fold: int, budget: dict[str, tp.Any], n_proc_da: int,
               log: tp.Callable[[str], None], final_validation: bool = False, device: str = "cpu") -> dict:
    """Stage 3 for one fold: nnUNetv2_train with the budget trainer, unless its final checkpoint and stats exist
    (then they must be of the same budget). Returns the trainer's stats plus the command's wall seconds."""
    out = fold_dir(work, dataset_id, fold)
    stats_file = out / "budget_stats.json"
    want = {"mode": "budget", "budget_s": float(budget["budget_s"])} if budget.get("budget_s") else \
        {"mode": "epochs", "epochs_requested": int(budget["epochs"])}
    want["iterations_per_epoch"] = int(budget["iterations_per_epoch"])
    if (out / "checkpoint_final.pth").is_file() and stats_file.is_file():
        stats = json.loads(stats_file.read_text())
        if any(stats.get(k) != v for k, v in want.items()):
            raise SystemExit(f"error: fold {fold} in {out} was trained with another budget ({stats.get('mode')}, "
                             f"{stats.get('budget_s') or stats.get('epochs_requested')}): use a new --work folder")
        log(f"fold {fold}: trained before ({stats['iterations']} iterations, {stats['train_seconds']:.0f} s)")
        return stats
    # Both set (one empty), so a value left in the caller's environment cannot leak into the trainer.
    extra = {"NNC_BUDGET_S": str(budget["budget_s"]) if want["mode"] == "budget" else "",
             "NNC_EPOCHS": str(budget["epochs"]) if want["mode"] == "epochs" else "",
             "NNC_FINAL_VALIDATION": "1" if final_validation else "0",
             "NNC_ITERATIONS_PER_EPOCH": str(budget["iterations_per_epoch"])}
    cmd = [nnunet_command("nnUNetv2_train"), str(dataset_id), CONFIGURATION, str(fold), "-tr", TRAINER,
           "-device", device]
    log(f"fold {fold}: training ({want['mode']} {budget.get('budget_s') or budget.get('epochs')}) ...")
    wall = run_logged(cmd, nnunet_env(work, n_proc_da, extra), work / "logs" / f"train_fold{fold}.log")
    stats = json.loads(stats_file.read_text())
    stats["command_wall_seconds"] = round(wall, 1)  # + start-up, set-up (and --final-validation)
    atomic_write_json(stats_file, stats, indent=1)
    log(f"fold {fold}: {stats['iterations']} iterations × batch {stats['batch_size']} in {stats['train_seconds']:.0f} s "
        f"({stats['seconds_per_iteration']:.3f} s/iteration; command {wall:.0f} s)")
    return stats


# ---------------------------------------------------------------------------------------- prediction, scores
def predict_and_score(work: Path, dataset_id: int, folds: tp.Sequence[int], dataset: Dataset, test_ids: tp.Sequence[str],
                      log: tp.Callable[[str], None], device: str = "cpu") -> dict:
    """Stage 4/5 for one fold set: nnU-Net's predictor over the test scans, scored like Table 2 (confusion matrices
    summed over the scans, IoU ×100). Returns IoUs, per-scan IoUs and seconds."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # all cores, as nnUNetv2_predict -device cpu
    predictor = nnUNetPredictor(device=torch.device(device), perform_everything_on_device=device == "cuda", verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(nnunet_dirs(work, dataset_id)["res_ds"]), use_folds=tuple(folds),
                                                   checkpoint_name="checkpoint_final.pth")
    raw = nnunet_dirs(work, dataset_id)["raw_ds"] / "imagesTs"
    total = np.zeros((len(CLASS_NAMES),) * 2, np.int64)
    per_scan: dict[str, dict] = {}
    for sid in test_ids:
        image, props = SimpleITKIO().read_images([str(raw / f"{sid}_0000.nii.gz")])
        t0 = time.perf_counter()
        seg = predictor.predict_single_npy_array(image, props, None, None, False)
        seconds = time.perf_counter() - t0
        reference = read_volume(dataset.by_id(sid).label)
        if seg.shape != reference.shape:
            raise SystemExit(f"error: nnU-Net predicted shape {seg.shape} for {sid}, its label is {reference.shape}")
        cm = confusion_matrix(reference, seg, len(CLASS_NAMES))
        total += cm
        per_scan[sid] = {**x100(iou_metrics(cm)), "seconds": round(seconds, 2)}
    seconds = [v["seconds"] for v in per_scan.values()]
    result = {"folds": list(folds), **x100(iou_metrics(total)), "per_scan": per_scan,
              "predict_seconds_per_scan": round(float(np.mean(seconds)), 2), "confusion_matrix": total.tolist()}
    log(f"predict {'+'.join(map(str, folds))}: mean IoU {result['mean_iou']:.2f}, {result['predict_seconds_per_scan']:.1f} s/scan")
    return result


def x100(metrics: tp.Mapping[str, float]) -> dict[str, tp.Optional[float]]:
    """IoU ×100 as Table 2 gives them (4 decimals in the JSON, 2 in the printed table; NaN as null)."""
    return {k: (None if np.isnan(v) else round(100.0 * v, 4)) for k, v in metrics.items()}


def fold_summary(results: tp.Mapping[str, dict], folds: tp.Sequence[int]) -> dict[str, dict[str, float]]:
    """Mean ± SE over the single folds (model.evaluation.mean_and_standard_error), per IoU column."""
    out = {}
    for k in IOU_KEYS:
        vals = [results[f"fold{f}"][k] for f in folds if results[f"fold{f}"][k] is not None]
        if vals:
            mean, se = mean_and_standard_error(vals)
            out[k] = {"mean": round(mean, 4), "se": None if np.isnan(se) else round(se, 4)}
    return out


def table(doc: dict) -> str:
    """A small Markdown table of the JSON: one row per fold, the fold mean ± SE, the ensemble."""
    head = "| nnU-Net 2D | Bone | DL | RM | Average | train s | iterations | images | predict s/scan |"
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in doc["predictions"].items():
        tr = doc["training"].get(name.removeprefix("fold"), {}) if name.startswith("fold") else {}
        cells = [f"{res[k]:.2f}" if res[k] is not None else "–" for k in IOU_KEYS]
        train_s = f"{tr['train_seconds']:.0f}" if "train_seconds" in tr else ""
        rows.append(f"| {name} | {' | '.join(cells)} | {train_s} | {tr.get('iterations', '')} | "
                    f"{tr.get('images_seen', '')} | {res['predict_seconds_per_scan']} |")
    s = doc.get("single_folds_mean_se", {})
    if s:
        cells = [f"{s[k]['mean']:.2f} ± {s[k]['se']:.2f}" if s.get(k) and s[k]["se"] is not None else
                 (f"{s[k]['mean']:.2f}" if s.get(k) else "–") for k in IOU_KEYS]
        rows.append(f"| mean ± SE over folds | {' | '.join(cells)} | | | | |")
    return "\n".join(rows)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: tp.Optional[tp.Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks/nnunet_compare.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", required=True, type=Path, help="prepared dataset folder (python -m data.prepare)")
    ap.add_argument("--work", required=True, type=Path, help="nnU-Net's raw/preprocessed/results folders go here")
    ap.add_argument("--out", required=True, type=Path, help="result JSON (written atomically)")
    ap.add_argument("--folds", type=int, nargs="+", default=list(range(PAPER_NUM_FOLDS)))
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-s", type=float, help="training wall-time per fold, seconds (Table 2's config: ~220)")
    budget.add_argument("--epochs", type=int, help="nnU-Net epochs of 250 iterations per fold (no time limit)")
    ap.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id (default 501)")
    ap.add_argument("--fold-seed", type=int, default=0, help="the project's data.fold_seed (default 0)")
    ap.add_argument("--normalization", choices=sorted(CHANNEL_NAMES), default="zscore",
                    help="nnU-Net's image normalisation (channel name in dataset.json; default zscore)")
    ap.add_argument("--n-proc-da", type=int, default=0,
                    help="nnU-Net data-augmentation worker processes (nnUNet_n_proc_DA; default 0 = in the training "
                         "process: on 2 cores a worker made an iteration 1.6-7x slower, its augmentation is ~5 %% of it)")
    ap.add_argument("--iterations-per-epoch", type=int, default=250,
                    help="nnU-Net's training iterations per epoch (validation: 1/5 of it); smoke tests only (default 250)")
    ap.add_argument("--final-validation", action="store_true",
                    help="run nnU-Net's validation of each fold's validation cases after training (not scored here)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where nnU-Net trains and predicts (cuda: a GPU node with a CUDA build of torch)")
    ap.add_argument("--convert-only", action="store_true", help="stage 1 only (needs neither torch nor nnunetv2)")
    args = ap.parse_args(argv)
    if not set(args.folds) <= set(range(PAPER_NUM_FOLDS)) or len(set(args.folds)) != len(args.folds):
        ap.error(f"--folds must be distinct folds in 0..{PAPER_NUM_FOLDS - 1}")
    if (args.budget_s is not None and args.budget_s <= 0) or (args.epochs is not None and args.epochs < 1):
        ap.error("--budget-s must be > 0 and --epochs >= 1")
    if args.n_proc_da < 0 or args.iterations_per_epoch < 1:
        ap.error("--n-proc-da must be >= 0 and --iterations-per-epoch >= 1")
    return args


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    args = parse_args(argv)
    work = args.work.resolve()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        record = convert_dataset(args.prepared, work, dataset_id=args.dataset_id, fold_seed=args.fold_seed,
                                 normalization=args.normalization, log=log)
        dataset = load_dataset(args.prepared)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.convert_only:
        return 0
    # In this process too (the predictor, nnU-Net's module-level settings), before nnunetv2 is imported.
    os.environ.update({k: v for k, v in nnunet_env(work, args.n_proc_da).items() if k.startswith("nnUNet_")})
    import nnunetv2
    import torch

    trainer_file = install_trainer()
    log(f"trainer: {TRAINER} installed as nnunetv2/training/nnUNetTrainer/{trainer_file.name}")
    preprocess_s = plan_and_preprocess(work, args.dataset_id, record, args.n_proc_da, log)
    plans = plan_summary(work, args.dataset_id)
    log(f"nnU-Net 2d plan: patch {plans['patch_size']}, batch {plans['batch_size']}, {plans['n_stages']} stages "
        f"{plans['features_per_stage']}, normalisation {plans['normalization']}")
    budget = {"budget_s": args.budget_s, "epochs": args.epochs, "iterations_per_epoch": args.iterations_per_epoch}
    training = {str(f): train_fold(work, args.dataset_id, f, budget, args.n_proc_da, log, args.final_validation,
                                   args.device) for f in args.folds}
    predictions = {f"fold{f}": predict_and_score(work, args.dataset_id, [f], dataset, record["test_ids"], log,
                                                 args.device) for f in args.folds}
    if len(args.folds) > 1:
        predictions["ensemble"] = predict_and_score(work, args.dataset_id, args.folds, dataset, record["test_ids"], log,
                                                    args.device)
    doc = {
        "what": "2D nnU-Net v2 on the project's folds and test scans, IoU ×100 (model.evaluation) as in Table 2",
        "versions": {"nnunetv2": nnunetv2.__version__ if hasattr(nnunetv2, "__version__") else _dist_version("nnunetv2"),
                     "torch": torch.__version__},
        "prepared": str(args.prepared), "dataset_id": args.dataset_id,
        "budget": {"budget_s": args.budget_s, "epochs": args.epochs, "iterations_per_epoch": args.iterations_per_epoch,
                   "n_proc_da": args.n_proc_da, "final_validation": args.final_validation,
                   "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "train_ids": record["train_ids"], "test_ids": record["test_ids"],
        "train_label": record["train_label"], "test_reference": record["test_reference"],
        "splits": record["splits"], "normalization": args.normalization,
        "plans": plans, "preprocess_seconds": None if preprocess_s is None else round(preprocess_s, 1),
        "training": training, "predictions": predictions,
        "single_folds_mean_se": fold_summary(predictions, args.folds),
        "prediction_settings": {"checkpoint": "checkpoint_final.pth", "tile_step_size": 0.5, "gaussian": True,
                                "mirroring": True, "device": args.device},
    }
    atomic_write_json(args.out, doc, indent=1)
    print(table(doc))
    log(f"wrote {args.out}")
    return 0


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
