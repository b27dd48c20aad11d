"""``python -m model.predict`` end to end with real Keras models, real HDF5 files and an MLflow store."""

from __future__ import annotations

import collections

import h5py
import numpy as np
import pytest

from model.evaluation import confusion_matrix, iou_per_class
from model.predict import main
from tests.test_predict import phantom

SHAPE = (24, 20, 28)


def oracle_model(num_classes: int = 4):
    """A saved Keras model that knows the answer for images = label / 3.

    softmax(−8 (3x − k)²) over k equals softmax(48 k x − 8 k²) (the x² term is common to all
    classes), so one 1×1 convolution is the oracle; a zero-weighted pool/upsample branch gives the
    model a depth (one MaxPooling2D) as the full-slice padding needs.
    """
    import keras

    x = keras.Input((None, None, 1))
    k = np.arange(num_classes, dtype=np.float32)
    head = keras.layers.Conv2D(num_classes, 1, name="oracle")
    down = keras.layers.UpSampling2D(2)(keras.layers.MaxPooling2D(2)(x))
    zero = keras.layers.Conv2D(num_classes, 1, use_bias=False, kernel_initializer="zeros", name="zero")
    model = keras.Model(x, keras.layers.Add()([head(x), zero(down)]))
    head.set_weights([(48 * k).reshape(1, 1, 1, num_classes), -8 * k ** 2])
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    lab = phantom(SHAPE)
    with h5py.File(d / "vol.h5", "w") as f:
        f["image"] = (lab / 3).astype(np.float32)
        f["label"] = lab
        bad = (lab / 3).astype(np.float32)
        bad[3, 4, 5] = np.nan
        f["nan"] = bad
        f["range"] = (lab / 3).astype(np.float32) * 1.5
    oracle_model().save(d / "oracle.keras")
    oracle_model(3).save(d / "three.keras")
    return d


