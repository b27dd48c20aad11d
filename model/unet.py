"""The paper's 2D U-net in pure Keras 3 (runs under the TensorFlow, JAX and torch backends).

Baltruschat et al. 2021, "Scaling the U-net", Model section:

* encoder: ``depth`` conv blocks with c_l = c0 * 2^l channels (l = 0..d-1), each followed by a
  2x2 max-pool; a conv block is two (3x3 conv -> BatchNorm -> Mish) layers;
* bottleneck: one conv block with c0 * 2^d channels;
* decoder, l = d-1..0: 2x2 stride-2 transposed conv to c_l channels (halving), concatenation with
  the encoder block l output (skip), conv block with c_l channels;
* a 1x1 conv to ``num_classes`` LOGITS (no softmax: train with ``from_logits=True``; softmax +
  sparse CE breaks torch's backward, see platform facts), kept in float32 so a
  ``mixed_float16`` policy still yields float32 logits.

"same" padding everywhere, channels-last. Every conv has a bias even when a BN follows (redundant
but it is what makes c0=96, d=5 have exactly 279,873,796 parameters, "about 280 million"); the
2x2 transposed convs and the 1x1 output conv have no BN. Kernels use He-normal initialisation
(the paper does not say; BN after every conv makes the choice uncritical).

Layer names follow :func:`model.complexity.conv_layers`, so per-layer parameter counts can be
compared by name. No TensorFlow import here.
"""

from __future__ import annotations

import typing as tp

import keras
import numpy as np

from model.validation import (
    PRECISIONS,
    check_depth,
    check_input_size,
    check_num_classes,
    check_positive_int,
    check_width,
)

__all__ = [
    "build_unet",
    "check_input_size",
    "pad_to_multiple",
    "crop_padding",
    "inference_call",
    "predict_full_slice",
    "infer_depth",
]

Pads = tp.Tuple[tp.Tuple[int, int], tp.Tuple[int, int]]
_KERNEL_INIT = "he_normal"


def _conv_block(x, filters: int, prefix: str, synchronized_bn: bool = False):
    for i in (1, 2):
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=True,
            kernel_initializer=_KERNEL_INIT,
            data_format="channels_last",
            name=f"{prefix}_conv{i}",
        )(x)
        x = keras.layers.BatchNormalization(axis=-1, synchronized=synchronized_bn, name=f"{prefix}_bn{i}")(x)
        x = keras.layers.Activation(keras.activations.mish, name=f"{prefix}_mish{i}")(x)
    return x


def _check_input_shape(input_shape: tp.Sequence[tp.Optional[int]], depth: int) -> tp.Tuple:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}") from None
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}")
    h, w, c = shape
    check_positive_int(c, "input_shape channels")
    m = 2**depth
    for name, v in (("height", h), ("width", w)):  # None stays dynamic (checked at call time)
        if v is not None:
            check_positive_int(v, f"input_shape {name}")
            if v % m:
                raise ValueError(
                    f"input_shape {name} {v} is not divisible by 2^depth={m} "
                    f"(the U-net max-pools {depth} times by 2); use a multiple of {m} or None"
                )
    return shape


def build_unet(
    width: int,
    depth: int,
    *,
    num_classes: int = 4,
    input_shape: tp.Sequence[tp.Optional[int]] = (None, None, 1),
    name: tp.Optional[str] = None,
    synchronized_bn: bool = False,
) -> keras.Model:
    """Build the U-net with width c0 = ``width`` and depth d = ``depth`` (paper, Model section).

    ``input_shape`` is (H, W, C) with H and W ``None`` (any multiple of 2^d at call time: train
    on IS x IS patches, predict on full slices padded with :func:`pad_to_multiple`) or fixed
    multiples of 2^d. Output: (batch, H, W, num_classes) float32 logits.
    ``synchronized_bn`` (TensorFlow backend only): batch statistics over the global batch of all replicas
    of a tf.distribute strategy, so data-parallel training computes what one device would
    (:func:`model.training.global_batch_statistics`).
    Parameters: :func:`model.complexity.count_params` (279,873,796 for c0=96, d=5).
    Raises ``ValueError`` naming the field for width < 1, depth < 1, num_classes < 1 or a bad
    input_shape.
    """
    width = check_width(width)
    depth = check_depth(depth)
    num_classes = check_num_classes(num_classes)
    shape = _check_input_shape(input_shape, depth)
    if name is None:
        name = f"unet_c{width}_d{depth}"

    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    skips = []
    for level in range(depth):
        x = _conv_block(x, width * 2**level, f"enc{level}", synchronized_bn)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, strides=2, data_format="channels_last", name=f"pool{level}")(x)
    x = _conv_block(x, width * 2**depth, "bottleneck", synchronized_bn)
    for level in reversed(range(depth)):
        filters = width * 2**level
        x = keras.layers.Conv2DTranspose(
            filters,
            2,
            strides=2,
            padding="same",
            use_bias=True,
            kernel_initializer=_KERNEL_INIT,
            data_format="channels_last",
            name=f"dec{level}_up",
        )(x)
        x = keras.layers.Concatenate(axis=-1, name=f"dec{level}_concat")([skips[level], x])
        x = _conv_block(x, filters, f"dec{level}", synchronized_bn)
    logits = keras.layers.Conv2D(
        num_classes,
        1,
        padding="same",
        use_bias=True,
        data_format="channels_last",
        dtype="float32",
        name="logits",
    )(x)
    return keras.Model(inputs, logits, name=name)


