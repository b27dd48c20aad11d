"""No CUDA error lines where no GPU exists (issue 32): model.quiet picks TensorFlow's C++ log level per machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.quiet import AUTO, nvidia_devices_present, quiet_tensorflow_logs

REPO = Path(__file__).resolve().parents[1]


def test_the_level_follows_the_machine_and_keeps_the_users(tmp_path, monkeypatch):
    assert not nvidia_devices_present(tmp_path)
    (tmp_path / "nvidiactl").touch()
    assert nvidia_devices_present(tmp_path)
    monkeypatch.setattr("model.quiet.nvidia_devices_present", lambda: True)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.delenv(AUTO, raising=False)
    assert quiet_tensorflow_logs() == "0"  # the user's
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv(AUTO, "1")  # chosen on a login node without GPUs, inherited by a GPU job
    assert quiet_tensorflow_logs() == "2" and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"


@pytest.mark.skipif(nvidia_devices_present(), reason="a GPU machine keeps CUDA's messages (level 2)")
def test_importing_tensorflow_through_the_project_prints_no_cuinit_error_on_a_cpu_machine():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", AUTO)}
    code = "import model.unet, tensorflow as tf; print(tf.config.list_physical_devices())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cuInit" not in proc.stderr and "E0000" not in proc.stderr, proc.stderr[-2000:]
    bare = subprocess.run([sys.executable, "-c", "import tensorflow as tf; tf.config.list_physical_devices()"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert "cuInit" in bare.stderr  # without the project's level: the line this test is about
