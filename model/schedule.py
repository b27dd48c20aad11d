"""The paper's training schedule as plain data (no TensorFlow): settings, batch size rule, resumable state.

Paper, Training section: Adam (lr 3e-4, β1 0.9, β2 0.999), halve the learning rate when the
validation loss has not improved for 10^4 iterations, early stopping on the validation loss, at
most 1.5×10^6 iterations, global batch 32 (smaller models) or 16 (larger models).
Kept apart from model.training so planning a sweep does not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing as tp
from pathlib import Path

# A checkpoint holds each tensor once: the weights, the optimizer's variables, the schedule state. The best
# weights (no optimizer) are kept beside it; the finished run's model (best weights, no optimizer) is EXPORT_FILE.
# It is ONE atomic unit: weights, optimizer and best are written under new numbered names (last.000007.weights.h5),
# then state.json names them with their sizes and SHA-256 digests (its key "files"), written last by an atomic
# rename; only then are the files it no longer names removed. A kill anywhere in between resumes the previous
# checkpoint whole. Checkpoints written before 2026-12-06 have the fixed names below and no "files".
STATE_FILE = "state.json"
WEIGHTS_FILE = "last.weights.h5"  # all model variables (BN statistics included), no optimizer
OPTIMIZER_FILE = "optimizer.npz"  # optimizer variables in order: Keras 3.15 does not restore a LossScaleOptimizer
BEST_FILE = "best.weights.h5"  # weights of the lowest validation loss, no optimizer
CHECKPOINT_ROLES = {"weights": WEIGHTS_FILE, "optimizer": OPTIMIZER_FILE, "best": BEST_FILE}
EXPORT_FILE = "model.keras"  # architecture + best weights, written when the run finishes (the MLflow artifact)
LEGACY_MODEL_FILE = "last.keras"  # checkpoints before 2026-12: model + optimizer; read on resume, then removed


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The schedule; defaults are the paper's (``early_stop_patience_iters`` is not given there)."""

    learning_rate: float = 3e-4
    beta_1: float = 0.9
    beta_2: float = 0.999
    lr_factor: float = 0.5
    lr_patience_iters: int = 10_000
    early_stop_patience_iters: int = 50_000
    max_iters: int = 1_500_000
    checkpoint_every: int = 1_000
    batch_size: int = 32
    precision: str = "float32"  # mixed_float16 on GPUs; 75–200× slower on CPU (platform facts)
    seed: int = 0
    val_crop: int = 992
    val_slice_step: int = 1
    final_slice_step: int = 1
    planes: tuple[str, ...] = ("rc", "cp", "pr")
    open_slabs: int = 8
    jit_compile: bool = False  # XLA: slower on CPU and costs seconds of compile per run (platform facts)
    bn_recalibration_batches: int = 0  # before each validation (not in the paper; model.training.recalibrate_batch_norm)
    cpu_replicas: tp.Optional[int] = None  # N logical CPU devices under MirroredStrategy, standing in for N GPUs

    def __post_init__(self) -> None:
        for name in ("lr_patience_iters", "early_stop_patience_iters", "max_iters", "checkpoint_every", "batch_size",
                     "val_slice_step", "final_slice_step", "val_crop"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"train.learning_rate must be positive, got {self.learning_rate}")
        if int(self.bn_recalibration_batches) < 0:
            raise ValueError(f"train.bn_recalibration_batches must be >= 0, got {self.bn_recalibration_batches}")
        if self.cpu_replicas is not None and (isinstance(self.cpu_replicas, bool) or int(self.cpu_replicas) < 1):
            raise ValueError(f"train.cpu_replicas must be null or a positive integer, got {self.cpu_replicas!r}")
        if self.precision not in ("float32", "mixed_float16", "mixed_bfloat16"):
            raise ValueError(f"train.precision must be float32, mixed_float16 or mixed_bfloat16, got {self.precision!r}")


def model_key(width: int, depth: int, settings: TrainSettings) -> tuple:
    """What makes two runs able to share one built, traced model (reset between them): not the input
    size, nor the learning rate or data. A local worker that trains runs with the same key back to back
    traces the training step once per key (twice across input sizes: Keras then relaxes the shape)."""
    return (width, depth, settings.precision, settings.beta_1, settings.beta_2, settings.jit_compile, settings.seed)


