"""In-memory multi-plane prediction (model.resident): the same outputs as the plane-file path, chosen by memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from data.volume import VolumeRef
from model.fuse import fuse_planes
from model.fusion import (majority_vote_from_counts, mean_from_sums, plane_votes, soft_vote_from_sums,
                          uncertainty_from_totals)
from model.inference import Source, predict_plane
from model.planes import PLANE_SETS
from model.predict import PredictError, models_predictor, run_prediction
from model.resident import (FuseOnError, MemoryEstimate, auto_batch_size, choose_fuse_on, estimate_memory,
                            plan_prediction, predict_on_host, write_outputs)
from model.rotate import CpuRotation
from tests.test_predict import oracle, phantom

SHAPE = (12, 20, 24)
GIB = 2**30


def _unets(n: int, seed: int = 3):
    import keras

    from model.unet import build_unet

    keras.utils.set_random_seed(seed)
    return [build_unet(4, 2) for _ in range(n)]


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> VolumeRef:
    d = tmp_path_factory.mktemp("scan")
    rng = np.random.default_rng(3)
    img = np.clip(phantom(SHAPE) / 3 + 0.08 * rng.standard_normal(SHAPE), 0, 1).astype(np.float32)
    with h5py.File(d / "vol.h5", "w") as f:
        f["image"] = img
    return VolumeRef(d / "vol.h5", "/image")


def _read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def _top_margin(plane_files, planes) -> np.ndarray:
    """Per voxel, the file path's lead of its best class over the second in Σ uint8 probabilities."""
    total = sum(_read(plane_files[p])["probabilities"].astype(np.int64) for p in planes)
    top = np.sort(total, axis=-1)
    return top[..., -1] - top[..., -2]


@pytest.mark.parametrize("n_models", [1, 2], ids=["one model", "2-fold ensemble"])
def test_host_and_device_paths_give_the_file_paths_outputs(scan, tmp_path, n_models):
    """3 and 9 planes, soft and majority votes, with and without the uncertainty maps (and an ensemble's fold
    disagreement): the host path bit for bit, the device path (TensorFlow on this CPU) within float rounding."""
    from model.resident_device import predict_on_device

    models = _unets(n_models)
    fold = n_models > 1
    predictor = models_predictor(models, batch_size=8, fold_disagreement=fold)
    src = Source(scan, SHAPE)
    files = {p: predict_plane(src, p, predictor, tmp_path / f"{p}.h5", model_id="m", batch_size=8, progress=False,
                              fold_disagreement=fold, rotation=CpuRotation(2), workers=2) for p in PLANE_SETS["9"]}
    for planes in ("3", "9"):
        names = PLANE_SETS[planes]
        host = predict_on_host(scan, SHAPE, names, predictor, vote="majority", uncertainty=True,
                               fold_disagreement=fold, batch_size=8, rotation=CpuRotation(2), workers=2, progress=False)
        device = predict_on_device(scan, SHAPE, names, models, depth=2, vote="majority", uncertainty=True,
                                   fold_disagreement=fold, batch_size=8, progress=False)
        margin = _top_margin(files, names)
        for vote in ("soft", "majority"):
            for uncertainty in (False, True):
                tag = f"{planes}-{vote}-{uncertainty}"
                ref = tmp_path / f"files-{tag}.h5"
                fuse_planes([files[p] for p in names], ref, method=vote, uncertainty=uncertainty, probabilities=True,
                            progress=False)
                for acc, where in ((host, "host"), (device, "device")):
                    write_outputs(acc, [(tmp_path / f"{where}-{tag}.h5", True, None)], vote=vote,
                                  uncertainty=uncertainty, meta={}, shape=SHAPE, progress=False)
                want, got_host, got_dev = (_read(tmp_path / f"{w}-{tag}.h5") for w in ("files", "host", "device"))
                assert sorted(want) == sorted(got_host) == sorted(got_dev), tag
                assert ("fold_disagreement" in want) == (fold and uncertainty), tag
                for k in want:
                    assert np.array_equal(want[k], got_host[k]), (tag, k)
                    # Device: probabilities within 1/255; labels equal wherever the file path's vote is not a near tie.
                    assert np.abs(want["probabilities"].astype(np.float32) - got_dev["probabilities"]).max() <= 1 / 255
                    clear = margin > 2 * len(names)
                    assert np.array_equal(want["labels"][clear], got_dev["labels"][clear]), tag
                    assert (want["labels"] != got_dev["labels"]).mean() < 0.002, tag
    # Not a trivial agreement: a random U-net spreads its labels over the classes.
    assert len(np.unique(want["labels"])) > 1


