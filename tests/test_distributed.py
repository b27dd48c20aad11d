"""Data-parallel training on N replicas, proven on 4 logical CPU devices under the same MirroredStrategy as
4 GPUs (tests/conftest.py splits the CPU before TensorFlow starts), through the project's own training path.

Tracing a 4-replica training step costs ~30–45 s on 2 cores: the float32 tests share one built model (same
config, same strategy: model.training reuses it), in this order."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.folds import split_fold
from data.manifest import load_dataset
from data.pipeline import AugmentConfig
from data.volume import open_volume
from model.devices import DeviceError, allocated_gpus, training_devices
from model.training import STATE_FILE, TrainSettings, train_fold
from tests.conftest import PRE_BN_CONV_BIAS

REPO = Path(__file__).resolve().parents[1]
DEPTH = 1  # one pooling level: tracing a 4-replica step costs ~20 s here, 45 s at depth 2
TINY = dict(batch_size=4, val_crop=16, val_slice_step=6, final_slice_step=6, open_slabs=2, precision="float32",
            bn_recalibration_batches=0)


def _train(prepared_dataset, tmp_path, name: str, replicas, fold: int = 0, **settings):
    train, val = split_fold(load_dataset(prepared_dataset), fold)
    s = TrainSettings(**{**TINY, "max_iters": 3, "checkpoint_every": 3, "learning_rate": 1e-3, **settings},
                      cpu_replicas=replicas)
    models = []
    result = train_fold(width=2, depth=DEPTH, input_size=16, train_samples=train, val_samples=val, settings=s,
                        augment=AugmentConfig(), ckpt_dir=tmp_path / name,
                        on_start=lambda state, model, devices: models.append(model))
    return result, models[0], val


def _bn_cancelled(path: str) -> bool:
    """Conv biases that a BN follows (their gradient is 0 in exact arithmetic, so Adam steers float noise) and
    the BN moving means that contain them: compared through the model's outputs instead."""
    return bool(PRE_BN_CONV_BIAS.search(path)) or path.endswith("_up/bias") or path.endswith("moving_mean")


def test_four_replicas_train_the_same_weights_as_one_device(prepared_dataset, tmp_path):
    from model.unet import predict_full_slice

    out, models = {}, []
    for replicas in (None, 4):
        result, model, val = _train(prepared_dataset, tmp_path, f"r{replicas}", replicas)
        models.append(model)
        assert result.replicas == (replicas or 1) and model.distribute_strategy.num_replicas_in_sync == (replicas or 1)
        with open_volume(val[0].image) as vol:
            slices = np.stack([vol[i] for i in (3, 9, 15)]).astype(np.float32)
        weights = {v.path: np.array(v.numpy()) for v in model.weights}
        inference = predict_full_slice(model, slices, DEPTH, batch_size=3)
        batch_statistics = np.asarray(model(slices[..., None], training=True))  # BN over this batch: biases cancel
        out[replicas] = (weights, batch_statistics, inference, result.final_metrics)
    assert models[0] is not models[1]  # a model is reused only under the strategy it was built with
    (w1, y1, i1, m1), (w4, y4, i4, m4) = out[None], out[4]
    assert w1.keys() == w4.keys()
    flat1 = np.concatenate([w1[k].ravel() for k in w1])
    flat4 = np.concatenate([w4[k].ravel() for k in w1])
    assert np.linalg.norm(flat1 - flat4) / np.linalg.norm(flat1) < 1e-4
    compared = [k for k in w1 if not _bn_cancelled(k)]
    assert len(compared) > 20
    for k in compared:  # kernels, BN scale/offset and variance, the logits' bias
        rel = np.linalg.norm(w1[k] - w4[k]) / max(np.linalg.norm(w1[k]), 1e-12)
        assert rel < 1e-4, (k, rel)
    assert any(not np.array_equal(w1[k], w4[k]) for k in compared)  # two trainings, not one model twice
    # What the excluded tensors do together: the same logits on full slices with batch statistics; with the
    # moving means (which hold the noisy biases of earlier steps at momentum 0.99) within a bounded 2e-3.
    assert np.abs(y1 - y4).max() / np.abs(y1).max() < 1e-4
    assert np.abs(i1 - i4).max() / np.abs(i1).max() < 2e-3
    assert m1["mean_iou"] == pytest.approx(m4["mean_iou"], abs=1e-3)