def paper_batch_size(flops_per_image: int, threshold_flops: float = 500e9) -> int:
    """Paper: global batch 32 for smaller models, 16 for larger ones.

    The paper does not give the boundary; we switch at 500 GFLOPs per image (forward), which puts
    e.g. (c0=64, d=5, 640²) and everything bigger at 16, so activations fit 4×32 GB V100s.
    """
    return 16 if flops_per_image > threshold_flops else 32


@dataclasses.dataclass
class ScheduleState:
    """Everything the schedule needs to continue exactly after a restart (saved in state.json)."""

    iteration: int = 0
    learning_rate: float = 3e-4
    best_val_loss: float = math.inf
    best_iteration: int = 0
    since_improvement: int = 0  # iterations without a new best validation loss
    since_lr_change: int = 0  # iterations without improvement since the last halving
    stopped_early: bool = False
    finished: bool = False
    train_seconds: float = 0.0  # optimizer steps only
    wall_seconds: float = 0.0  # optimizer steps and validation
    images_seen: int = 0
    resumed_from: list[int] = dataclasses.field(default_factory=list)
    history: list[dict] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. the MLflow run id, set by the caller


def update_schedule(state: ScheduleState, val_loss: float, iters: int, s: TrainSettings) -> bool:
    """Paper: halve the LR after ``lr_patience_iters`` without improvement; stop early after
    ``early_stop_patience_iters`` without improvement. Returns True if the LR changed."""
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.best_iteration = val_loss, state.iteration
        state.since_improvement = state.since_lr_change = 0
        return False
    state.since_improvement += iters
    state.since_lr_change += iters
    changed = False
    if state.since_lr_change >= s.lr_patience_iters:
        state.learning_rate *= s.lr_factor
        state.since_lr_change = 0
        changed = True
    if state.since_improvement >= s.early_stop_patience_iters:
        state.stopped_early = True
    return changed


class CheckpointError(ValueError):
    """A committed checkpoint whose files are missing or not the ones it names (names the file)."""


def numbered_name(role: str, number: int) -> str:
    """``last.000007.weights.h5``, ``optimizer.000007.npz``, ``best.000007.weights.h5``."""
    stem, _, suffix = CHECKPOINT_ROLES[role].partition(".")
    return f"{stem}.{number:06d}.{suffix}"


def checkpoint_files(ckpt_dir: Path) -> dict[str, Path]:
    """The files of the checkpoint that ``state.json`` commits, by role (weights, optimizer, best when there is
    one); a checkpoint without a manifest (before 2026-12-06) has the fixed names (or the legacy ``last.keras``)."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / STATE_FILE
    raw = json.loads(path.read_text()) if path.is_file() else {}
    if raw.get("files"):
        return {role: ckpt_dir / entry["name"] for role, entry in raw["files"].items()}
    out = {role: ckpt_dir / name for role, name in CHECKPOINT_ROLES.items()}
    if not out["weights"].is_file() and (ckpt_dir / LEGACY_MODEL_FILE).is_file():
        out["weights"] = ckpt_dir / LEGACY_MODEL_FILE
    if not out["best"].is_file():
        del out["best"]
    return out


def verify_checkpoint_file(ckpt_dir: Path, role: str) -> Path:
    """The committed file of ``role``, checked against the size and SHA-256 that state.json recorded for it."""
    import hashlib

    ckpt_dir = Path(ckpt_dir)
    raw = json.loads((ckpt_dir / STATE_FILE).read_text())
    path = checkpoint_files(ckpt_dir)[role]
    entry = (raw.get("files") or {}).get(role)
    if entry is None:  # an older checkpoint: nothing recorded to check against
        return path
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, but {ckpt_dir / STATE_FILE} commits it as the checkpoint's {role}; "
                              "the checkpoint folder was changed from outside (delete it to start again)")
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if path.stat().st_size != entry["bytes"] or digest != entry["sha256"]:
        raise CheckpointError(f"{path}: not the file {ckpt_dir / STATE_FILE} commits as the checkpoint's {role} "
                              f"(size or SHA-256 differ); delete the checkpoint folder to start again")
    return path


def load_state(ckpt_dir: Path) -> tp.Optional[ScheduleState]:
    """The schedule state of a complete checkpoint (weights and optimizer written), else None."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        return None
    files = checkpoint_files(ckpt_dir)
    raw = json.loads(path.read_text())
    if not raw.get("files") and not (files["weights"].is_file() and files["optimizer"].is_file()):
        return None  # an older layout's state without its files: nothing to resume
    raw.pop("files", None)
    raw["best_val_loss"] = math.inf if raw.get("best_val_loss") is None else raw["best_val_loss"]
    return ScheduleState(**raw)
