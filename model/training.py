"""One training run: one (width, depth, input size) config on one cross-validation fold.

Paper, Training section: Adam (lr 3e-4, β1 0.9, β2 0.999), cross-entropy, halve the learning rate
when the validation loss has not improved for 10^4 iterations, early stopping on the validation
loss, at most 1.5×10^6 iterations, global batch 32 (smaller models) or 16 (larger models),
automatic mixed precision, data parallel over the GPUs of one node.

Training advances in chunks of ``checkpoint_every`` iterations. After each chunk it validates,
updates the schedule and writes a checkpoint (model with optimizer state + ``state.json``)
atomically, so a run killed at any moment and started again resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import typing as tp
from pathlib import Path

import numpy as np

from data.atomic import atomic_path, atomic_write_json
from data.manifest import Sample
from data.pipeline import AugmentConfig, centre_crop, training_dataset
from data.slicing import iter_slices
from model.devices import check_batch, check_jit, training_devices
from model.evaluation import confusion_matrix, iou_metrics
from model.unet import build_unet

from model.schedule import (BEST_FILE, EXPORT_FILE, LEGACY_MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,  # noqa: F401
                            WEIGHTS_FILE, CheckpointError, ScheduleState, TrainSettings, checkpoint_files,
                            load_state, model_key, numbered_name, paper_batch_size, verify_checkpoint_file,
                            update_schedule)

log = logging.getLogger(__name__)


def save_weights(model, path: Path) -> None:
    """The model's variables only (Keras' ``save_weights`` adds the optimizer's), atomically."""
    from keras.src.saving import saving_lib

    optimizer = getattr(model, "optimizer", None)  # an uncompiled model has none
    with atomic_path(path, suffix=".weights.h5") as tmp:  # Keras requires the .weights.h5 ending
        saving_lib.save_weights_only(model, tmp, objects_to_skip=[optimizer] if optimizer else None)


def load_weights(model, path: Path) -> None:
    """Weights from a ``.weights.h5`` or ``.keras`` file into ``model``, its optimizer untouched (no second model)."""
    from keras.src.saving import saving_lib

    optimizer = getattr(model, "optimizer", None)
    saving_lib.load_weights_only(model, path, objects_to_skip=[optimizer] if optimizer else None)


def portable_model(model):
    """The model as every Keras backend loads it: BatchNormalization layers built ``synchronized`` (statistics over
    the global batch of several replicas, TensorFlow only) become plain ones with the same weights and moving
    statistics; inference never uses batch statistics, so the outputs are the same. ``model`` itself if none is."""
    import keras

    if not any(getattr(layer, "synchronized", False) for layer in model.layers):
        return model

    def clone(layer):
        cfg = layer.get_config()
        if cfg.get("synchronized"):
            cfg["synchronized"] = False
        return layer.__class__.from_config(cfg)

    out = keras.models.clone_model(model, clone_function=clone)
    out.set_weights(model.get_weights())
    return out


def export_model(model, path: Path) -> None:
    """Architecture and weights as a ``.keras`` file without the optimizer (what prediction loads), atomically, in
    the form every backend loads (:func:`portable_model`: JAX and torch refuse synchronized BatchNormalization)."""
    portable = portable_model(model)
    optimizer = getattr(portable, "optimizer", None)
    with atomic_path(path, suffix=".keras") as tmp:  # Keras requires the .keras ending
        try:
            portable.optimizer = None  # Keras saves a compiled model's optimizer state: 2x the weights for Adam
            portable.save(tmp)
        finally:
            portable.optimizer = optimizer


#: Tests set this to a function called with the name of each step of :func:`save_checkpoint` before it runs
#: ("weights", "optimizer", "best", "state", "cleanup"): raising there is a kill between two writes.
CHECKPOINT_HOOK: tp.Optional[tp.Callable[[str], None]] = None


def _step(name: str) -> None:
    if CHECKPOINT_HOOK is not None:
        CHECKPOINT_HOOK(name)