def infer_depth(model: keras.Model) -> int:
    """Depth of a model built by :func:`build_unet` (= number of MaxPooling2D layers). A fully convolutional
    model without pooling has depth 0: any slice size works, nothing is padded."""
    return sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers)


def _spatial_axes(ndim: int) -> tp.Tuple[int, int]:
    if ndim == 2:
        return 0, 1  # (H, W)
    if ndim in (3, 4):
        return 1, 2  # (N, H, W) or (N, H, W, C)
    raise ValueError(f"image_batch must have 2 (H, W), 3 (N, H, W) or 4 (N, H, W, C) dims, got {ndim}")


def pad_to_multiple(image_batch, depth: int, mode: str = "reflect") -> tp.Tuple[tp.Any, Pads]:
    """Pad H and W up to the next multiple of 2^depth; return ``(padded, pads)``.

    ``image_batch``: (H, W), (N, H, W) or (N, H, W, C), a NumPy array (padded with ``np.pad``)
    or a backend tensor (``keras.ops.pad``). ``pads`` = ((top, bottom), (left, right)); the
    padding is split as evenly as possible (extra pixel at the bottom/right) so both borders get
    the same treatment. Undo it with :func:`crop_padding`.

    ``mode="reflect"`` (default) mirrors the slice at its border (without repeating the edge
    pixel); ``"constant"`` pads with zeros; ``"symmetric"`` and ``"edge"`` (NumPy only) also work.
    Why reflect: the padded margin (< 2^d pixels) is cropped away again, so it only changes the
    context that border pixels see. Mirroring keeps image statistics there close to what the
    network saw in training (patches cut from inside the slice), whereas a zero band adds an
    artificial intensity step unless 0 really is the background value after normalisation
    (then "constant" is equally fine). The network's own "same" zero padding still applies at
    every layer either way.
    """
    depth = check_positive_int(depth, "depth", minimum=0)  # 0: a model without pooling, no padding
    m = 2**depth
    ndim = len(image_batch.shape)
    ah, aw = _spatial_axes(ndim)
    h, w = int(image_batch.shape[ah]), int(image_batch.shape[aw])
    th, tw = (-h) % m, (-w) % m
    pads: Pads = ((th // 2, th - th // 2), (tw // 2, tw - tw // 2))
    if th == 0 and tw == 0:
        return image_batch, pads
    width_spec = [(0, 0)] * ndim
    width_spec[ah], width_spec[aw] = pads
    if isinstance(image_batch, np.ndarray):
        if mode == "constant":
            return np.pad(image_batch, width_spec, mode="constant", constant_values=0), pads
        if mode in ("reflect", "symmetric") and min(h, w) < 2:
            mode = "edge"  # nothing to mirror on a 1-pixel axis
        return np.pad(image_batch, width_spec, mode=mode), pads
    if mode not in ("constant", "reflect", "symmetric"):
        raise ValueError(f"mode must be 'constant', 'reflect' or 'symmetric' for tensors, got {mode!r}")
    return keras.ops.pad(image_batch, width_spec, mode=mode), pads


def crop_padding(batch, pads: Pads, spatial_axes: tp.Tuple[int, int] = (1, 2)):
    """Undo :func:`pad_to_multiple`: cut ``pads`` off the two spatial axes (default (1, 2))."""
    (top, bottom), (left, right) = pads
    index = [slice(None)] * len(batch.shape)
    ah, aw = spatial_axes
    index[ah] = slice(top, int(batch.shape[ah]) - bottom)
    index[aw] = slice(left, int(batch.shape[aw]) - right)
    return batch[tuple(index)]


def inference_call(model: keras.Model) -> tp.Callable:
    """``model(x, training=False)``, traced once per model under TensorFlow (any batch and slice shape).

    Keras' eager call dispatches every layer from Python: 40–65 ms per batch of 8 64² slices for the laptop
    grid's U-nets against 6–12 ms traced (2-core CPU, 2026-12-07), and validation calls it a dozen times per
    run. The trace lives on the model, so a reused model (weights assigned in place) keeps it.
    """
    if keras.backend.backend() != "tensorflow":
        return lambda x: model(x, training=False)
    fn = getattr(model, "_inference_fn", None)
    if fn is None:
        import tensorflow as tf

        channels = model.inputs[0].shape[-1] if getattr(model, "inputs", None) else None
        spec = tf.TensorSpec((None, None, None, channels), tf.float32)
        fn = tf.function(lambda x: model(x, training=False), input_signature=[spec], autograph=False)
        model._inference_fn = fn
    return fn


def predict_full_slice(
    model: keras.Model,
    slice2d_or_batch,
    depth: tp.Optional[int] = None,
    *,
    mode: str = "reflect",
    batch_size: int = 1,
    probabilities: bool = False,
) -> np.ndarray:
    """Full-slice inference as in the paper ("test on the full slice, no cropping").

    ``slice2d_or_batch``: one slice (H, W), a batch of slices (N, H, W) or (N, H, W, C); any
    H, W. The slices are padded to a multiple of 2^depth (:func:`pad_to_multiple`, ``mode``),
    run through ``model`` in inference mode ``batch_size`` at a time, and the output is cropped
    back to H x W. A model built under a multi-replica ``tf.distribute`` strategy spreads each batch over
    its replicas (:func:`model.devices.replica_call`). Returns float32 logits (softmax probabilities with ``probabilities=True``) of
    shape (H, W, K) for a 2-D input, else (N, H, W, K). ``depth=None`` infers it from the model.
    """
    depth = infer_depth(model) if depth is None else check_positive_int(depth, "depth", minimum=0)
    batch_size = check_positive_int(batch_size, "batch_size")
    x = np.asarray(slice2d_or_batch)
    single = x.ndim == 2
    if x.ndim == 2:
        x = x[None, :, :, None]
    elif x.ndim == 3:
        x = x[..., None]
    elif x.ndim != 4:
        raise ValueError(f"slice2d_or_batch must be (H, W), (N, H, W) or (N, H, W, C), got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    padded, pads = pad_to_multiple(x, depth, mode=mode)
    strategy = getattr(model, "distribute_strategy", None)  # the TensorFlow trainer's; other backends: one device
    distributed = strategy is not None and strategy.num_replicas_in_sync > 1
    if distributed:
        from model.devices import replica_call  # TensorFlow only where a model has several replicas
    outputs = []
    for start in range(0, padded.shape[0], batch_size):
        chunk = padded[start : start + batch_size]
        # Paper: data parallel over the node's GPUs; each batch of slices is spread over the replicas.
        y = replica_call(model, chunk) if distributed else inference_call(model)(chunk)
        if probabilities:
            y = keras.ops.softmax(y, axis=-1)
        outputs.append(np.asarray(keras.ops.convert_to_numpy(y), dtype=np.float32))
    out = crop_padding(np.concatenate(outputs, axis=0), pads)
    return out[0] if single else out


def infer_width(model: keras.Model) -> int:
    """Width c0 of a model built by :func:`build_unet`: the filters of its first convolution."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.Conv2DTranspose):
            return int(layer.filters)
    raise ValueError(f"model {model.name!r} has no Conv2D layer: not a U-net of build_unet")


def model_precision(model: keras.Model) -> str:
    """The dtype policy the model's hidden convolutions were built with (the 1×1 logits are float32 by design)."""
    names = {layer.dtype_policy.name for layer in model.layers
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)) and layer.name != "logits"}
    return names.pop() if len(names) == 1 else "float32"


def inference_precision(requested: str, model: keras.Model, accelerator: bool) -> str:
    """``auto``: the training's policy (a model trained in mixed_float16/bfloat16 predicts in it) on an accelerator,
    float32 on a CPU (16-bit there is 75–200× slower, platform facts); otherwise ``requested``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    return model_precision(model) if accelerator else "float32"


def with_precision(model: keras.Model, policy: str) -> keras.Model:
    """``model`` computing in ``policy`` (its own weights; the logits layer stays float32): the model itself when it
    already does, else a clone with the policy on every other layer. A ``.keras`` file keeps the policy it was
    trained in; this is how a GPU-trained (mixed) model predicts in float32 on a CPU, or a float32 one in bf16."""
    if model_precision(model) == policy:
        return model

    def clone(layer):
        cfg = layer.get_config()
        if layer.name != "logits":
            cfg["dtype"] = policy
        return layer.__class__.from_config(cfg)

    out = keras.models.clone_model(model, clone_function=clone)
    out.set_weights(model.get_weights())
    return out
