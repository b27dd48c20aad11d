"""train.jit_compile on several replicas: XLA cannot compile Keras' distributed step here, so such a run is refused
in one line (a sweep before anything is queued, a job before its model is built); one replica keeps XLA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.folds import split_fold
from data.manifest import load_dataset
from data.pipeline import AugmentConfig
from model.devices import DeviceError, training_devices
from model.training import TrainSettings, _fresh_model, train_fold
from sweep.core.errors import ConfigError
from sweep.core.runplan import plan_run
from tests.test_stand_in import _cfg

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_xla_over_four_replicas_still_fails_in_tensorflow(precision):
    """Why the refusal exists; when a TensorFlow upgrade makes this pass, lift the refusal (model.devices.check_jit)."""
    import keras

    settings = TrainSettings(batch_size=4, seed=0, jit_compile=True, cpu_replicas=4, precision=precision)
    model = _fresh_model(2, 1, settings, training_devices(4))
    x = np.random.default_rng(0).random((4, 16, 16, 1), dtype=np.float32)
    y = np.zeros((4, 16, 16), np.int32)
    try:
        with pytest.raises(Exception, match="located in device .*CPU:1 from device .*CPU:0"):
            model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_train_fold_refuses_jit_on_four_replicas_before_building(prepared_dataset, tmp_path):
    train, val = split_fold(load_dataset(prepared_dataset), 0)
    s = TrainSettings(batch_size=4, max_iters=2, checkpoint_every=2, jit_compile=True, cpu_replicas=4,
                      precision="mixed_float16")
    built = []
    with pytest.raises(DeviceError, match=r"^train\.jit_compile: XLA cannot compile one training step over 4 "):
        train_fold(width=2, depth=1, input_size=16, train_samples=train, val_samples=val, settings=s,
                   augment=AugmentConfig(), ckpt_dir=tmp_path / "ckpt", on_start=lambda *a: built.append(a))
    assert not built and not (tmp_path / "ckpt").exists()


def test_plan_refuses_jit_on_cpu_replicas_and_keeps_it_on_one(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.jit_compile: XLA cannot compile one training step over 4 "):
        plan_run(_cfg(tmp_path, "train.jit_compile=true", "train.cpu_replicas=4", "train.batch_size=4"))
    jit = plan_run(_cfg(tmp_path, "train.jit_compile=true"))
    assert jit.settings.jit_compile
    assert jit.config_key == plan_run(_cfg(tmp_path)).config_key  # how a step runs, not what it computes


def test_a_four_gpu_sweep_with_jit_is_refused_before_anything_is_queued(tmp_path):
    env = dict(os.environ, SCALING_UNET_WORK=str(tmp_path / "work"), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "sweep.plan", "hydra/launcher=slurm_v100", "allow_stand_in=true",
                           "train.jit_compile=true", "train.precision=mixed_float16", "model.input_size=384,512"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("error: train.jit_compile: XLA cannot compile one training step over 4 replicas")
    assert lines[0].endswith("(2 of 2 configs; nothing was queued)")
    assert not (tmp_path / "work").exists()
