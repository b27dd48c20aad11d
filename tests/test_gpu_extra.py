"""The install extras: the base pins tensorflow (CPU and GPU), ``.[gpu]`` adds NVIDIA's CUDA wheels, and
tensorflow-cpu (same module files as tensorflow: never side by side) appears nowhere.

The resolution test asks uv, the installer ``make venv-gpu`` runs on a GPU node, to resolve ``.[gpu]``
(``uv pip compile``): it needs the package index's metadata only and installs nothing. It gives the same 158
packages at the same versions as ``pip install --dry-run '.[gpu]'`` (checked 2026-12-07), in 3 s instead of 47 s.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
TF = "2.21.0"


def _name(req: str) -> str:
    return re.split(r"[\[=<>!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_base_pins_tensorflow_and_the_gpu_extra_only_adds_cuda():
    deps = PROJECT["dependencies"]
    assert f"tensorflow=={TF}" in deps
    every = deps + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    assert "tensorflow-cpu" not in {_name(r) for r in every}
    assert PROJECT["optional-dependencies"]["gpu"] == [f"tensorflow[and-cuda]=={TF}"]


@pytest.mark.slow
def test_gpu_extra_resolves_to_tensorflow_with_nvidia_cuda_wheels_and_every_pin(tmp_path):
    # The project's metadata in a folder of its own: the checkout stays untouched.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    uv = Path(sys.executable).with_name("uv")  # the test extra pins it (the Makefile's installer)
    proc = subprocess.run([str(uv), "pip", "compile", "--quiet", "--no-header", "--no-annotate",
                           "--python-version", platform.python_version(), str(tmp_path / "pyproject.toml"),
                           "--extra", "gpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(line.split("==", 1) for line in proc.stdout.split() if "==" in line)
    got = {_name(n): v for n, v in got.items()}
    assert len(got) > 100, proc.stdout[-3000:]
    assert got.get("tensorflow") == TF, got.get("tensorflow")
    assert "tensorflow-cpu" not in got
    nvidia = {n for n in got if n.startswith("nvidia-")}
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12", "nvidia-nccl-cu12"} <= nvidia, nvidia
    for req in PROJECT["dependencies"]:  # every other pin holds beside the CUDA build
        if "==" in req:
            pinned = req.split("==")[1].split(";")[0].strip()
            assert got.get(_name(req)) == pinned, (req, got.get(_name(req)))