def _file_entry(path: Path) -> dict:
    import hashlib

    with open(path, "rb") as f:
        return {"name": path.name, "bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def save_checkpoint(model, state: ScheduleState, ckpt_dir: Path, *, best: bool = False) -> None:
    """One checkpoint as one atomic unit (model.schedule): the weights and optimizer variables (and, with ``best``,
    these weights as the best so far) under new numbered names, then state.json naming them with their digests,
    written last; then the files it no longer names are removed. A kill between any two steps resumes the previous
    checkpoint whole, never newer weights with older Adam moments or iteration count.

    Each tensor once: the weights file holds the model's variables, the optimizer file the optimizer's (Adam's
    moments, its iteration counter and, under mixed_float16, the loss scale: ``keras.models.load_model``
    3.15 does not restore a LossScaleOptimizer's state); a best checkpoint names the same weights file as best.
    """
    import keras

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    previous = json.loads((ckpt_dir / STATE_FILE).read_text()) if (ckpt_dir / STATE_FILE).is_file() else {}
    # The next number after every numbered file named; a best carried over from before has its fixed name.
    number = max([int(e["name"].split(".")[1]) for e in (previous.get("files") or {}).values()
                  if _is_numbered(e["name"])], default=0) + 1
    files = {}
    _step("weights")
    weights = ckpt_dir / numbered_name("weights", number)
    save_weights(model, weights)
    files["weights"] = _file_entry(weights)
    _step("optimizer")
    optimizer = ckpt_dir / numbered_name("optimizer", number)
    with atomic_path(optimizer) as tmp, open(tmp, "wb") as f:
        np.savez(f, *[keras.ops.convert_to_numpy(v) for v in model.optimizer.variables])
    files["optimizer"] = _file_entry(optimizer)
    if best:
        _step("best")
        files["best"] = files["weights"]  # the best weights are these: named twice, written once
    elif "best" in (previous.get("files") or {}):
        files["best"] = previous["files"]["best"]
    elif not previous.get("files") and (ckpt_dir / BEST_FILE).is_file():  # an older layout's best: carried over
        files["best"] = _file_entry(ckpt_dir / BEST_FILE)
    raw = dataclasses.asdict(state)
    raw["best_val_loss"] = None if math.isinf(state.best_val_loss) else state.best_val_loss
    raw["files"] = files
    _step("state")
    atomic_write_json(ckpt_dir / STATE_FILE, raw, indent=1)  # the commit point
    _step("cleanup")
    named = {e["name"] for e in files.values()}
    for path in ckpt_dir.iterdir():  # files of earlier (or half-written) checkpoints, and older layouts'
        if path.name not in named and (path.name in (WEIGHTS_FILE, OPTIMIZER_FILE, BEST_FILE, LEGACY_MODEL_FILE)
                                       or _is_numbered(path.name)):
            path.unlink(missing_ok=True)


def _is_numbered(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 3 and parts[0] in ("last", "optimizer", "best") and parts[1].isdigit()


def restore_checkpoint(model, ckpt_dir: Path) -> None:
    """Weights and optimizer variables of the committed checkpoint into ``model`` (built and compiled the same
    way), each file checked against the digest state.json recorded (model.schedule.CheckpointError if not)."""
    load_weights(model, verify_checkpoint_file(ckpt_dir, "weights"))
    path = verify_checkpoint_file(ckpt_dir, "optimizer")
    with np.load(path) as npz:
        values = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    variables = model.optimizer.variables
    if len(values) != len(variables) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
        raise ValueError(f"{path}: optimizer state of another model or precision ({len(values)} variables, "
                         f"this model has {len(variables)}); delete the checkpoint folder to start again")
    for variable, value in zip(variables, values):
        variable.assign(value)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def evaluate_slices(model, samples: tp.Sequence[Sample], *, depth: int, planes: tp.Sequence[str], step: int,
                    crop: tp.Optional[int], eval_batch: int = 8) -> dict[str, float]:
    """Cross-entropy and IoU (Eq. 6) over every ``step``-th slice of each plane; ``crop=None`` = full slices."""
    from model.unet import predict_full_slice

    cm = np.zeros((4, 4), np.int64)
    loss_sum, n_pix = 0.0, 0
    batch: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal loss_sum, n_pix
        imgs = np.stack([b[0] for b in batch]).astype(np.float32)
        labs = np.stack([b[1] for b in batch]).astype(np.int64)
        logits = predict_full_slice(model, imgs, depth, batch_size=len(batch))
        logp = _log_softmax(logits.astype(np.float64))
        loss_sum -= float(np.take_along_axis(logp, labs[..., None], -1).sum())
        n_pix += labs.size
        cm[...] += confusion_matrix(labs, logits.argmax(-1))
        batch.clear()

    # Slices of one plane share a shape: predict them in batches, not one model call per slice.
    for _, _, _, img, lab in iter_slices(samples, planes=planes, step=step):
        if crop is not None:
            img, lab = centre_crop(img, lab, crop)
        if batch and (img.shape != batch[0][0].shape or len(batch) == eval_batch):
            flush()
        batch.append((img, lab))
    if batch:
        flush()
    if n_pix == 0:
        raise ValueError("no validation slices: the validation fold is empty")
    return {"val_loss": loss_sum / n_pix, **iou_metrics(cm)}


def validation_is_final(samples: tp.Sequence[Sample], settings: TrainSettings) -> bool:
    """Whether a chunk's validation already is the final evaluation: the same slice step, and a crop that keeps every
    slice of the validation volumes whole (the laptop profile's 64² crop of 64³ volumes). A run whose last chunk set
    the best then skips the second, identical pass (0.49 s of a 30-iteration grid run on the 2-core CPU)."""
    if settings.final_slice_step != settings.val_slice_step:
        return False
    if settings.val_crop is None:
        return True
    from data.volume import open_volume

    for sample in samples:
        with open_volume(sample.image) as volume:
            if max(volume.shape) > settings.val_crop:  # orthogonal planes: each slice is two of these edges
                return False
    return True


def recalibrate_batch_norm(model, batches: tp.Iterable[tp.Any]) -> int:
    """Not in the paper: the BatchNormalization population statistics of the CURRENT weights ("precise BN",
    Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm").

    Keras keeps moving averages (momentum 0.99) that trail weights which change quickly: after 30
    steps 74 % of a moving average is still its initial value, and in short runs whole classes
    vanish from inference-mode predictions at some checkpoints while training-mode ones are right
    (measured: RM IoU 0.05 in inference mode vs 0.87 in training mode on the same slices). Each BN
    layer's moving mean and variance become the equal-weight average of its batch statistics over
    ``batches`` (training-mode forward passes, no weight update), so validation, the best checkpoint
    and prediction see what training optimised. Returns the number of batches used.
    """
    import keras
    import tensorflow as tf

    from model.devices import replica_call, replicas_of

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not bns:
        return 0
    saved = [layer.momentum for layer in bns]
    n, sums = 0, None
    try:
        for layer in bns:  # momentum 0: each forward pass leaves exactly its batch statistics
            layer.momentum = 0.0
        fn = getattr(model, "_bn_statistics_fn", None)
        if fn is None:  # traced once per model (momentum is a constant of the trace, always 0 here)
            if replicas_of(model) > 1:  # each batch spread over the replicas, statistics over the global batch
                def fn(x):
                    return replica_call(model, np.asarray(x), training=True)
            else:
                fn = tf.function(lambda x: model(x, training=True), reduce_retracing=True)
            model._bn_statistics_fn = fn
        for x in batches:
            fn(x)
            stats = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in bns]
            sums = stats if sums is None else [(m0 + m, v0 + v) for (m0, v0), (m, v) in zip(sums, stats)]
            n += 1
        if n:
            for layer, (m, v) in zip(bns, sums):
                layer.moving_mean.assign(m / n)
                layer.moving_variance.assign(v / n)
    finally:
        for layer, momentum in zip(bns, saved):
            layer.momentum = momentum
    return n


class ChunkCallback(tp.Protocol):
    def __call__(self, state: ScheduleState, metrics: dict[str, float]) -> None: ...


@dataclasses.dataclass(frozen=True)
class TrainResult:
    state: ScheduleState
    final_metrics: dict[str, float]
    model_path: Path
    compute_dtype: str  # read from the trained model's layers
    phases: dict[str, float]  # seconds of this process by phase: build, first_step, steps, validation, ...
    replicas: int = 1  # read from the trained model's strategy (num_replicas_in_sync)
    device_kind: str = "CPU"  # GPU, CPU or CPU stand-in (model.devices)


_SAVE_NOW: tp.Optional[tp.Callable[[], None]] = None
_LAST_MODEL: dict[tuple, tuple[tp.Any, list, list]] = {}


def set_precision(precision: str) -> None:
    """Paper: automatic mixed precision. ``float32``, ``mixed_float16`` (V100) or ``mixed_bfloat16`` (A100/H100).

    Must run after ``keras.backend.clear_session()``, which resets the global policy to float32; the model's
    build (:func:`_fresh_model`) sets it back to the caller's policy afterwards.
    """
    import keras

    keras.mixed_precision.set_global_policy(precision)


def compute_dtype(model) -> str:
    """The dtype the model's hidden convolutions compute in, read from the built layers (not the config).

    The 1×1 logits layer is float32 by design (model.unet) and left out; several dtypes are joined by ``,``.
    """
    import keras

    dtypes = {layer.dtype_policy.compute_dtype for layer in model.layers
              if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)) and layer.name != "logits"}
    return ",".join(sorted(dtypes)) or "none"


