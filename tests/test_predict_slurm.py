"""`python -m sweep.predict` on the real local SLURM cluster: planes as ONE array, dependent fuse jobs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.slurm_fixture import slurm_cluster  # noqa: F401
from tests.test_predict import phantom
from tests.test_predict_cli import oracle_model

REPO = Path(__file__).resolve().parents[1]
START = time.strftime("%Y-%m-%dT%H:%M:%S")  # this session's jobs only
SLURM = ["hydra/launcher=slurm_v100", "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10", "hydra.launcher.poll_interval_s=1",
         "fuse.cpus=1", "fuse.mem_gb=1", "fuse.timeout_min=10", "progress=false"]


@pytest.fixture
def scans(tmp_path):
    for name, shape in (("a", (24, 20, 28)), ("b", (20, 24, 16))):
        lab = phantom(shape)
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f["image"] = (lab / 3).astype(np.float32)
            f["label"] = lab
    oracle_model().save(tmp_path / "oracle.keras")
    oracle_model(3).save(tmp_path / "three.keras")
    return tmp_path


def _launch(d: Path, name: str, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, SCALING_UNET_WORK=str(d / "work"), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "sweep.predict", "volumes=[a.h5,b.h5]", "planes=3", *SLURM,
           f"hydra.launcher.name=su-test-{name}", *overrides]
    return subprocess.Popen(cmd, cwd=d, env=env, stdout=open(d / f"{name}.log", "w"), stderr=subprocess.STDOUT)


def _sacct(cluster, *, name: str = "", jobs: tp.Sequence[str] = ()) -> dict[str, tuple[str, str, str, str]]:
    """Accounting of this run's jobs only (the database keeps earlier sessions' jobs of the same name)."""
    sel = [f"--jobs={','.join(jobs)}"] if jobs else [f"--name={name}", f"--starttime={START}"]
    out = cluster.run("sacct", "-X", "-n", "-P", *sel, "--format=JobID,State,Start,End,AllocTRES").stdout
    return {line.split("|")[0]: tuple(line.split("|")[1:]) for line in out.splitlines() if line}


def test_planes_array_then_fuse_jobs(slurm_cluster, scans):  # noqa: F811
    proc = _launch(scans, "pred", "model_uri=oracle.keras")
    assert proc.wait(timeout=300) == 0, (scans / "pred.log").read_text()[-3000:]
    log = (scans / "pred.log").read_text()
    assert "submitted 6 plane tasks (2 volumes × 3 planes) as ONE SLURM job array" in log
    for name in ("a", "b"):
        with h5py.File(scans / "predictions" / f"{name}.h5") as f, h5py.File(scans / f"{name}.h5") as g:
            np.testing.assert_array_equal(f["labels"][...], g["label"][...])
        assert not (scans / "predictions" / f"{name}.h5.planes").exists()
    array = re.search(r"ONE SLURM job array (\d+)", log).group(1)
    planes = _sacct(slurm_cluster, jobs=[array])
    fuses = _sacct(slurm_cluster, jobs=re.findall(r"fuse job (\d+) for", log))
    arrays = {k.split("_")[0] for k in planes}
    assert len(planes) == 6 and len(arrays) == 1 and all(v[0] == "COMPLETED" for v in planes.values())
    assert all("gres/gpu=4" in v[3] for v in planes.values())
    assert len(fuses) == 2 and all(v[0] == "COMPLETED" and "gpu" not in v[3] for v in fuses.values())
    # Each fuse job started after every plane task of its volume had ended (afterok dependency).
    ends = sorted(v[2] for v in planes.values())
    by_volume = [ends[:3], ends[3:]]
    starts = sorted(v[1] for v in fuses.values())
    assert starts[0] >= min(max(e) for e in by_volume) and starts[1] >= max(ends[:])  # ISO times sort as strings


def test_a_failed_plane_task_fails_only_its_volume(slurm_cluster, scans):  # noqa: F811
    proc = _launch(scans, "predfail", "model_uri=oracle.keras")
    array = None
    deadline = time.time() + 120
    while array is None and time.time() < deadline:
        out = slurm_cluster.run("squeue", "-h", "-r", "--name=su-test-predfail-planes", "-o", "%i").stdout.split()
        array = next((j.split("_")[0] for j in out), None)
        time.sleep(0.5)
    assert array, (scans / "predfail.log").read_text()[-2000:]
    slurm_cluster.run("scancel", f"{array}_4")  # a plane task of volume b
    assert proc.wait(timeout=300) == 1
    log = (scans / "predfail.log").read_text()
    assert "b.h5: FAILED" in log and "1 of 2 volumes FAILED" in log
    assert (scans / "predictions" / "a.h5").is_file() and not (scans / "predictions" / "b.h5").exists()


def test_bad_model_is_refused_before_anything_is_queued(slurm_cluster, scans):  # noqa: F811
    proc = _launch(scans, "predbad", "model_uri=three.keras")
    assert proc.wait(timeout=120) == 2
    log = (scans / "predbad.log").read_text()
    assert "nothing was queued" in log and "three.keras" in log and "3 classes" in log
    assert _sacct(slurm_cluster, name="su-test-predbad-planes") == {}


def test_in_memory_fusing_is_refused_for_slurm_plane_arrays_before_anything_is_queued(scans):
    """Plane tasks each predict one plane into a plane file: fuse_on=host/device cannot hold for them."""
    proc = _launch(scans, "refused", "model_uri=oracle.keras", "fuse_on=host")
    assert proc.wait(timeout=120) == 2
    log = (scans / "refused.log").read_text()
    assert "error: fuse_on=host: the SLURM launcher predicts each plane in its own array task" in log
    assert "submitted" not in log and not (scans / "predictions").exists()
    proc = _launch(scans, "refused2", "model_uri=oracle.keras", "fuse_on=gpu")
    assert proc.wait(timeout=120) == 2
    assert "error: fuse_on: must be one of" in (scans / "refused2.log").read_text()