def test_two_folds_in_one_worker_reuse_the_model_under_its_own_strategy(prepared_dataset, tmp_path):
    first, model0, _ = _train(prepared_dataset, tmp_path, "fold0", 4, fold=0)
    second, model1, _ = _train(prepared_dataset, tmp_path, "fold1", 4, fold=1)
    assert model1 is model0 and first.state.finished and second.state.finished
    assert (first.replicas, second.replicas) == (4, 4)
    assert first.device_kind == second.device_kind == "CPU stand-in"


class _Preempted(Exception):
    pass


def test_usr2_checkpoint_mid_chunk_and_resume_on_four_replicas_restore_weights_and_optimizer_exactly(
        prepared_dataset, tmp_path):
    import keras

    from model.training import checkpoint_files, load_weights, save_active_checkpoint
    from model.unet import build_unet

    train, val = split_fold(load_dataset(prepared_dataset), 3)
    s = TrainSettings(**{**TINY, "max_iters": 6, "checkpoint_every": 3}, cpu_replicas=4)
    kw = dict(width=2, depth=DEPTH, input_size=16, train_samples=train, val_samples=val, augment=AugmentConfig(),
              ckpt_dir=tmp_path / "ck", settings=s)
    seen = {}

    def usr2() -> None:  # what submitit's USR2 hook does (sweep.jobs.train.checkpoint_before_requeue), then the job ends
        assert save_active_checkpoint()
        model = seen["model"]
        seen["saved"] = ([keras.ops.convert_to_numpy(v) for v in model.optimizer.variables], model.get_weights())
        raise _Preempted

    with pytest.raises(_Preempted):
        train_fold(on_start=lambda st, m, d: seen.setdefault("model", m), on_first_step=usr2, **kw)
    state = json.loads((tmp_path / "ck" / STATE_FILE).read_text())
    assert state["iteration"] == 1 and not state["finished"]
    files = checkpoint_files(tmp_path / "ck")
    with np.load(files["optimizer"]) as npz:
        on_disk = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    disk_model = build_unet(2, DEPTH)
    load_weights(disk_model, files["weights"])
    at_start = []

    def on_start(state, model, devices):
        at_start.append(([keras.ops.convert_to_numpy(v) for v in model.optimizer.variables], model.get_weights(),
                         devices.replicas))

    resumed = train_fold(on_start=on_start, **kw)
    (opt, weights, replicas), = at_start
    assert replicas == 4 and resumed.state.resumed_from == [1] and resumed.state.iteration == 6
    saved_opt, saved_weights = seen["saved"]
    assert len(opt) == len(saved_opt) == len(on_disk)
    for a, b, c in zip(opt, saved_opt, on_disk):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert any(np.abs(a).sum() > 0 for a in opt[2:])  # Adam moments, not a fresh optimizer
    for a, b, c in zip(weights, saved_weights, disk_model.get_weights()):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_mixed_float16_on_four_replicas_keeps_a_positive_loss_scale_and_learns(prepared_dataset, tmp_path):
    import keras

    # BN statistics of the current weights before each validation: after 30 steps the moving averages
    # (momentum 0.99) still hold 74 % of their initial values, and the validation loss would not show learning.
    result, model, _ = _train(prepared_dataset, tmp_path, "mixed", 4, precision="mixed_float16", max_iters=30,
                              checkpoint_every=10, learning_rate=1e-2, bn_recalibration_batches=4)
    assert result.compute_dtype == "float16" and result.replicas == 4
    assert float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale)) > 0
    assert all(np.isfinite(w).all() for w in model.get_weights())
    losses = [h["val_loss"] for h in result.state.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def _twin_models(seed: int = 3):
    """The same weights in a 1-device U-net and a 4-replica one (synchronized BN, as training builds it)."""
    import keras

    from model.unet import build_unet

    devices = training_devices(4)
    keras.mixed_precision.set_global_policy("float32")  # whatever an earlier test in this process set
    keras.utils.set_random_seed(seed)
    one = build_unet(2, 2)
    with devices.strategy.scope():
        four = build_unet(2, 2, synchronized_bn=True)
    four.set_weights(one.get_weights())
    return one, four


def test_bn_recalibration_and_validation_on_four_replicas_match_one_device(prepared_dataset):
    from model.training import evaluate_slices, recalibrate_batch_norm

    one, four = _twin_models()
    rng = np.random.default_rng(0)
    batches = [rng.random((8, 16, 16, 1)).astype(np.float32) * (1 + i) for i in range(3)]
    assert recalibrate_batch_norm(one, batches) == recalibrate_batch_norm(four, batches) == 3
    # Statistics over the global batch, not per replica. Bounded, not bit-equal: synchronized BN computes the
    # variance in one pass, E[x²] − E[x]² from all-reduced sums, one device in two; the float32 rounding of that
    # compounds through the layers (measured: ≤ 2e-5 absolute, ≤ 4e-4 relative on values near 0).
    for a, b in zip(one.get_weights(), four.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    _, val = split_fold(load_dataset(prepared_dataset), 0)
    m1 = evaluate_slices(one, val, depth=2, planes=("rc", "cp", "pr"), step=5, crop=None, eval_batch=5)
    m4 = evaluate_slices(four, val, depth=2, planes=("rc", "cp", "pr"), step=5, crop=None, eval_batch=5)
    assert m4["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-5)
    for k in ("iou_bone", "iou_degradation_layer", "iou_residual_material", "mean_iou"):
        assert m4[k] == pytest.approx(m1[k], abs=1e-4) or (math.isnan(m1[k]) and math.isnan(m4[k]))


def test_full_slice_prediction_spreads_each_batch_over_the_replicas_and_equals_one_device():
    from model.unet import predict_full_slice

    one, four = _twin_models(seed=5)
    x = np.random.default_rng(1).random((5, 20, 28)).astype(np.float32)  # 5 slices on 4 replicas: one padded
    y1 = predict_full_slice(one, x, 2, batch_size=5, probabilities=True)
    y4 = predict_full_slice(four, x, 2, batch_size=5, probabilities=True)
    assert y4.shape == (5, 20, 28, 4)
    np.testing.assert_allclose(y4, y1, rtol=1e-5, atol=1e-6)
    # Where the work ran: the traced call holds the U-net's convolutions on each of the 4 devices.
    fn = four._replica_call_fns[False]
    graph = fn._list_all_concrete_functions()[0].graph
    devices = {op.device.split("/")[-1] for f in [graph, *[g.graph for g in graph._functions.values()
                                                            if hasattr(g, "graph")]]
               for op in f.get_operations() if op.type == "Conv2D"}
    assert {"device:CPU:0", "device:CPU:1", "device:CPU:2", "device:CPU:3"} <= devices, devices


@pytest.mark.parametrize("environ, given", [
    ({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, (4, "SLURM_GPUS_ON_NODE=4")),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, (2, "CUDA_VISIBLE_DEVICES=2,3")),
    ({"CUDA_VISIBLE_DEVICES": ""}, None), ({"CUDA_VISIBLE_DEVICES": "-1"}, None), ({}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None)])
def test_allocated_gpus_are_read_from_slurm_and_cuda(environ, given):
    assert allocated_gpus(environ) == given


def test_a_job_given_gpus_that_tensorflow_does_not_see_stops_naming_the_build():
    with pytest.raises(DeviceError, match=r"given 4 GPU\(s\) \(SLURM_GPUS_ON_NODE=4\) but TensorFlow 2\.\d+\.\d+ "
                                          r"\((CPU-only build|CUDA [\d.]+)\) sees 0"):
        training_devices(None, environ={"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    # Asked for CPU stand-ins, the same job trains on them.
    assert training_devices(4, environ={"SLURM_GPUS_ON_NODE": "4"}).replicas == 4


def test_a_run_given_gpus_it_cannot_see_is_recorded_failed_before_training(tmp_path):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    work.mkdir()
    uri = f"sqlite:///{work}/mlflow.db"
    env = dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO),
               CUDA_VISIBLE_DEVICES="0,1")
    env.pop("SLURM_GPUS_ON_NODE", None)
    p = subprocess.run([sys.executable, "-m", "sweep", "model.depth=2", "data.synth.size=32", "data.synth.n_train=4",
                        "data.synth.n_test=1", "train.max_iters=2", "train.checkpoint_every=2",
                        f"mlflow.tracking_uri={uri}", "mlflow.experiment=nogpu"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "given 2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1)" in errors[0], p.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nogpu").experiment_id])
    assert run.info.status == "FAILED" and "sees 0" in run.data.tags["failure_reason"]
    assert "train_loss" not in run.data.metrics  # stopped before its first step
    assert not list((work / "checkpoints").glob("*/fold0/state.json"))
