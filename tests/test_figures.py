"""Fig. 4 / Fig. 5 pictures from real plane files (HDF5) and a real image volume."""

from __future__ import annotations

import h5py
import numpy as np
from matplotlib.image import imread

from data.volume import VolumeRef
from model.figures import _plane_slice, fig4_plane_probabilities, middle_slice
from model.planes import PLANE_SETS


def _plane_files(tmp_path, shape=(12, 14, 16)):
    rng = np.random.default_rng(0)
    files = {}
    for i, plane in enumerate(PLANE_SETS["9"]):
        p = rng.integers(1, 40, shape + (4,)).astype(np.uint8)
        p[..., 0] = 255 - p[..., 1:].sum(-1)
        p[:, :, 5, 3] = 200 + i  # a marker on S_pr slice 5 of every plane
        files[plane] = tmp_path / f"{plane}.h5"
        with h5py.File(files[plane], "w") as f:
            f.create_dataset("probabilities", data=p)
    with h5py.File(tmp_path / "img.h5", "w") as f:
        f.create_dataset("image", data=rng.random(shape, dtype=np.float32))
    return files, VolumeRef(tmp_path / "img.h5", "/image")


def test_slices_of_each_plane_set_come_from_the_right_axis(tmp_path):
    files, image = _plane_files(tmp_path)
    with h5py.File(files["cp"]) as f:
        whole = f["probabilities"][()]
    np.testing.assert_array_equal(_plane_slice(files["cp"], 3, "rc"), whole[3])
    np.testing.assert_array_equal(_plane_slice(files["cp"], 3, "cp"), whole[:, 3])
    np.testing.assert_array_equal(_plane_slice(files["cp"], 5, "pr")[..., 3], np.full((12, 14), 201))
    n, img = middle_slice(image, "pr")
    assert n == 8 and img.shape == (12, 14)


def test_fig4_shows_bone_on_s_rc_and_rm_on_s_pr_for_naive_planes_and_both_averages(tmp_path):
    files, image = _plane_files(tmp_path)
    out = fig4_plane_probabilities(image, files, tmp_path / "fig4.png")
    assert out.is_file() and not list(tmp_path.glob(".*fig4*"))
    h, w, _ = imread(out).shape
    # 3 rows (P(bone) S_rc, P(RM) S_pr, P(DL) S_rc) × 6 columns (image, S_rc, S_cp, S_pr, Avr 3, Avr 9): wide.
    assert w > 1.5 * h
    three = fig4_plane_probabilities(image, {p: files[p] for p in ("rc", "cp", "pr")}, tmp_path / "fig4_3.png",
                                     rows=(("rc", 1),))
    h3, w3, _ = imread(three).shape
    assert w3 < w and h3 < h