def run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv] + ["--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_nine_planes_majority_vote_end_to_end(files, tmp_path, capsys):
    out = tmp_path / "seg.h5"
    rc, msg = run(capsys, files / "oracle.keras", files / "vol.h5", "--planes", "9", "--vote", "majority", "--out", out,
                  "--probabilities", "--tiff", tmp_path / "seg.tif")
    assert rc == 0, msg
    with h5py.File(out) as f, h5py.File(files / "vol.h5") as g:
        labels, ref = f["labels"][...], g["label"][...]
        assert labels.dtype == np.uint8 and f["probabilities"].shape == SHAPE + (4,)
        assert f.attrs["vote"] == "majority" and len(f.attrs["planes"]) == 9
    assert np.all(iou_per_class(confusion_matrix(ref, labels)) >= 0.95)
    # Plane files are gone, nothing else was left beside the outputs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.h5", "seg.tif"]


def test_model_from_an_mlflow_run(files, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.log_artifact(run_id, str(files / "oracle.keras"), "model")
    out = tmp_path / "seg.h5"
    rc, msg = run(capsys, f"runs:/{run_id}/model", files / "vol.h5", "--planes", "rc", "--out", out, "--tracking-uri", uri)
    assert rc == 0, msg
    with h5py.File(out) as f, h5py.File(files / "vol.h5") as g:
        np.testing.assert_array_equal(f["labels"][...], g["label"][...])
    rc, msg = run(capsys, "runs:/0123456789abcdef/model", files / "vol.h5", "--out", tmp_path / "x.h5", "--tracking-uri", uri)
    assert rc == 2 and "MODEL" in msg and not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("dataset, words", [("nan", ["NaN", "(3, 4, 5)"]), ("range", ["outside [0, 1]"])])
def test_bad_volume_is_refused_before_any_prediction(files, tmp_path, capsys, dataset, words):
    rc, msg = run(capsys, files / "oracle.keras", files / "vol.h5", "--dataset", dataset, "--out", tmp_path / "o.h5")
    assert rc == 2 and "vol.h5" in msg and f"/{dataset}" in msg
    assert all(w in msg for w in words), msg
    assert list(tmp_path.iterdir()) == []


def test_wrong_number_of_classes(files, tmp_path, capsys):
    rc, msg = run(capsys, files / "three.keras", files / "vol.h5", "--out", tmp_path / "o.h5")
    assert rc == 2 and "three.keras" in msg and "3 classes" in msg and "expected 4" in msg
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(files, tmp_path, capsys):
    out = tmp_path / "o.h5"
    out.write_bytes(b"precious")
    rc, msg = run(capsys, files / "oracle.keras", files / "vol.h5", "--planes", "rc", "--out", out)
    assert rc == 2 and "--out" in msg and "--overwrite" in msg
    assert out.read_bytes() == b"precious"
    rc, msg = run(capsys, files / "oracle.keras", files / "vol.h5", "--planes", "rc", "--out", out, "--overwrite")
    assert rc == 0, msg
    with h5py.File(out) as f:
        assert f["labels"].shape == SHAPE


def test_too_little_disk(files, tmp_path, capsys, monkeypatch):
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    rc, msg = run(capsys, files / "oracle.keras", files / "vol.h5", "--planes", "9", "--out", tmp_path / "o.h5")
    assert rc == 2 and "too little disk" in msg and "GiB" in msg
    assert list(tmp_path.iterdir()) == []


def test_plane_task_then_fuse_step(files, tmp_path, capsys):
    work = tmp_path / "planes"
    for plane in ("rc", "cp", "pr"):
        rc, msg = run(capsys, files / "oracle.keras", files / "vol.h5", "--planes", "3", "--plane", plane,
                      "--work-dir", work, "--out", tmp_path / "o.h5")
        assert rc == 0, msg
    assert sorted(p.name for p in work.iterdir()) == ["cp.h5", "pr.h5", "rc.h5"]
    assert not (tmp_path / "o.h5").exists()
    rc, msg = run(capsys, "unused.keras", files / "vol.h5", "--planes", "3", "--fuse-only", "--work-dir", work,
                  "--out", tmp_path / "o.h5")
    assert rc == 0, msg
    with h5py.File(tmp_path / "o.h5") as f, h5py.File(files / "vol.h5") as g:
        np.testing.assert_array_equal(f["labels"][...], g["label"][...])


def test_tiff_folder_volume(files, tmp_path, capsys):
    import tifffile

    folder = tmp_path / "scan"
    folder.mkdir()
    with h5py.File(files / "vol.h5") as f:
        image, ref = f["image"][...], f["label"][...]
    for z in range(image.shape[0]):
        tifffile.imwrite(folder / f"slice_{z}.tif", image[z])  # natural sort: slice_10 after slice_9
    rc, msg = run(capsys, files / "oracle.keras", folder, "--planes", "3", "--out", tmp_path / "o.h5")
    assert rc == 0, msg
    with h5py.File(tmp_path / "o.h5") as f:
        np.testing.assert_array_equal(f["labels"][...], ref)


def test_fold_models_predict_as_one_ensemble_the_mean_of_their_probabilities(files, tmp_path, capsys):
    """Two different models (the oracle, and the oracle with its class scores divided by 16): the ensemble's probabilities
    equal the mean of the single models' (to the plane files' uint8 steps), and the output names both models."""
    import keras

    soft = oracle_model()
    head = soft.get_layer("oracle")
    w, b = head.get_weights()
    head.set_weights([w / 16, b / 16])
    soft.save(tmp_path / "soft.keras")
    outs = {}
    for name, models in (("oracle", [files / "oracle.keras"]), ("soft", [tmp_path / "soft.keras"]),
                         ("both", [files / "oracle.keras", tmp_path / "soft.keras"])):
        out = tmp_path / f"{name}.h5"
        rc, text = run(capsys, *models, files / "vol.h5", "--planes", "3", "--out", out, "--probabilities")
        assert rc == 0, text
        with h5py.File(out, "r") as f:
            outs[name] = f["probabilities"][...].astype(np.float32)
            if name == "both":
                assert [str(m) for m in f.attrs["models"]] == [str(m) for m in models]
    mean = (outs["oracle"] + outs["soft"]) / 2
    assert np.abs(outs["both"] - mean).max() <= 2.5 / 255  # quantized planes: one uint8 step each, then the mean
    assert np.abs(outs["oracle"] - outs["soft"]).max() > 0.1  # the two models do differ
    rc, text = run(capsys, files / "oracle.keras", files / "oracle.keras", files / "vol.h5", "--out", tmp_path / "d.h5")
    assert rc == 2 and "is given more than once" in text
    keras.backend.clear_session()


def test_fold_majority_vote_counts_labels_where_soft_voting_weighs_confidence():
    """Two folds say bone at 0.4, one says residual material at 0.97: the soft vote follows the confident fold, the
    majority vote the two; the majority's output is the vote share per class (the planes then count votes)."""
    from model.predict import PredictError, ensemble_predictor

    def fold(p):
        return lambda slices: np.broadcast_to(np.asarray(p, np.float32), slices.shape + (4,))

    folds = [fold([0.3, 0.4, 0.0, 0.3]), fold([0.3, 0.4, 0.0, 0.3]), fold([0.01, 0.01, 0.01, 0.97])]
    slices = np.zeros((2, 3, 5), np.float32)
    soft = ensemble_predictor(folds, "soft")(slices)
    majority = ensemble_predictor(folds, "majority")(slices)
    assert (soft.argmax(-1) == 3).all() and (majority.argmax(-1) == 1).all()
    np.testing.assert_allclose(majority[0, 0, 0], [0, 2 / 3, 0, 1 / 3])
    with pytest.raises(PredictError, match="--fold-vote"):
        ensemble_predictor(folds, "median")


def test_sweep_predict_best_is_the_fold_ensemble_of_the_best_config(files, tmp_path):
    """``model_uri=best``: the config with the highest mean IoU over its 4 FINISHED folds, its fold models fetched
    from MLflow (runs:/<id>/model) and predicted as one ensemble; the output names the 4 runs."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    work.mkdir()
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.create_experiment("scaling-unet", artifact_location=str(tmp_path / "artifacts"))
    best_runs = []
    for key, iou in (("aaaaaaaaaaaa", 0.9), ("bbbbbbbbbbbb", 0.5)):
        for fold in range(4):
            r = client.create_run(exp, tags={"config_key": key, "fold": str(fold)})
            client.log_metric(r.info.run_id, "mean_iou", iou + fold / 100)
            client.log_artifact(r.info.run_id, str(files / "oracle.keras"), "model")
            client.set_terminated(r.info.run_id, "FINISHED")
            if key == "aaaaaaaaaaaa":
                best_runs.append(r.info.run_id)
    out_dir = tmp_path / "pred"
    res = subprocess.run([sys.executable, "-m", "sweep.predict", "model_uri=best", f"volumes=[{files / 'vol.h5'}]",
                          "planes=3", f"out_dir={out_dir}", "progress=false"], cwd=tmp_path,
                         env=dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with h5py.File(out_dir / "vol.h5", "r") as f:
        assert [str(m) for m in f.attrs["models"]] == [f"runs:/{i}/model" for i in best_runs]
        labels = f["labels"][...]
        with h5py.File(files / "vol.h5", "r") as g:
            assert (labels == g["label"][...]).mean() > 0.99  # the oracle's answer, four times
    none = subprocess.run([sys.executable, "-m", "sweep.predict", "model_uri=cccccccccccc",
                           f"volumes=[{files / 'vol.h5'}]", f"out_dir={tmp_path / 'x'}"], cwd=tmp_path,
                          env=dict(os.environ, SCALING_UNET_WORK=str(work)), capture_output=True, text=True, timeout=300)
    assert none.returncode == 2 and "model_uri=cccccccccccc: no training run of config cccccccccccc" in none.stderr


def test_a_plane_file_of_an_ensemble_keeps_the_fold_disagreement_on_the_original_grid(tmp_path):
    """Three folds, one of which swaps bone and degradation layer: where the truth is either, 1 of 3 folds disagrees
    with the ensemble (255/3); elsewhere none. Exact on an axis plane; a 45° plane rotated back samples it like a class
    probability (a fraction in [0, 1]), so it matches inside the volume."""
    from data.volume import VolumeRef
    from model.inference import Source, predict_plane
    from model.predict import ensemble_predictor
    from tests.test_predict import oracle

    def bone_as_dl(slices):
        p = oracle(slices)
        return p[..., [0, 2, 1, 3]]  # swaps the bone and degradation layer columns

    lab = __import__("tests.test_predict", fromlist=["phantom"]).phantom(SHAPE)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["image"] = (lab / 3).astype(np.float32)
    source = Source(VolumeRef(tmp_path / "v.h5", "/image"), SHAPE)
    predictor = ensemble_predictor([oracle, oracle, bone_as_dl], fold_disagreement=True)
    want = np.where((lab == 1) | (lab == 2), 85, 0)
    for plane in ("rc", "cp_r0"):
        path = predict_plane(source, plane, predictor, tmp_path / f"{plane}.h5", model_id="3 folds", progress=False,
                             fold_disagreement=True)
        with h5py.File(path, "r") as f:
            got = f["fold_disagreement"][...].astype(int)
            labels = f["probabilities"][...].argmax(-1)
        inner = (slice(3, -3),) * 3
        if plane == "rc":
            np.testing.assert_array_equal(got, want)
        else:
            assert np.abs(got - want)[inner].mean() < 8 and (labels[inner] == lab[inner]).mean() > 0.9
    # A plane file made without the map is not reused when the map is asked for.
    plain = predict_plane(source, "pr", ensemble_predictor([oracle, oracle]), tmp_path / "pr.h5", model_id="2",
                          progress=False)
    predict_plane(source, "pr", ensemble_predictor([oracle, oracle], fold_disagreement=True), plain, model_id="2",
                  progress=False, fold_disagreement=True)
    with h5py.File(plain, "r") as f:
        assert not f["fold_disagreement"][...].any()


def test_an_ensemble_writes_the_fold_disagreement_map_beside_the_plane_disagreement(files, tmp_path, capsys):
    oracle, soft, swapped = oracle_model(), oracle_model(), oracle_model()
    w, b = soft.get_layer("oracle").get_weights()
    soft.get_layer("oracle").set_weights([w / 16, b / 16])
    swapped.get_layer("oracle").set_weights([w[..., [0, 2, 1, 3]], b[[0, 2, 1, 3]]])  # bone <-> degradation layer
    for name, m in (("oracle", oracle), ("soft", soft), ("swapped", swapped)):
        m.save(tmp_path / f"{name}.keras")
    out = tmp_path / "e.h5"
    rc, text = run(capsys, *(tmp_path / f"{n}.keras" for n in ("oracle", "soft", "swapped")), files / "vol.h5",
                   "--planes", "3", "--out", out, "--uncertainty")
    assert rc == 0, text
    lab = h5py.File(files / "vol.h5", "r")["label"][...]
    with h5py.File(out, "r") as f:
        assert {"confidence", "disagreement", "plane_classes", "fold_disagreement"} <= set(f)
        np.testing.assert_array_equal(f["fold_disagreement"][...], np.where((lab == 1) | (lab == 2), 85, 0))
        np.testing.assert_array_equal(f["labels"][...], lab)
    rc, text = run(capsys, tmp_path / "oracle.keras", files / "vol.h5", "--planes", "3", "--out", tmp_path / "one.h5",
                   "--uncertainty")
    assert rc == 0 and "fold_disagreement" not in h5py.File(tmp_path / "one.h5", "r")


def test_a_four_fold_ensemble_predicts_in_the_memory_of_one_model(tmp_path):
    """Peak numpy memory (tracemalloc) of a plane task, rotated plane included, with 4 folds vs 1: the ensemble holds
    one slice batch of every model, never a volume of probabilities per fold (4 × 9 × K would be ~36× the volume)."""
    import tracemalloc

    from data.volume import VolumeRef
    from model.inference import Source, predict_plane
    from model.predict import ensemble_predictor
    from tests.test_predict import oracle

    shape = (48, 48, 48)
    lab = __import__("tests.test_predict", fromlist=["phantom"]).phantom(shape)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["image"] = (lab / 3).astype(np.float32)
    source = Source(VolumeRef(tmp_path / "v.h5", "/image"), shape)
    folds = [lambda s, i=i: oracle(s) for i in range(4)]
    peaks = {}
    for n in (1, 4):
        tracemalloc.start()
        for plane in ("rc", "cp_r0"):
            predict_plane(source, plane, ensemble_predictor(folds[:n], fold_disagreement=True),
                          tmp_path / f"{n}-{plane}.h5", model_id=str(n), progress=False, fold_disagreement=True)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    volume_probs = np.prod(shape) * 4 * 4  # one volume of float32 class probabilities
    # Holding the 4 folds' probabilities of even one plane would take 4 volumes; the slabs and rotation buffers
    # of one model are the whole peak.
    assert peaks[4] < 1.2 * peaks[1] and peaks[4] < 4 * volume_probs, (peaks, volume_probs)
