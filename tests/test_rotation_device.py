"""Rotations on the network's device (Keras ops gather) equal the CPU path (scipy on threads)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from data.rotation import rotate_planes, rotation_table, unrotate_planes, unrotation_table
from data.volume import VolumeRef
from model.fusion import soft_vote
from model.inference import Source, predict_plane
from model.planes import PLANE_SETS, PLANES
from model.streaming import PhaseTimes
from model.rotate import CpuRotation, DeviceRotation
from tests.test_predict import SHAPE, oracle, phantom

ROTATED = [p for p in PLANE_SETS["9"] if PLANES[p].rotated]


@pytest.mark.parametrize("shape", [(36, 48), (13, 7)])
def test_sampling_tables_reproduce_scipy(shape):
    rng = np.random.default_rng(0)
    a = rng.random((3,) + shape).astype(np.float32)
    rot = rotate_planes(a)
    idx, w = rotation_table(shape)
    np.testing.assert_allclose((a.reshape(3, -1)[:, idx] * w).sum(1).reshape(rot.shape), rot, atol=1e-6)
    b = rng.random(rot.shape).astype(np.float32)
    back = unrotate_planes(b, shape)
    idx, w = unrotation_table(shape)
    np.testing.assert_allclose((b.reshape(3, -1)[:, idx] * w).sum(1).reshape(back.shape), back, atol=1e-6)


def test_device_and_threaded_cpu_rotation_agree_on_a_slab():
    rng = np.random.default_rng(1)
    planes = rng.random((5, 36, 48)).astype(np.float32)
    cpu, dev = CpuRotation(workers=2), DeviceRotation(max_elements=3 * 59 * 59)  # forces two groups of planes
    np.testing.assert_allclose(dev.rotate(planes), rotate_planes(planes), atol=1e-6)
    np.testing.assert_allclose(cpu.rotate(planes), rotate_planes(planes), atol=1e-6)
    # The same sampling tables and order of sums: numpy on threads and the device give the same floats.
    np.testing.assert_array_equal(cpu.rotate(planes), dev.rotate(planes))
    p = rng.random((5, 59, 59, 4)).astype(np.float32)
    q = np.rint(255 * p / p.sum(-1, keepdims=True)).astype(np.uint8)
    a, b = cpu.unrotate_probabilities(q, (36, 48)), dev.unrotate_probabilities(q, (36, 48))
    assert a.dtype == b.dtype == np.uint8 and a.shape == (5, 36, 48, 4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int).sum(-1) - 255).max() <= 2  # background is the remainder: still sums to 1
    cpu.close()


def _predict_all(volume, predictor, folder, rotation, workers):
    src = Source(VolumeRef(volume, "/image"), tuple(h5py.File(volume)["image"].shape))
    times = PhaseTimes()
    files = {p: predict_plane(src, p, predictor, folder / f"{p}.h5", model_id="m", progress=False,
                              rotation=rotation, workers=workers, times=times) for p in ROTATED}
    stack = {}
    for p, f in files.items():
        with h5py.File(f) as h:
            stack[p] = h["probabilities"][...]
    return stack, times


def assert_paths_agree(cpu: dict, dev: dict) -> None:
    """Probabilities within 1/255 per plane; fused labels identical except at exact ties of the CPU path."""
    for p in cpu:
        assert np.abs(cpu[p].astype(int) - dev[p]).max() <= 1, p
    a, b = np.stack(list(cpu.values())), np.stack(list(dev.values()))
    la, lb = soft_vote(a), soft_vote(b)
    total = np.sort(a.sum(0, dtype=np.int64), axis=-1)
    tie = total[..., -1] == total[..., -2]
    assert np.array_equal(la[~tie], lb[~tie])


def test_device_path_equals_cpu_path_with_the_oracle(tmp_path):
    lab = phantom()
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f["image"] = (lab / 3).astype(np.float32)
    cpu, t_cpu = _predict_all(tmp_path / "vol.h5", oracle, tmp_path / "cpu", CpuRotation(2), workers=2)
    dev, t_dev = _predict_all(tmp_path / "vol.h5", oracle, tmp_path / "dev", DeviceRotation(), workers=1)
    assert_paths_agree(cpu, dev)
    for t in (t_cpu, t_dev):
        assert t.seconds["rotate"] > 0 and t.seconds["rotate_back"] > 0 and t.seconds["predict"] > 0


def test_device_path_equals_cpu_path_with_a_small_unet(tmp_path):
    import keras

    from model.predict import keras_predictor
    from model.unet import build_unet

    keras.utils.set_random_seed(3)
    model = build_unet(4, 2)
    rng = np.random.default_rng(3)
    shape = (12, 20, 24)
    img = np.clip(phantom(shape) / 3 + 0.05 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f["image"] = img
    predictor = keras_predictor(model, batch_size=8)
    cpu, _ = _predict_all(tmp_path / "vol.h5", predictor, tmp_path / "cpu", CpuRotation(1), workers=1)
    dev, _ = _predict_all(tmp_path / "vol.h5", predictor, tmp_path / "dev", DeviceRotation(), workers=2)
    assert_paths_agree(cpu, dev)
    # Not trivially equal: a random U-net spreads its probabilities over all classes.
    assert len(np.unique(soft_vote(np.stack(list(cpu.values()))))) > 1
