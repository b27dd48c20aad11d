"""tf.data input pipeline with the paper's augmentation (Training section).

Training: a random patch covering 85–100 % of its reference area (IS², by default, or the whole
slice: ``AugmentConfig.crop_reference``) with aspect ratio in [3:4, 4:3], resized to the input
size; random horizontal flip; random rotation in [−90°, 90°]; random elastic deformation; random
brightness and contrast. Labels are always sampled nearest-neighbour.
Validation: centre crop (992 × 992 by default, clipped to the slice), no resizing.

The four geometric steps are composed into ONE inverse coordinate map and the slice is sampled
once (bilinear for the image, nearest for labels): one interpolation instead of four, so less
blur and much less work. Pixels whose source lies outside the slice get 0 (background); the
corners a rotation brings in come from the slice around the crop where it has data.
"""

from __future__ import annotations

import math
import os
import typing as tp

import numpy as np
import tensorflow as tf

from data.augment import AugmentConfig  # noqa: F401  (re-exported: data.pipeline.AugmentConfig)
from data.manifest import Sample
from data.slicing import iter_slices, random_training_slices


def _uniform(seed: tf.Tensor, lo: float, hi: float, shape=()) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed=seed, minval=lo, maxval=hi, dtype=tf.float32)


def crop_aspect_bounds(area: tf.Tensor, h_bounds: tuple, w_bounds: tuple,
                       aspect_range: tuple[float, float]) -> tuple[tf.Tensor, tf.Tensor]:
    """Aspects r = w/h of a box of ``area`` whose sides stay within ``h_bounds``/``w_bounds`` (min, max).

    h = sqrt(area/r), w = sqrt(area·r): the side bounds give an interval of r; the aspect range is
    intersected with it, or collapsed to its nearest end where they do not overlap (sides win).
    """
    (h_min, h_max), (w_min, w_max) = h_bounds, w_bounds
    geo_lo = tf.maximum(area / (h_max * h_max), w_min * w_min / area)
    geo_hi = tf.minimum(area / tf.maximum(h_min * h_min, 1e-12), w_max * w_max / area)
    geo_hi = tf.maximum(geo_hi, geo_lo)
    return (tf.clip_by_value(tf.constant(aspect_range[0], tf.float32), geo_lo, geo_hi),
            tf.clip_by_value(tf.constant(aspect_range[1], tf.float32), geo_lo, geo_hi))


def sample_crop_box(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor, cfg: AugmentConfig) -> tuple[tf.Tensor, ...]:
    """Paper: random patch covering 85–100 % of its reference area, aspect ratio in [3:4, 4:3].

    The reference is IS² (``crop_reference=input_size``: each side within ``zoom_range`` × IS, the
    scale of testing) or the slice (``slice``: the box fits in the slice). The box is fitted by
    drawing the aspect within the bounds its sides allow, never clipped, so coverage stays in
    ``area_range``. Returns (y0, x0, h, w) in pixels; a window larger than the slice is placed so
    that the slice lies inside it (pixels beyond the slice read 0).
    """
    s = tf.random.experimental.stateless_split(seed, 4)
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    if cfg.crop_reference == "input_size":
        size = float(cfg.input_size)
        ref_h = ref_w = tf.constant(size, tf.float32)
        bounds = (cfg.zoom_range[0] * size, cfg.zoom_range[1] * size)
        h_bounds = w_bounds = bounds
    else:
        ref_h, ref_w = height, width
        h_bounds, w_bounds = (0.0, height), (0.0, width)
    area = _uniform(s[0], *cfg.area_range) * ref_h * ref_w
    lo, hi = crop_aspect_bounds(area, h_bounds, w_bounds, cfg.aspect_range)
    aspect = lo + _uniform(s[1], 0.0, 1.0) * (hi - lo)  # w / h
    h = tf.sqrt(area / aspect)
    w = tf.sqrt(area * aspect)
    y0 = _uniform(s[2], 0.0, 1.0) * (height - h)
    x0 = _uniform(s[3], 0.0, 1.0) * (width - w)
    return y0, x0, h, w