def global_batch_statistics(devices) -> bool:
    """Not in the paper: batch normalisation over the GLOBAL batch when several replicas train (synchronized BN).

    Per-replica statistics would make a run's result depend on how many GPUs it had (16 images split
    4 × 4 normalise differently from 16 on one device; measured: 4.6e-3 relative weight difference after
    3 steps vs 4.6e-6 with global statistics). The cost is three small all-reduces per BN layer and step.
    """
    return devices.replicas > 1


def _fresh_model(width: int, depth: int, settings: TrainSettings, devices):
    """A compiled U-net with freshly initialised weights and optimizer, built under ``devices.strategy``.

    Tracing the training step of a new Keras model costs seconds; a worker that trains the folds of
    one config back to back reuses the last model, reset to its initial weights and to the
    optimizer variables as freshly built: the same starting point as a new build with the same seed.
    It is reused only under the strategy it was built with (one per process, model.devices).
    The snapshot includes the loss scale of mixed_float16's LossScaleOptimizer; zeroing it instead
    would make every later loss NaN.
    """
    import keras

    key = model_key(width, depth, settings)
    cached = _LAST_MODEL.get(key)
    if cached is not None and cached[0].distribute_strategy is devices.strategy:
        model, weights, optimizer_state = cached
        model.set_weights(weights)
        for variable, value in zip(model.optimizer.variables, optimizer_state):
            variable.assign(value)
        model.optimizer.learning_rate.assign(settings.learning_rate)
        return model
    _LAST_MODEL.clear()  # keep one model: memory stays that of one run
    callers_policy = keras.mixed_precision.global_policy()
    # Before the strategy's scope, never inside it: clear_session resets the graph that holds the scope stack.
    keras.backend.clear_session()  # drop graphs of earlier models, or a long-lived worker keeps growing
    set_precision(settings.precision)
    try:
        # Only for a new build: setting TF's global seed invalidates traced functions (the next step of a
        # reused model would retrace, ~1.7 s). The data pipeline is seeded on its own (stateless ops).
        keras.utils.set_random_seed(settings.seed)
        with devices.strategy.scope():
            model = build_unet(width, depth, synchronized_bn=global_batch_statistics(devices))
            model.compile(optimizer=keras.optimizers.Adam(settings.learning_rate, settings.beta_1, settings.beta_2),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile=settings.jit_compile)
            model.optimizer.build(model.trainable_variables)
    finally:
        # The layers keep the precision they were built with; the caller's later models get its own policy.
        keras.mixed_precision.set_global_policy(callers_policy)
    if model.distribute_strategy.num_replicas_in_sync != devices.replicas:  # the silent single-device failure
        raise RuntimeError(f"the model was built for {model.distribute_strategy.num_replicas_in_sync} replica(s), "
                           f"not the {devices.replicas} of {devices.kind}")
    _LAST_MODEL[key] = (model, model.get_weights(), [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables])
    return model


