"""The whole training path learns: pipeline, augmentation, schedule, checkpoints, best weights, full-slice
evaluation, on an easy synthetic implant. Guards against silent breakage (labels misaligned with images,
a precision or optimizer reset that wrecks training, a crop at the wrong scale) that no shape test sees."""

from __future__ import annotations

import h5py
import numpy as np
from scipy import ndimage

from data.folds import split_fold
from data.manifest import Sample, load_dataset, write_manifest
from data.pipeline import AugmentConfig
from data.prepare import prepare_dataset
from data.volume import VolumeRef
from model.training import TrainSettings, checkpoint_files, train_fold

GREY = {0: 0.20, 1: 0.45, 2: 0.62, 3: 0.85}  # background, bone, DL, RM: separable, but noisy


def easy_explant(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A screw-like cylinder (RM core, DL shell 3 voxels thick) in trabecular-like bone, noisy grey values."""
    z, y, x = np.mgrid[:size, :size, :size].astype(np.float32)
    cy, cx = (size - 1) / 2 + rng.uniform(-3, 3, 2)
    r = np.hypot(y - cy, x - cx)
    r_rm = size * rng.uniform(0.16, 0.22)
    inside = (z > size * 0.15) & (z < size * 0.85)
    lab = np.zeros((size,) * 3, np.uint8)
    blobs = ndimage.gaussian_filter(rng.standard_normal(lab.shape).astype(np.float32), 2.0)
    lab[(blobs > 0.08) & (r > r_rm + 5)] = 1
    lab[inside & (r <= r_rm + 3)] = 2
    lab[inside & (r <= r_rm)] = 3
    img = np.vectorize(GREY.get)(lab).astype(np.float32) + rng.normal(0, 0.04, lab.shape).astype(np.float32)
    return (img * 10000).astype(np.uint16), lab


def test_a_small_unet_learns_bone_dl_and_rm_through_the_training_path(tmp_path):
    rng = np.random.default_rng(3)
    raw = tmp_path / "raw"
    raw.mkdir()
    samples = []
    for i in range(5):
        img, lab = easy_explant(32, rng)
        with h5py.File(raw / f"e{i}.h5", "w") as f:
            f.create_dataset("image", data=img, chunks=(16, 16, 16))
            f.create_dataset("label", data=lab, chunks=(16, 16, 16))
        samples.append(Sample(id=f"e{i}", image=VolumeRef(raw / f"e{i}.h5", "/image"),
                              label=VolumeRef(raw / f"e{i}.h5", "/label"), voxel_size_um=5.0, alloy="Mg-5Gd",
                              beamline="P05", implantation_days=28.0, label_quality="WF", split="train"))
    write_manifest(raw, samples)
    prepare_dataset(raw, tmp_path / "prepared")
    train, val = split_fold(load_dataset(tmp_path / "prepared"), 0, num_folds=5)
    settings = TrainSettings(learning_rate=3e-3, max_iters=600, checkpoint_every=100, lr_patience_iters=200,
                             batch_size=4, val_crop=32, val_slice_step=4, final_slice_step=1, open_slabs=8,
                             bn_recalibration_batches=25)
    result = train_fold(width=6, depth=2, input_size=32, train_samples=train, val_samples=val, settings=settings,
                        augment=AugmentConfig(input_size=32), ckpt_dir=tmp_path / "ck")
    m = result.final_metrics
    assert result.state.iteration == 600 and "best" in checkpoint_files(tmp_path / "ck")
    assert m["iou_bone"] >= 0.8 and m["iou_degradation_layer"] >= 0.8 and m["iou_residual_material"] >= 0.8, m


def test_batch_norm_recalibration_sets_the_statistics_of_the_current_weights():
    import keras

    from model.training import recalibrate_batch_norm
    from model.unet import build_unet

    model = build_unet(4, 2)
    x = np.random.default_rng(0).random((3, 16, 16, 1), dtype=np.float32) * 5 + 2  # far from the initial 0 / 1
    before = np.asarray(model(x, training=False))
    assert not np.allclose(before, np.asarray(model(x, training=True)), atol=1e-3)
    assert recalibrate_batch_norm(model, [x, x, x]) == 3
    # The same batch three times: the population statistics are that batch's, so inference == training mode.
    np.testing.assert_allclose(np.asarray(model(x, training=False)), np.asarray(model(x, training=True)), atol=1e-3)
    assert all(layer.momentum == 0.99 for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    # Two different batches: the average of their statistics (first BN layer: the input conv's output).
    conv = keras.Model(model.inputs, model.get_layer("enc0_conv1").output)
    y = x[::-1] * 0.5
    recalibrate_batch_norm(model, [x, y])
    means = [np.asarray(conv(b)).mean(axis=(0, 1, 2)) for b in (x, y)]
    np.testing.assert_allclose(model.get_layer("enc0_bn1").moving_mean.numpy(), np.mean(means, axis=0), rtol=1e-4,
                               atol=1e-5)