def elastic_displacement(seed: tf.Tensor, size: int, cfg: AugmentConfig) -> tf.Tensor:
    """Random elastic deformation: a smooth (size, size, 2) displacement field in output pixels."""
    if cfg.elastic_sigma <= 0:
        return tf.zeros((size, size, 2), tf.float32)
    coarse = tf.random.stateless_normal((1, cfg.elastic_grid, cfg.elastic_grid, 2), seed=seed) * (cfg.elastic_sigma * size)
    return tf.image.resize(coarse, (size, size), method="bicubic")[0]


def source_coordinates(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """Inverse map of crop-resize → flip → rotate → elastic: for each output pixel, its (y, x) in the slice."""
    size = cfg.input_size
    s = tf.random.experimental.stateless_split(seed, 4)
    y0, x0, h, w = sample_crop_box(s[0], height, width, cfg)
    c = (size - 1) / 2.0
    grid = tf.range(size, dtype=tf.float32)
    uu, vv = tf.meshgrid(grid, grid, indexing="ij")
    disp = elastic_displacement(s[1], size, cfg)
    u, v = uu + disp[..., 0] - c, vv + disp[..., 1] - c
    theta = _uniform(s[2], -1.0, 1.0) * (cfg.rotation_deg * math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    u, v = cos * u - sin * v, sin * u + cos * v
    if cfg.horizontal_flip:
        flip = tf.cast(_uniform(s[3], 0.0, 1.0) < 0.5, tf.float32)
        v = v * (1.0 - 2.0 * flip)
    # Output pixel centres → crop-box pixel centres (same convention as tf.image.resize).
    y = y0 + (u + c + 0.5) * (h / size) - 0.5
    x = x0 + (v + c + 0.5) * (w / size) - 0.5
    return tf.stack([y, x], axis=-1)


def _pad_flat(img: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    padded = tf.pad(img, [[1, 1], [1, 1]])
    return tf.reshape(padded, [-1]), tf.shape(padded)


def sample_bilinear(img: tf.Tensor, yx: tf.Tensor) -> tf.Tensor:
    """Bilinear sampling of a 2D image at float coordinates; 0 outside the image."""
    flat, shp = _pad_flat(tf.cast(img, tf.float32))
    hp, wp = tf.cast(shp[0], tf.float32), tf.cast(shp[1], tf.float32)
    y = tf.clip_by_value(yx[..., 0] + 1.0, 0.0, hp - 1.0)
    x = tf.clip_by_value(yx[..., 1] + 1.0, 0.0, wp - 1.0)
    y0f, x0f = tf.floor(y), tf.floor(x)
    wy, wx = y - y0f, x - x0f
    y0 = tf.cast(y0f, tf.int32)
    x0 = tf.cast(x0f, tf.int32)
    y1 = tf.minimum(y0 + 1, shp[0] - 1)
    x1 = tf.minimum(x0 + 1, shp[1] - 1)

    def at(yy, xx):
        return tf.gather(flat, yy * shp[1] + xx)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def sample_nearest(img: tf.Tensor, yx: tf.Tensor) -> tf.Tensor:
    """Nearest-neighbour sampling (labels never mix classes); 0 (background) outside the image."""
    flat, shp = _pad_flat(img)
    y = tf.cast(tf.clip_by_value(tf.round(yx[..., 0]) + 1.0, 0.0, tf.cast(shp[0] - 1, tf.float32)), tf.int32)
    x = tf.cast(tf.clip_by_value(tf.round(yx[..., 1]) + 1.0, 0.0, tf.cast(shp[1] - 1, tf.float32)), tf.int32)
    return tf.gather(flat, y * shp[1] + x)


def brightness_contrast(seed: tf.Tensor, img: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """Paper: random brightness and contrast (contrast about the patch mean, then an additive shift)."""
    s = tf.random.experimental.stateless_split(seed, 2)
    mean = tf.reduce_mean(img)
    return (img - mean) * _uniform(s[0], *cfg.contrast) + mean + _uniform(s[1], -cfg.brightness, cfg.brightness)


def augment(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """One training patch (input_size², 1) float32 and its labels (input_size²) uint8 from one slice."""
    s = tf.random.experimental.stateless_split(seed, 2)
    shp = tf.cast(tf.shape(image), tf.float32)
    yx = source_coordinates(s[0], shp[0], shp[1], cfg)
    img = brightness_contrast(s[1], sample_bilinear(image, yx), cfg)
    lab = sample_nearest(tf.cast(label, tf.int32), yx)
    size = cfg.input_size
    return tf.reshape(img, (size, size, 1)), tf.cast(tf.reshape(lab, (size, size)), tf.uint8)


_TRACED_AUGMENT: dict[AugmentConfig, tp.Any] = {}


def traced_augment(cfg: AugmentConfig) -> tp.Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """:func:`augment` for ``cfg``, traced once per process: each training chunk and each BN recalibration builds a
    new dataset, whose ``map`` would otherwise trace the whole augmentation chain again (~0.1 s each on the 2-core
    CPU; a 30-iteration grid run builds two). Same ops, same seeds: the same patches."""
    fn = _TRACED_AUGMENT.get(cfg)
    if fn is None:
        signature = [tf.TensorSpec((None, None), tf.float32), tf.TensorSpec((None, None), tf.uint8),
                     tf.TensorSpec((2,), tf.int64)]
        fn = tf.function(lambda image, label, seed: augment(image, label, seed, cfg), input_signature=signature)
        _TRACED_AUGMENT[cfg] = fn
    return fn


def centre_crop(image: np.ndarray, label: tp.Optional[np.ndarray], size: int = 992):
    """Paper: validation on a centre crop of 992 × 992, no resizing; a smaller slice is kept whole."""
    h, w = image.shape
    ch, cw = min(size, h), min(size, w)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    win = (slice(y0, y0 + ch), slice(x0, x0 + cw))
    return image[win], (None if label is None else label[win])


def training_dataset(samples: tp.Sequence[Sample], cfg: AugmentConfig, *, batch_size: int, seed: int,
                     planes: tp.Sequence[str] = ("rc", "cp", "pr"), open_slabs: int = 8,
                     num_parallel_calls: tp.Optional[int] = None) -> tf.data.Dataset:
    """Endless, seeded batches ((B, S, S, 1) float32, (B, S, S) uint8); parallel map, prefetched.

    The same seed gives the same batches: slices come from a seeded generator and each patch's
    augmentation is seeded by (seed, its position in the stream), independent of thread timing.
    """
    def gen():
        yield from random_training_slices(samples, seed=seed, planes=planes, open_slabs=open_slabs)

    ds = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec((None, None), tf.float32), tf.TensorSpec((None, None), tf.uint8)))
    ds = ds.enumerate()
    seed_hi = tf.constant(seed, tf.int64)

    patch = traced_augment(cfg)

    def _map(i, pair):
        img, lab = pair
        return patch(img, lab, tf.stack([seed_hi, i]))

    opts = tf.data.Options()
    opts.deterministic = True
    # No autotuning: its optimiser thread makes every iterator teardown (one per training chunk) wait
    # 3–10 s when two training processes share the cores (measured, README "Where the time goes").
    opts.autotune.enabled = False
    ds = ds.map(_map, num_parallel_calls=num_parallel_calls or _usable_cores())
    return ds.batch(batch_size, drop_remainder=True).prefetch(2).with_options(opts)


def _usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a SLURM job's CPUs, not the whole node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def validation_dataset(samples: tp.Sequence[Sample], *, crop: int = 992, planes: tp.Sequence[str] = ("rc", "cp", "pr"),
                       step: int = 1) -> tf.data.Dataset:
    """Every ``step``-th slice of each plane, centre-cropped, batch of one (slice shapes may differ)."""
    def gen():
        for _, _, _, img, lab in iter_slices(samples, planes=planes, step=step):
            img, lab = centre_crop(img, lab, crop)
            yield img[..., None].astype(np.float32), lab.astype(np.uint8)

    ds = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec((None, None, 1), tf.float32), tf.TensorSpec((None, None), tf.uint8)))
    return ds.batch(1).prefetch(2)
