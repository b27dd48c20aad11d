"""Full-slice inference of one model or a fold ensemble as ONE compiled function (paper: "test on the full slice").

Reflect padding to a multiple of 2^depth, every model over the same batch, softmax, the fold vote, the fold
disagreement channel and cropping run inside one ``jax.jit`` / ``tf.function``: the ensemble's models never
send their outputs back to the host between each other, and the Python dispatch of each layer is gone
(measured on the 2-core CPU, c0=32 d=3, 256² slices: 19–20 slices/s compiled against 10–13 eager).
Batches shorter than ``batch_size`` are padded to it, so each slice shape compiles once.
"""

from __future__ import annotations

import typing as tp

import numpy as np

FOLD_VOTES = ("soft", "majority")


def compile_for_backend(fn, static_argnames: tp.Sequence[str] = ()):
    """``fn`` (keras.ops on tensors, shapes static) compiled once per input shape and value of each of
    ``static_argnames`` (Python ints, keywords): ``jax.jit``, ``tf.function``, or ``fn`` itself under torch."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn, static_argnames=tuple(static_argnames))
    if backend != "tensorflow":
        return fn
    import tensorflow as tf

    compiled = tf.function(fn, autograph=False, reduce_retracing=False)
    # One trace per slice shape is the design (9 planes have up to 5 shapes, and a last shorter slab): TensorFlow's
    # "expensive retracing" warning would fill every log.
    compiled._omit_frequent_tracing_warning = True
    return compiled


def combine_ensemble(outputs: tp.Sequence, *, fold_vote: str = "soft", fold_disagreement: bool = False):
    """The fold models' logits → mean softmax probabilities (``soft``) or mean one-hot labels (``majority``),
    float32, with one more channel, the fraction of models whose label differs from the ensemble's, when
    ``fold_disagreement`` (paper Eq. 4/5 applied over folds; model.predict.ensemble_predictor's order of sums)."""
    import keras

    ops = keras.ops
    n = len(outputs)
    total, labels = None, []
    for logits in outputs:
        probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)
        labels.append(ops.argmax(probs, axis=-1))
        if fold_vote == "majority" and n > 1:
            probs = ops.cast(ops.one_hot(labels[-1], int(probs.shape[-1])), "float32")
        total = probs if total is None else total + probs
    mean = total / float(n) if n > 1 else total
    if not fold_disagreement:
        return mean
    ensemble = ops.argmax(mean, axis=-1)
    differ = None
    for lab in labels:
        d = ops.cast(ops.not_equal(lab, ensemble), "float32")
        differ = d if differ is None else differ + d
    return ops.concatenate([mean, ops.expand_dims(differ / float(n), -1)], axis=-1)


def quantize(probs, num_classes: int):
    """The class probabilities and the fold channel as the plane files hold them (model.fusion), on the device."""
    import keras

    from model.fusion import quantize_fraction, quantize_probabilities

    ops = keras.ops
    q = quantize_probabilities(probs[..., :num_classes], ops)
    if int(probs.shape[-1]) == num_classes:
        return q
    return ops.concatenate([q, quantize_fraction(probs[..., num_classes:], ops)], axis=-1)


# The last compiled forward and the models it calls. A caller that predicts scan after scan with the same loaded
# models (analysis.calibrate, a fusing job's test samples, sweep.predict) traces each slice shape once, not once per
# scan: ~2.3 s of tracing per 64³ scan and 9 planes for a 4-fold ensemble on the 2-core CPU (2026-12-07).
_LAST_FORWARD: dict[tuple, tuple[list, tp.Any]] = {}


def make_forward(models: tp.Sequence, *, depth: int, batch_size: int, fold_vote: str = "soft",
                 fold_disagreement: bool = False, quantized: bool = False):
    """(B, H, W) float32 slices (a tensor on the device) → (B, H, W, K [+1]) probabilities, one compiled function.

    ``quantized``: uint8 (255 = 1) instead of float32, so a device-resident prediction adds them as the plane
    files hold them. Models built under a multi-replica strategy are not supported (model.devices.replica_call)."""
    import keras

    from model.unet import crop_padding, pad_to_multiple

    if fold_vote not in FOLD_VOTES:
        raise ValueError(f"fold_vote must be one of {FOLD_VOTES}, got {fold_vote!r}")
    ops = keras.ops
    backend = keras.backend.backend()
    k = int(models[0].output_shape[-1])

    def body(x, call_models):
        xp, pads = pad_to_multiple(x[..., None], depth)
        y = combine_ensemble(call_models(xp), fold_vote=fold_vote, fold_disagreement=fold_disagreement)
        return crop_padding(quantize(y, k) if quantized else y, pads)

    key = (backend, tuple(id(m) for m in models), depth, fold_vote, fold_disagreement, quantized)
    # TensorFlow only: its trace reads the variables live; jax.jit below is handed the values of now.
    cached = _LAST_FORWARD.get(key) if backend == "tensorflow" else None
    if cached is not None:
        call = cached[1]
    elif backend == "jax":
        import jax

        states = [([v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables])
                  for m in models]

        @jax.jit
        def run(states, x):
            return body(x, lambda xp: [m.stateless_call(tv, ntv, xp, training=False)[0]
                                       for m, (tv, ntv) in zip(models, states)])

        def call(x):
            return run(states, x)
    elif backend == "tensorflow":
        call = compile_for_backend(lambda x: body(x, lambda xp: [m(xp, training=False) for m in models]))
    else:  # torch: no compilation, the same function eagerly
        def call(x):
            return body(x, lambda xp: [m(xp, training=False) for m in models])

    if cached is None and backend == "tensorflow":
        _LAST_FORWARD.clear()  # one set of models kept alive: memory stays that of one prediction
        _LAST_FORWARD[key] = (list(models), call)  # the models held: their ids cannot be reused while cached

    def forward(x):
        b = int(x.shape[0])
        if b < batch_size:  # one compilation per slice shape, not per batch size
            x = ops.concatenate([x, ops.zeros((batch_size - b,) + tuple(x.shape[1:]), x.dtype)], axis=0)
        y = call(x)
        return y[:b] if b < batch_size else y

    return forward


def compiled_predictor(models: tp.Sequence, *, depth: int, batch_size: int, fold_vote: str = "soft",
                       fold_disagreement: bool = False) -> tp.Callable[[np.ndarray], np.ndarray]:
    """A model.inference SlicePredictor (numpy (n, H, W) → float32 (n, H, W, K [+1])) over :func:`make_forward`:
    one host → device copy of each batch and one copy back of the ensemble's result."""
    import keras

    ops = keras.ops
    forward = make_forward(models, depth=depth, batch_size=batch_size, fold_vote=fold_vote,
                           fold_disagreement=fold_disagreement)

    def predict(slices: np.ndarray) -> np.ndarray:
        slices = np.asarray(slices, np.float32)
        # Every batch dispatched before the first is read back: on an asynchronous device (JAX, TF on a GPU) the
        # copies of one batch overlap the computation of the next.
        pending = [forward(ops.convert_to_tensor(slices[i:i + batch_size])) for i in range(0, slices.shape[0], batch_size)]
        return np.concatenate([ops.convert_to_numpy(y) for y in pending], axis=0).astype(np.float32, copy=False)

    return predict
