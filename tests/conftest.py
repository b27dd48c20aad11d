"""Shared fixtures: small real datasets on disk (HDF5 and TIFF), written with the project's own writers."""

from __future__ import annotations

import os
import re
import typing as tp
from pathlib import Path

from model.quiet import quiet_tensorflow_logs  # noqa: E402

quiet_tensorflow_logs()  # as every entry point: no CUDA error lines on this GPU-less machine

import h5py
import numpy as np
import pytest

from model.devices import ensure_cpu_devices

# Before TensorFlow starts: 4 logical CPU devices, so one pytest process trains on 1 replica (the default
# strategy) and on 4 (train.cpu_replicas=4, MirroredStrategy) and compares them (tests/test_distributed.py).
CPU_STAND_INS = 4
ensure_cpu_devices(CPU_STAND_INS)

from data.manifest import Sample, write_manifest
from data.volume import VolumeRef

ALLOYS = ("Mg-5Gd", "Mg-10Gd")
BEAMLINES = ("P05", "I13")


def structured_volume(shape: tp.Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels in blocks (so every plane sees all classes) and a uint16 image whose grey value encodes the class."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    lab = ((z // 4 + y // 5 + x // 6) % 4).astype(np.uint8)
    img = (lab.astype(np.int64) * 1000 + 500 + rng.integers(0, 100, lab.shape)).astype(np.uint16)
    return img, lab


def write_raw_dataset(root: Path, n_train: int = 8, n_test: int = 2, shape=(20, 24, 28), *, voxel_sizes=(5.0,),
                      seed: int = 0, fmt: str = "manifest.yaml") -> list[Sample]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n_train + n_test):
        sid = f"s{i:02d}"
        img, lab = structured_volume(shape, rng)
        with h5py.File(root / f"{sid}.h5", "w") as f:
            f.create_dataset("image", data=img, chunks=True)
            f.create_dataset("label", data=lab, chunks=True)
        test = i >= n_train
        samples.append(Sample(
            id=sid, image=VolumeRef(root / f"{sid}.h5", "/image"), label=VolumeRef(root / f"{sid}.h5", "/label"),
            voxel_size_um=voxel_sizes[i % len(voxel_sizes)], alloy=ALLOYS[i % 2], beamline=BEAMLINES[(i // 2) % 2],
            implantation_days=28.0 * (1 + i % 3), label_quality="HQ" if test else "WF", split="test" if test else "train",
            initial_volume_mm3=1.5, initial_surface_mm2=7.0))
    write_manifest(root, samples, name=fmt)
    return samples


@pytest.fixture
def raw_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    write_raw_dataset(root)
    return root


@pytest.fixture
def prepared_dataset(tmp_path: Path, raw_dataset: Path) -> Path:
    from data.prepare import prepare_dataset

    out = tmp_path / "prepared"
    prepare_dataset(raw_dataset, out)
    return out


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with size and mtime, to assert that nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


from tests.mlflow_server import mlflow_server  # noqa: E402,F401  (a real server, started once per session)

# The conv biases a BatchNorm follows (build_unet's ``<block>_conv<i>/bias``, and Adam's ``<block>_conv<i>_bias_*``
# for them): BN subtracts the channel mean, so their gradient is zero up to rounding and Adam's m/sqrt(v) steers
# that rounding; two trainings differ there as soon as one reduction sums in another order.
PRE_BN_CONV_BIAS = re.compile(r"_conv\d[/_]bias")


# Scopes pytest-xdist hands out first (make test: two workers, --dist loadgroup, scopes in collection order): the
# SLURM group, then the modules measured slowest alone on 2026-12-07 (seconds: 588, 183, 152, 125, 83, 66, 63, 63,
# 60): a long scope started last would leave one worker alone at the end.
SCOPES_FIRST = ("slurm", "test_sweep_local", "test_outage", "test_bad_inputs", "test_fusing", "test_sweep_run",
                "test_training", "test_pruning", "test_distributed")


def _group_in_node_id(item, group: str) -> None:
    """What pytest-xdist 3.8 does for an xdist_group (``<node id>@<group>``, the scope its scheduler splits off), for
    pytest 9.2: xdist sets ``item._nodeid``, which pytest 9 no longer reads (its node ids live in ``_id``), so without
    this every group silently falls back to one scope per test and two SLURM tests run at once (seen 2026-12-07)."""
    from _pytest.nodes import coerce_node_id

    if not item.nodeid.endswith(f"@{group}"):
        item._id = coerce_node_id(f"{item.nodeid}@{group}")
    assert item.nodeid.endswith(f"@{group}"), f"pytest no longer takes a node id this way: {item.nodeid}"


def xdist_scope(item) -> str:
    """The xdist group of a test: ``slurm`` for every test on the cluster, else its module."""
    return "slurm" if item.get_closest_marker("slurm") else item.module.__name__.rsplit(".", 1)[-1]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks into the node ids
def pytest_collection_modifyitems(config, items):
    """Every test on the one local SLURM cluster is marked ``slurm`` (``-m "not slurm"`` for a quick local run). They
    cancel leftover jobs and count the node's CPUs as their own: two of them must never run at once, so under
    pytest-xdist they are one group that one worker runs in order. Every other module is a group of its own (its
    module fixtures are built once), and the longest groups are queued first."""
    rank = {name: k for k, name in enumerate(SCOPES_FIRST)}
    order = {}
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
        group = xdist_scope(item)
        item.add_marker(pytest.mark.xdist_group(group))
        if getattr(config.option, "loadgroup", False):
            _group_in_node_id(item, group)
        order[item.nodeid] = rank.get(group, len(rank))
    items.sort(key=lambda item: order[item.nodeid])  # stable: the rest keep their order

