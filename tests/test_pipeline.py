"""The tf.data training pipeline and its augmentation (paper, Training section)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from data.manifest import load_dataset
from data.pipeline import (AugmentConfig, augment, centre_crop, sample_crop_box, source_coordinates,
                           training_dataset, validation_dataset)

STILL = AugmentConfig(input_size=32, area_range=(1.0, 1.0), aspect_range=(1.0, 1.0), horizontal_flip=False,
                      rotation_deg=0.0, elastic_sigma=0.0, brightness=0.0, contrast=(1.0, 1.0))


def _seed(i: int) -> tf.Tensor:
    return tf.constant([11, i], tf.int64)


def _disk(n: int, r: float) -> np.ndarray:
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    return (y**2 + x**2 <= r**2).astype(np.uint8)


def test_no_augmentation_is_the_identity():
    rng = np.random.default_rng(0)
    img = rng.random((32, 32)).astype(np.float32)
    lab = rng.integers(0, 4, (32, 32)).astype(np.uint8)
    x, y = augment(tf.constant(img), tf.constant(lab), _seed(0), STILL)
    np.testing.assert_allclose(x.numpy()[..., 0], img, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), lab)


def test_flip_mirrors_columns_and_happens_about_half_the_time():
    rng = np.random.default_rng(1)
    img = rng.random((32, 32)).astype(np.float32)
    cfg = dataclasses.replace(STILL, horizontal_flip=True)
    flips = 0
    for i in range(40):
        x = augment(tf.constant(img), tf.zeros((32, 32), tf.uint8), _seed(i), cfg)[0].numpy()[..., 0]
        if np.allclose(x, img[:, ::-1], atol=1e-6):
            flips += 1
        else:
            np.testing.assert_allclose(x, img, atol=1e-6)
    assert 8 <= flips <= 32


def test_rotation_keeps_a_centred_disk_and_moves_an_off_centre_one():
    disk = _disk(64, 20)
    cfg = dataclasses.replace(STILL, input_size=64, rotation_deg=90.0)
    for i in range(5):
        _, y = augment(tf.constant(disk.astype(np.float32)), tf.constant(disk), _seed(i), cfg)
        assert (y.numpy() == disk).mean() > 0.99
    bar = np.zeros((64, 64), np.uint8)
    bar[28:36, 34:60] = 1  # a horizontal bar right of centre
    moved = [(augment(tf.constant(bar.astype(np.float32)), tf.constant(bar), _seed(i), cfg)[1].numpy() != bar).mean()
             for i in range(8)]
    assert max(moved) > 0.02


def _boxes(cfg: AugmentConfig, height: float, width: float, n: int) -> np.ndarray:
    """(n, 4) crop boxes (y0, x0, h, w) of n seeds, in one graph call."""
    seeds = tf.stack([tf.fill([n], tf.constant(7, tf.int64)), tf.range(n, dtype=tf.int64)], axis=1)
    fn = tf.function(lambda sd: tf.stack(sample_crop_box(sd, tf.constant(height), tf.constant(width), cfg)))
    return tf.map_fn(fn, seeds, fn_output_signature=tf.float32).numpy()


@pytest.mark.parametrize("size", [384, 512, 640])
def test_default_crops_train_at_the_scale_of_testing(size):
    # Default crop_reference=input_size: each axis reads 0.9–1.1 source pixels per patch pixel.
    cfg = AugmentConfig(input_size=size)
    y0, x0, h, w = _boxes(cfg, 1024.0, 1024.0, 1000).T
    assert (h / size).min() >= 0.9 - 1e-4 and (h / size).max() <= 1.1 + 1e-4
    assert (w / size).min() >= 0.9 - 1e-4 and (w / size).max() <= 1.1 + 1e-4
    cover = h * w / size**2
    assert cover.min() >= 0.85 - 1e-4 and cover.max() <= 1.0 + 1e-4 and cover.max() - cover.min() > 0.12
    assert (w / h).min() >= 3 / 4 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4 and (w / h).max() - (w / h).min() > 0.25
    assert y0.min() >= 0 and (y0 + h).max() <= 1024 + 1e-3 and x0.min() >= 0 and (x0 + w).max() <= 1024 + 1e-3
    # ... and the coordinate map agrees: without rotation or elastic, one patch pixel step is h/IS slice pixels.
    still = dataclasses.replace(cfg, rotation_deg=0.0, elastic_sigma=0.0, horizontal_flip=False)
    yx = source_coordinates(_seed(3), tf.constant(1024.0), tf.constant(1024.0), still).numpy()
    box = [float(t) for t in sample_crop_box(tf.random.experimental.stateless_split(_seed(3), 4)[0],
                                             tf.constant(1024.0), tf.constant(1024.0), still)]
    np.testing.assert_allclose(np.diff(yx[:, 0, 0]), box[2] / size, rtol=1e-4)
    np.testing.assert_allclose(np.diff(yx[0, :, 1]), box[3] / size, rtol=1e-4)


@pytest.mark.parametrize("reference", ["input_size", "slice"])
@pytest.mark.parametrize("height, width", [(1024.0, 1024.0), (1200.0, 1000.0), (800.0, 1000.0)])
def test_crops_cover_85_to_100_percent_of_their_reference(reference, height, width):
    # Boxes are fitted (aspect drawn within what the sides allow), never clipped below 85 %.
    cfg = AugmentConfig(input_size=512, crop_reference=reference)
    y0, x0, h, w = _boxes(cfg, height, width, 1000).T
    ref = 512.0**2 if reference == "input_size" else height * width
    cover = h * w / ref
    assert cover.min() >= 0.85 - 1e-4 and cover.max() <= 1.0 + 1e-4
    assert (w / h).min() >= 3 / 4 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    if reference == "slice":
        assert h.max() <= height + 1e-3 and w.max() <= width + 1e-3
        assert y0.min() >= -1e-3 and (y0 + h).max() <= height + 1e-3 and x0.min() >= -1e-3
        assert (x0 + w).max() <= width + 1e-3


def test_slice_crops_of_a_long_slice_keep_their_area_and_stretch_the_aspect():
    # 100 × 400: no box of 85 % of the slice has an aspect in [3:4, 4:3]; coverage wins, the aspect follows.
    y0, x0, h, w = _boxes(AugmentConfig(input_size=64, crop_reference="slice"), 100.0, 400.0, 200).T
    cover = h * w / 40000.0
    assert cover.min() >= 0.85 - 1e-4 and h.max() <= 100 + 1e-3 and w.max() <= 400 + 1e-3


def test_a_window_larger_than_the_slice_holds_the_whole_slice():
    y0, x0, h, w = _boxes(AugmentConfig(input_size=192), 64.0, 64.0, 200).T
    assert (y0 <= 1e-3).all() and (y0 + h >= 64 - 1e-3).all() and (x0 <= 1e-3).all() and (x0 + w >= 64 - 1e-3).all()


@pytest.mark.parametrize("kwargs, field", [(dict(crop_reference="volume"), "crop_reference"),
                                           (dict(zoom_range=(0.95, 1.05)), "zoom_range"),
                                           (dict(zoom_range=(1.1, 1.2)), "zoom_range")])
def test_bad_crop_settings_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**kwargs)


def test_full_augmentation_keeps_labels_aligned_with_the_image():
    # Clean image = class / 3: wherever the bilinear value is a class value, the nearest label must agree.
    z = np.add.outer(np.arange(96) // 12, np.arange(120) // 15) % 4
    lab = z.astype(np.uint8)
    img = (lab / 3.0).astype(np.float32)
    cfg = AugmentConfig(input_size=64, brightness=0.0, contrast=(1.0, 1.0))
    agree = []
    for i in range(10):
        x, y = augment(tf.constant(img), tf.constant(lab), _seed(i), cfg)
        x, y = x.numpy()[..., 0], y.numpy()
        exact = np.abs(x * 3 - np.rint(x * 3)) < 1e-4
        agree.append((np.rint(x * 3)[exact] == y[exact]).mean())
        assert y.dtype == np.uint8 and set(np.unique(y)) <= {0, 1, 2, 3}
    assert min(agree) > 0.97


def test_brightness_and_contrast_change_only_the_image():
    img = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    cfg = dataclasses.replace(STILL, brightness=0.1, contrast=(0.8, 1.2))
    outs = [augment(tf.constant(img), tf.zeros((32, 32), tf.uint8), _seed(i), cfg)[0].numpy()[..., 0] for i in range(10)]
    slopes = [np.polyfit(img.ravel(), o.ravel(), 1)[0] for o in outs]
    assert 0.8 - 1e-3 <= min(slopes) < max(slopes) <= 1.2 + 1e-3
    shifts = [o.mean() - img.mean() for o in outs]
    assert max(abs(s) for s in shifts) <= 0.1 + 1e-4 and max(shifts) - min(shifts) > 0.02


def test_training_dataset_batches_are_seeded(prepared_dataset):
    train = load_dataset(prepared_dataset).train
    cfg = AugmentConfig(input_size=32)

    def first(seed):
        x, y = next(iter(training_dataset(train, cfg, batch_size=4, seed=seed)))
        return x.numpy(), y.numpy()

    (xa, ya), (xb, yb), (xc, _) = first(5), first(5), first(6)
    assert xa.shape == (4, 32, 32, 1) and xa.dtype == np.float32 and ya.shape == (4, 32, 32) and ya.dtype == np.uint8
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(xa, xc)


def test_validation_is_a_centre_crop_without_resizing(prepared_dataset):
    img = np.arange(30 * 40).reshape(30, 40)
    c, lab = centre_crop(img, img, 20)
    np.testing.assert_array_equal(c, img[5:25, 10:30])
    np.testing.assert_array_equal(lab, c)
    whole, _ = centre_crop(img, None, 992)
    assert whole.shape == (30, 40)
    val = load_dataset(prepared_dataset).train[:1]
    shapes = {tuple(x.shape) for x, _ in validation_dataset(val, crop=22, step=4)}
    assert shapes == {(1, 22, 22, 1), (1, 20, 22, 1)}