def test_votes_on_accumulated_totals_agree_on_numpy_and_on_the_device():
    import keras

    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, (9, 5, 6, 7, 4)).astype(np.uint8)
    stack[:, 0, 0, 0] = [60, 60, 60, 75]  # exact ties of sums and of ballots
    sums, counts = stack.sum(0, dtype=np.uint16), plane_votes(stack)
    lab = majority_vote_from_counts(counts, sums, 9)
    dev_lab = keras.ops.convert_to_numpy(majority_vote_from_counts(counts, sums, 9, keras.ops))
    assert np.array_equal(lab, dev_lab)
    assert np.array_equal(soft_vote_from_sums(sums), keras.ops.convert_to_numpy(soft_vote_from_sums(sums, keras.ops)))
    host_maps = uncertainty_from_totals(sums, counts, lab, 9)
    dev_maps = uncertainty_from_totals(sums, counts, lab, 9, keras.ops)
    for k in host_maps:
        assert np.array_equal(host_maps[k], keras.ops.convert_to_numpy(dev_maps[k])), k
    assert np.array_equal(mean_from_sums(sums, 9), keras.ops.convert_to_numpy(mean_from_sums(sums, 9, keras.ops)))


def test_auto_picks_the_device_then_ram_then_files_by_the_estimate():
    small = MemoryEstimate(1 * GIB, 0, 0, 1 * GIB, 0, 0, "host")
    dev = MemoryEstimate(1 * GIB, 0, 0, 1 * GIB, 0, 0, "device")
    kw = dict(host=small, device=dev)
    assert choose_fuse_on("auto", accelerator=True, device_free=80 * GIB, host_free=10 * GIB, **kw)[0] == "device"
    fuse_on, why = choose_fuse_on("auto", accelerator=True, device_free=2 * GIB, host_free=10 * GIB, **kw)
    assert fuse_on == "host" and "device's memory does not hold it" in why
    assert choose_fuse_on("auto", accelerator=False, device_free=80 * GIB, host_free=10 * GIB, **kw)[0] == "host"
    fuse_on, why = choose_fuse_on("auto", accelerator=False, device_free=None, host_free=2 * GIB, **kw)
    assert fuse_on == "files" and "2.00 GiB free" in why
    assert choose_fuse_on("auto", accelerator=True, device_free=80 * GIB, host_free=10 * GIB, files_only="--plane",
                          **kw) == ("files", "--plane")
    with pytest.raises(FuseOnError, match=r"--fuse-on host: needs ~2.00 GiB .* 2.00 GiB free RAM"):
        choose_fuse_on("host", accelerator=False, device_free=None, host_free=2 * GIB, **kw)
    with pytest.raises(FuseOnError, match="--fuse-on device: needs ~2.00 GiB"):
        choose_fuse_on("device", accelerator=True, device_free=GIB, host_free=10 * GIB, **kw)
    with pytest.raises(FuseOnError, match="not with --keep-planes"):
        choose_fuse_on("device", accelerator=True, device_free=80 * GIB, host_free=10 * GIB, files_only="--keep-planes",
                       **kw)


def test_the_paper_scan_on_an_80_gb_card_is_planned_on_the_device():
    """1200 × 1200 × 1000 at 5 µm, 9 planes, soft vote with the uncertainty maps, the paper's best model."""
    est = estimate_memory((1000, 1200, 1200), PLANE_SETS["9"], vote="soft", uncertainty=True, where="device")
    assert 30 * GIB < est.total < 0.8 * 80 * GIB
    assert est.accumulator == 1000 * 1200 * 1200 * (4 * 2 + 4)  # Σ P_i uint16 and the ballots uint8, 4 classes
    assert est.rotated_probabilities == 1556 * 1200 * 1556 * 3  # the largest rotated volume, K − 1 classes


def test_batch_size_follows_the_free_memory():
    assert auto_batch_size(GIB, 100 * GIB, 0, cap=64) == 64
    assert auto_batch_size(GIB, 20 * GIB, 2 * GIB, cap=64) == 8  # 14 fit: a multiple of 8
    assert auto_batch_size(GIB, 6 * GIB, 0, cap=64) == 4
    assert auto_batch_size(GIB, GIB, GIB, cap=64) == 1  # never 0: the plan then says it does not fit
    assert auto_batch_size(GIB, None, 0, cap=64) == 4