def save_active_checkpoint() -> bool:
    """Write a checkpoint of the training running in this process, mid-chunk (preemption / time-out).

    Called from the launcher's signal handler (submitit's USR2 checkpoint hook) before the job is
    requeued; Python runs signal handlers between bytecodes: during a chunk's steps the weights are those
    of the steps counted (±1), and a checkpoint is written (eagerly, also when the signal lands while
    TensorFlow traces a function). After a chunk's steps, while it is validated and checkpointed, nothing
    is written: the last whole checkpoint stays and the resumed job trains that chunk again, so no
    validation point is skipped. Returns False when no training is running.
    """
    if _SAVE_NOW is None:
        return False
    _SAVE_NOW()
    return True


def train_fold(*, width: int, depth: int, input_size: int, train_samples: tp.Sequence[Sample],
               val_samples: tp.Sequence[Sample], settings: TrainSettings, augment: AugmentConfig, ckpt_dir: Path,
               on_chunk: tp.Optional[ChunkCallback] = None,
               on_start: tp.Optional[tp.Callable[[ScheduleState, tp.Any, tp.Any], None]] = None,
               on_first_step: tp.Optional[tp.Callable[[], None]] = None) -> TrainResult:
    """Train (or resume) one fold; returns the final full-slice validation metrics of the best model.

    ``on_start(state, model, devices)`` is called once the model is built or loaded, before the first step.
    """
    global _SAVE_NOW
    import keras
    import tensorflow as tf

    from model.validation import check_input_size

    check_input_size(input_size, depth)
    if not train_samples:
        raise ValueError("no training samples in this fold")
    if not val_samples:
        raise ValueError("no validation samples in this fold")
    ckpt_dir = Path(ckpt_dir)
    phases = dict.fromkeys(("build", "first_step", "steps", "validation", "checkpoint", "final_evaluation"), 0.0)
    t_phase = time.perf_counter()
    # Before anything is built: a job given GPUs that TensorFlow does not see stops here (model.devices).
    devices = training_devices(settings.cpu_replicas)
    check_batch(settings.batch_size, devices)
    check_jit(settings.jit_compile, devices.replicas)
    state = load_state(ckpt_dir)
    model = _fresh_model(width, depth, settings, devices)
    if state is None:
        state = ScheduleState(learning_rate=settings.learning_rate)
    else:
        state.resumed_from.append(state.iteration)
        with devices.strategy.scope():
            restore_checkpoint(model, ckpt_dir)
    phases["build"] = time.perf_counter() - t_phase
    if on_start is not None:
        on_start(state, model, devices)
    aug = dataclasses.replace(augment, input_size=input_size)
    steps_done = [0]  # steps of the current chunk, for mid-chunk checkpoints
    first_step = [on_first_step]
    first_step_end = [0.0]

    def step_end(batch, logs=None) -> None:
        steps_done[0] += 1
        if not first_step_end[0]:
            first_step_end[0] = time.perf_counter()  # tracing + pipeline start-up end with the first step
            if first_step[0] is not None:
                first_step[0]()

    count_steps = keras.callbacks.LambdaCallback(on_train_batch_end=step_end)

    # From the end of a chunk's steps until the next chunk's steps start (validation, the chunk's checkpoint, the
    # callbacks, the next dataset): the checkpoint on disk is then whole and the newest one to resume from.
    between_steps = [False]
    chunk_steps = [0]

    def save_mid_chunk() -> None:
        if between_steps[0] or (chunk_steps[0] and steps_done[0] >= chunk_steps[0]):  # (its last step counted)
            # A checkpoint here would record the chunk's end without its validation point, which the resumed job
            # would never make (it trains on from the chunk's end), or interleave with the chunk's own checkpoint
            # being written. The one on disk stays: the resumed job trains this chunk again (same seed) and validates.
            try:
                last = load_state(ckpt_dir)
            except (OSError, ValueError, TypeError):
                last = None
            log.warning("USR2 after the steps of the chunk ending at iteration %d: the resumed job starts from the "
                        "last whole checkpoint (%s)", state.iteration + steps_done[0],
                        f"iteration {last.iteration}" if last else "none: the run starts again")
            return
        # ±1 step: a signal can land between a step and its callback.
        partial = dataclasses.replace(state, iteration=state.iteration + steps_done[0],
                                      images_seen=state.images_seen + steps_done[0] * settings.batch_size,
                                      resumed_from=list(state.resumed_from), history=list(state.history))
        # The signal may land while TensorFlow traces a function (the first step, a dataset's map): save eagerly.
        with tf.init_scope():
            save_checkpoint(model, partial, ckpt_dir)

    _SAVE_NOW = save_mid_chunk
    last_validation: tp.Optional[tuple[int, dict[str, float]]] = None  # (iteration, metrics) when it set the best
    try:
        while not (state.finished or state.stopped_early) and state.iteration < settings.max_iters:
            # Chunks end on multiples of checkpoint_every, also after a mid-chunk (preemption) checkpoint.
            iters = min(settings.checkpoint_every - state.iteration % settings.checkpoint_every,
                        settings.max_iters - state.iteration)
            since_validation = state.iteration + iters - (state.history[-1]["iteration"] if state.history else 0)
            # Seeded by the starting iteration: an uninterrupted run and a resumed one are both reproducible.
            ds = training_dataset(train_samples, aug, batch_size=settings.batch_size,
                                  seed=settings.seed * 1_000_003 + state.iteration, planes=settings.planes,
                                  open_slabs=settings.open_slabs)
            ds = ds.map(lambda x, y: (x, tf.cast(y, tf.int32)))
            model.optimizer.learning_rate.assign(state.learning_rate)
            steps_done[0], chunk_steps[0] = 0, iters
            between_steps[0] = False
            t0 = time.perf_counter()
            hist = model.fit(ds, steps_per_epoch=iters, epochs=1, verbose=0, shuffle=False, callbacks=[count_steps])
            between_steps[0] = True
            dt = time.perf_counter() - t0
            if not phases["first_step"] and first_step_end[0]:
                phases["first_step"] = first_step_end[0] - t0
                phases["steps"] -= phases["first_step"]
            phases["steps"] += dt
            state.iteration += iters
            steps_done[0] = 0
            state.train_seconds += dt
            state.images_seen += iters * settings.batch_size
            t_phase = time.perf_counter()
            if settings.bn_recalibration_batches:
                recal = training_dataset(train_samples, aug, batch_size=settings.batch_size,
                                         seed=settings.seed * 1_000_003 + state.iteration + 7919,
                                         planes=settings.planes, open_slabs=settings.open_slabs)
                recalibrate_batch_norm(model, (x for x, _ in recal.take(settings.bn_recalibration_batches)))
            val = evaluate_slices(model, val_samples, depth=depth, planes=settings.planes,
                                  step=settings.val_slice_step, crop=settings.val_crop)
            phases["validation"] += time.perf_counter() - t_phase
            t_phase = time.perf_counter()
            improved = val["val_loss"] < state.best_val_loss
            metrics = {"train_loss": float(hist.history["loss"][-1]), "learning_rate": state.learning_rate,
                       "images_per_s": iters * settings.batch_size / dt, **val}
            update_schedule(state, val["val_loss"], since_validation, settings)
            # The time stamps the chunk's metrics, so a run that logs them late (a server outage) logs them as of now.
            state.history.append({"iteration": state.iteration, "time": time.time(), **metrics})
            state.wall_seconds += time.perf_counter() - t0
            last_validation = (state.iteration, val) if improved else None
            save_checkpoint(model, state, ckpt_dir, best=improved)
            phases["checkpoint"] += time.perf_counter() - t_phase
            if on_chunk is not None:
                on_chunk(state, metrics)
    finally:
        _SAVE_NOW = None
    t_phase = time.perf_counter()
    if last_validation is not None and last_validation[0] == state.iteration and \
            validation_is_final(val_samples, settings):
        final = dict(last_validation[1])  # these weights are the best, on these very slices: evaluated already
    else:
        if "best" in checkpoint_files(ckpt_dir):
            load_weights(model, verify_checkpoint_file(ckpt_dir, "best"))
        final = evaluate_slices(model, val_samples, depth=depth, planes=settings.planes,
                                step=settings.final_slice_step, crop=None)
    phases["final_evaluation"] = time.perf_counter() - t_phase
    t_phase = time.perf_counter()
    state.finished = True
    export_model(model, ckpt_dir / EXPORT_FILE)  # before state.json says finished
    save_checkpoint(model, state, ckpt_dir)
    phases["checkpoint"] += time.perf_counter() - t_phase
    return TrainResult(state, final, ckpt_dir / EXPORT_FILE, compute_dtype(model), phases, devices.replicas,
                       devices.kind)

