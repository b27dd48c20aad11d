"""Whole-volume prediction: rotation geometry, 3/9-plane fusing, voting, the CLI and its bad inputs."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.ndimage as ndi

from data.rotation import (other_axes, position_after_rotation, rotate_planes, rotated_volume_shape,
                           unrotate_planes)
from data.volume import VolumeRef
from model.evaluation import iou_per_class
from model.fuse import evaluate_methods, fuse_planes
from model.fusion import majority_vote, mean_probabilities, quantize_probabilities, soft_vote
from model.inference import Source, predict_plane
from model.planes import PLANE_SETS, PLANES, TABLE2_METHODS

SHAPE = (40, 36, 48)  # three different lengths, so a swapped axis cannot go unnoticed


def phantom(shape=SHAPE) -> np.ndarray:
    """Bone ball, a degradation-layer box and a residual-material rod, off-centre."""
    z, y, x = np.indices(shape)
    c = np.array(shape) / 2
    lab = np.zeros(shape, np.uint8)
    lab[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < (min(shape) * 0.4) ** 2] = 1
    lab[(abs(z - c[0]) < shape[0] * 0.2) & (abs(y - c[1] - 3) < shape[1] * 0.15) & (abs(x - c[2] + 2) < shape[2] * 0.3)] = 2
    lab[((y - c[1] - 2) ** 2 + (x - c[2] + 1) ** 2 < (min(shape) * 0.12) ** 2) & (abs(z - c[0]) < shape[0] * 0.35)] = 3
    return lab


def oracle(slices: np.ndarray) -> np.ndarray:
    """A stand-in model that knows the answer: the image holds label / 3, it returns near one-hot labels."""
    k = np.arange(4, dtype=np.float32)
    logits = -((np.asarray(slices, np.float32)[..., None] * 3 - k) ** 2) * 8
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    d = tmp_path_factory.mktemp("vol")
    lab = phantom()
    with h5py.File(d / "vol.h5", "w") as f:
        f["image"] = (lab / 3).astype(np.float32)
        f["label"] = lab
    return d / "vol.h5"


@pytest.fixture(scope="module")
def plane_files(volume, tmp_path_factory):
    d = tmp_path_factory.mktemp("planes")
    src = Source(VolumeRef(volume, "/image"), SHAPE)
    return {p: predict_plane(src, p, oracle, d / f"{p}.h5", model_id="oracle", progress=False) for p in PLANE_SETS["9"]}


# --- rotation geometry -------------------------------------------------------------------------

def test_rotated_voxel_lands_where_computed_by_hand():
    # Plane (36, 48) rotated 45° about axis 0: bounding box (36 + 48)/√2 = 59.4 → 59 × 59, centre 29.
    # Voxel (y, x) = (10, 20) is (−7.5, −3.5) from the centre (17.5, 23.5). Mᵀ = [[c, −s], [s, c]], c = s = 1/√2:
    # (−7.5 + 3.5)/√2 = −2.828, (−7.5 − 3.5)/√2 = −7.778 → (26.172, 21.222).
    assert rotated_volume_shape(SHAPE, 0) == (40, 59, 59)
    pos = position_after_rotation((5, 10, 20), SHAPE, 0)
    assert pos == pytest.approx((5, 29 - 4 / 2 ** 0.5, 29 - 11 / 2 ** 0.5))
    z, y, x = np.indices(SHAPE)
    blob = np.exp(-((y - 10) ** 2 + (x - 20) ** 2) / 8.0) * (z == 5)  # smooth, so bilinear sampling keeps its centre
    rot = rotate_planes(blob.astype(np.float32))
    assert np.unravel_index(rot.argmax(), rot.shape) == (5, 26, 21)
    assert ndi.center_of_mass(rot) == pytest.approx(pos, abs=0.02)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rotation_equals_scipy_rotate_without_cropping(axis):
    rng = np.random.default_rng(axis)
    v = rng.random(SHAPE).astype(np.float32)
    b, c = other_axes(axis)
    ref = ndi.rotate(v, 45, axes=(b, c), reshape=True, order=1, mode="constant", cval=0.0, prefilter=False)
    ours = np.moveaxis(rotate_planes(np.moveaxis(v, axis, 0)), 0, axis)
    assert ours.shape == ref.shape == rotated_volume_shape(SHAPE, axis)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_rotate_back_restores_smooth_planes():
    rng = np.random.default_rng(1)
    x = ndi.gaussian_filter(rng.random((3, 36, 48)).astype(np.float32), (0, 3, 3))
    back = unrotate_planes(rotate_planes(x), (36, 48))
    assert back.shape == x.shape
    assert np.abs(back - x)[:, 2:-2, 2:-2].max() < 0.01


# --- voting ----------------------------------------------------------------------------------

def test_soft_and_majority_vote_differ_where_they_should():
    # Plane A is sure of bone; planes B and C lean to DL by a hair: soft → bone, majority → DL.
    a = [0.05, 0.90, 0.05, 0.0]
    b = [0.05, 0.45, 0.50, 0.0]
    stack = np.array([a, b, b], np.float32)[:, None, :]
    assert soft_vote(stack).tolist() == [1]
    assert majority_vote(stack).tolist() == [2]
    # The uint8 form the plane files store votes the same way.
    q = quantize_probabilities(stack)
    assert soft_vote(q).tolist() == [1] and majority_vote(q).tolist() == [2]
    np.testing.assert_allclose(mean_probabilities(q)[0], np.mean(stack, 0)[0], atol=1 / 255)


def test_majority_tie_goes_to_the_most_probable_tied_class():
    # Three planes, three different labels: the tie is broken by the summed probability, not by index.
    stack = np.array([[0.0, 0.0, 0.30, 0.70], [0.0, 0.6, 0.4, 0.0], [0.6, 0.0, 0.4, 0.0]], np.float32)[:, None]
    # labels 3, 1, 0 → one vote each; class 2 has no vote despite the largest sum (1.1); lowest index would say 0.
    assert majority_vote(stack).tolist() == [3]


# --- fusing on a known volume -----------------------------------------------------------------

@pytest.mark.parametrize("method", list(TABLE2_METHODS))
def test_every_method_gives_back_the_labels(volume, plane_files, method):
    cm = evaluate_methods(plane_files, VolumeRef(volume, "/label"), {method: TABLE2_METHODS[method]})[method]
    iou = iou_per_class(cm)
    assert np.all(iou >= 0.95), (method, iou)


@pytest.mark.parametrize("plane", [p for p in PLANES if PLANES[p].rotated])
def test_each_rotated_plane_survives_the_45_degree_round_trip(volume, plane_files, plane):
    cm = evaluate_methods({plane: plane_files[plane]}, VolumeRef(volume, "/label"), {plane: (plane, "soft")})[plane]
    assert np.all(iou_per_class(cm) >= 0.95), (plane, iou_per_class(cm))


def test_rotated_planes_are_sliced_along_the_rotated_axes(volume, tmp_path):
    seen: list[tuple] = []

    def spy(slices):
        seen.append(slices.shape[1:])
        return oracle(slices)

    src = Source(VolumeRef(volume, "/image"), SHAPE)
    for name, shape in [("rc", (36, 48)), ("cp", (40, 48)), ("pr", (40, 36)),
                        ("cp_r0", (40, 59)), ("pr_r0", (40, 59)),  # rotated about 0: (36, 48) → 59 × 59
                        ("rc_r1", (36, 62)), ("pr_r1", (62, 36)),  # rotated about 1: (40, 48) → 62 × 62
                        ("rc_r2", (54, 48)), ("cp_r2", (54, 48))]:  # rotated about 2: (40, 36) → 54 × 54
        seen.clear()
        predict_plane(src, name, spy, tmp_path / f"{name}.h5", model_id="spy", progress=False)
        assert set(seen) == {shape}, name
        with h5py.File(tmp_path / f"{name}.h5") as f:
            assert f["probabilities"].shape == SHAPE + (4,)


def test_fuse_writes_labels_probabilities_and_tiff(volume, plane_files, tmp_path):
    import tifffile

    out = fuse_planes([plane_files[p] for p in PLANE_SETS["9"]], tmp_path / "out.h5", method="soft",
                      probabilities=True, tiff_path=tmp_path / "out.tif", progress=False)
    with h5py.File(out) as f:
        assert f["labels"].dtype == np.uint8 and f["labels"].shape == SHAPE
        assert f["probabilities"].dtype == np.float16 and f["probabilities"].shape == SHAPE + (4,)
        np.testing.assert_allclose(f["probabilities"][...].astype(np.float32).sum(-1), 1.0, atol=0.02)
        labels = f["labels"][...]
        assert list(f.attrs["planes"]) == list(PLANE_SETS["9"])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "out.tif"]


def test_plane_file_is_reused_only_for_the_same_model(volume, tmp_path):
    calls = []

    def counting(slices):
        calls.append(len(slices))
        return oracle(slices)

    src = Source(VolumeRef(volume, "/image"), SHAPE)
    predict_plane(src, "rc", counting, tmp_path / "rc.h5", model_id="m1", progress=False)
    n = len(calls)
    predict_plane(src, "rc", counting, tmp_path / "rc.h5", model_id="m1", progress=False)
    assert len(calls) == n  # restart: nothing predicted twice
    predict_plane(src, "rc", counting, tmp_path / "rc.h5", model_id="m2", progress=False)
    assert len(calls) == 2 * n  # another model: predicted again


def test_a_failing_plane_task_leaves_nothing_behind(volume, tmp_path):
    def broken(slices):
        if broken.n > 2:
            raise RuntimeError("GPU fell off the bus")
        broken.n += 1
        return oracle(slices)

    broken.n = 0
    src = Source(VolumeRef(volume, "/image"), SHAPE)
    with pytest.raises(RuntimeError):
        predict_plane(src, "cp_r0", broken, tmp_path / "cp_r0.h5", model_id="x", progress=False)
    assert list(tmp_path.iterdir()) == []