def test_the_estimate_bounds_what_the_host_path_holds(tmp_path):
    """tracemalloc sees every numpy buffer of the host path (the oracle stands in for the network)."""
    shape = (24, 28, 32)
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f["image"] = (phantom(shape) / 3).astype(np.float32)
    ref = VolumeRef(tmp_path / "vol.h5", "/image")
    tracemalloc.start()
    try:
        acc = predict_on_host(ref, shape, PLANE_SETS["9"], oracle, vote="majority", uncertainty=True,
                              rotation=CpuRotation(1), progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    est = estimate_memory(shape, PLANE_SETS["9"], vote="majority", uncertainty=True)
    assert 0.6 * est.total < peak < est.total, (peak, est.describe())
    assert acc.planes == 9


def test_run_prediction_says_where_it_fused_and_leaves_no_plane_files(scan, tmp_path, caplog):
    models = _unets(1)
    outs = {}
    for fuse_on in ("files", "host", "device"):
        info: dict = {}
        out = tmp_path / f"{fuse_on}.h5"
        with caplog.at_level("INFO", logger="model.predict"):
            run_prediction("m", scan, out, planes="9", model=(models[0], "m"), fuse_on=fuse_on, progress=False,
                           info=info, uncertainty=True, workers=2)
        assert info["fuse_on"] == fuse_on and info["batch_size"] >= 1 and info["precision"] == "float32"
        assert f"fuse on {fuse_on}" in caplog.text
        outs[fuse_on] = _read(out)
        with h5py.File(out, "r") as f:
            assert f.attrs["fuse_on"] == fuse_on and list(f.attrs["planes"]) == list(PLANE_SETS["9"])
        assert not (tmp_path / f"{fuse_on}.h5.planes").exists()
    assert info["estimate_bytes"]["total"] > info["estimate_bytes"]["accumulator"] > 0
    for k in outs["files"]:
        assert np.array_equal(outs["files"][k], outs["host"][k]), k
    assert (outs["files"]["labels"] != outs["device"]["labels"]).mean() < 0.002


def test_in_memory_paths_are_refused_where_plane_files_are_needed(scan, tmp_path):
    models = _unets(1)
    for kw, words in (({"keep_planes": True}, "--keep-planes"), ({"only_plane": "rc"}, "--plane"),
                      ({"max_disk": 1 << 30}, "--max-disk")):
        with pytest.raises(PredictError, match=f"--fuse-on host: not with {words}"):
            run_prediction("m", scan, tmp_path / "x.h5", model=(models[0], "m"), fuse_on="host", progress=False, **kw)
    with pytest.raises(PredictError, match="--fuse-on: must be one of"):
        run_prediction("m", scan, tmp_path / "x.h5", model=(models[0], "m"), fuse_on="gpu", progress=False)
    assert not any(tmp_path.iterdir())


def test_plan_falls_back_to_files_when_ram_holds_nothing(scan):
    models = _unets(1)
    plan = plan_prediction("auto", SHAPE, PLANE_SETS["9"], models, vote="soft", uncertainty=False,
                           fold_disagreement=False, batch_size=None, precision="float32", host_free=1 << 16)
    assert plan.fuse_on == "files" and "memory holds neither" in plan.why
    plan = plan_prediction("auto", SHAPE, PLANE_SETS["9"], models, vote="soft", uncertainty=False,
                           fold_disagreement=False, batch_size=None, precision="float32", host_free=8 * GIB)
    assert plan.fuse_on == "host" and plan.batch_size == 8


def test_a_model_trained_in_mixed_precision_predicts_in_float32_on_a_cpu(tmp_path):
    import keras

    from model.unet import build_unet, inference_precision, model_precision, with_precision

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        mixed = build_unet(4, 2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    assert model_precision(loaded) == "mixed_float16"  # the file keeps the training's policy
    assert inference_precision("auto", loaded, accelerator=False) == "float32"
    assert inference_precision("auto", loaded, accelerator=True) == "mixed_float16"
    single = with_precision(loaded, "float32")
    assert model_precision(single) == "float32" and single.get_layer("logits").dtype_policy.name == "float32"
    x = np.random.default_rng(0).random((1, 16, 16, 1)).astype(np.float32)
    assert np.abs(np.asarray(single(x)) - np.asarray(loaded(x))).max() < 0.05
