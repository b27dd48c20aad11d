#!/usr/bin/env bash
# Wheels the GPU machines lack for benchmarks/gpu_check.py (they have JAX, numpy, h5py, no Keras):
# downloads Keras, its small pure-Python dependencies and nvidia-ml-py (NVML: GPU use and power) for Python 3.12 into .whl/ (git-ignored).
# The device call then carries .whl and starts with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
py=${PYTHON:-.venv/bin/python}
for pkg in keras==3.15.1 namex==0.1.0 optree==0.20.0 nvidia-ml-py==13.615.71; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pkg"
done
ls -la .whl
