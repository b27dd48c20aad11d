"""Bad inputs a user can produce, table-driven, through the real CLIs on real files.

Every case runs the command as a user would (a subprocess from the repository root) and asserts: exit
status 2, exactly one ``error:`` line on stderr that names the file or field, no traceback, and nothing
written or changed under the case's folder. README "Refused inputs" lists the same cases.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import tree_snapshot, write_raw_dataset

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    setup: tp.Callable[[Path], list[str]]  # makes the bad input under the folder, returns the command's args
    names: str  # what the error line must mention (a file name or a field)
    exit_code: int = 2


def run_cli(args: list[str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_clear_error(proc: subprocess.CompletedProcess, names: str, exit_code: int = 2) -> None:
    err = proc.stderr
    assert proc.returncode == exit_code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err[-3000:]
    assert names in lines[0], (names, lines[0])


# ------------------------------------------------------------------------------------------- builders


def _raw(root: Path, **kw) -> Path:
    write_raw_dataset(root / "raw", n_train=2, n_test=1, shape=(8, 10, 12), **kw)
    return root / "raw"


def _constant_image(root: Path) -> list[str]:
    raw = _raw(root)
    with h5py.File(next(raw.glob("*.h5")), "r+") as f:
        f["image"][...] = 1000
    return ["-m", "data.prepare", str(raw), "--out", str(root / "prepared")]


def _slab_mb(value: int) -> tp.Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        return ["-m", "data.prepare", str(_raw(root)), "--out", str(root / "prepared"), "--slab-mb", str(value)]
    return setup


def _prepare_out_is_file(root: Path) -> list[str]:
    raw = _raw(root)
    (root / "taken").write_text("x")
    return ["-m", "data.prepare", str(raw), "--out", str(root / "taken")]


def _prepare_corrupt_h5(root: Path) -> list[str]:
    raw = _raw(root)
    next(raw.glob("*.h5")).write_bytes(b"not an hdf5 file")
    return ["-m", "data.prepare", str(raw), "--out", str(root / "prepared")]


def _prepare_label_shape(root: Path) -> list[str]:
    raw = _raw(root)
    with h5py.File(next(raw.glob("*.h5")), "r+") as f:
        del f["label"]
        f["label"] = np.zeros((8, 10, 11), np.uint8)
    return ["-m", "data.prepare", str(raw), "--out", str(root / "prepared")]


def _prepare_no_manifest(root: Path) -> list[str]:
    (root / "empty").mkdir()
    return ["-m", "data.prepare", str(root / "empty"), "--out", str(root / "prepared")]


def _synth_size(root: Path) -> list[str]:
    return ["-m", "data.synth", "--out", str(root / "synth"), "--size", "0"]


def _show_missing(root: Path) -> list[str]:
    return ["-m", "data.show", str(root / "nope"), "--sample", "a", "--out", str(root / "x.png")]


def _volume(root: Path, shape=(8, 16, 16)) -> Path:
    with h5py.File(root / "vol.h5", "w") as f:
        f["image"] = np.random.default_rng(0).random(shape, dtype=np.float32)
    return root / "vol.h5"


def _garbage_model(root: Path) -> list[str]:
    (root / "model.keras").write_bytes(b"garbage, not a zip archive" * 10)
    return ["-m", "model.predict", str(root / "model.keras"), str(_volume(root)), "--out", str(root / "seg.h5"),
            "--no-progress"]


def _analysis(what: str, uri: tp.Callable[[Path], str], out: tp.Optional[tp.Callable[[Path], str]] = None):
    def setup(root: Path) -> list[str]:
        args = ["-m", "analysis", what, "--tracking-uri", uri(root)]
        return args + (["--out", out(root)] if out else ["--out", str(root / "reports")])
    return setup


def _not_a_database(root: Path) -> str:
    (root / "mlflow.db").write_text("this is not a database\n" * 10)
    return f"sqlite:///{root / 'mlflow.db'}"


def _empty_file_db(root: Path) -> str:
    (root / "mlflow.db").write_bytes(b"")
    return f"sqlite:///{root / 'mlflow.db'}"


def _file_as_out(root: Path) -> str:
    (root / "reports").write_text("a file")
    return str(root / "reports")


CASES = [
    Case("prepare: constant image", _constant_image, "every voxel is 1000"),
    Case("prepare: --slab-mb 0", _slab_mb(0), "slab_mb"),
    Case("prepare: --slab-mb -5", _slab_mb(-5), "slab_mb"),
    Case("prepare: --out is a file", _prepare_out_is_file, "taken"),
    Case("prepare: corrupt HDF5", _prepare_corrupt_h5, ".h5"),
    Case("prepare: label shape differs", _prepare_label_shape, "label shape"),
    Case("prepare: folder without manifest", _prepare_no_manifest, "empty"),
    Case("synth: --size 0", _synth_size, "size"),
    Case("show: missing dataset", _show_missing, "nope"),
    Case("predict: a garbage file named model.keras", _garbage_model, "not a Keras model file"),
    Case("analysis reports: --out is a file", _analysis("reports", lambda r: f"sqlite:///{r / 'none.db'}", _file_as_out),
         "--out"),
    Case("analysis reports: sqlite file that is not a database", _analysis("reports", _not_a_database), "mlflow.db"),
    Case("analysis reports: empty sqlite file", _analysis("reports", _empty_file_db), "mlflow.db"),
    Case("analysis fig3: unknown URI scheme", _analysis("fig3", lambda r: "foo://bar"), "foo"),
    Case("analysis table2: missing sqlite file", _analysis("table2", lambda r: f"sqlite:///{r / 'none.db'}"), "none.db"),
    Case("analysis fig3: unreachable server", _analysis("fig3", lambda r: "http://127.0.0.1:1"), "127.0.0.1:1"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_clear_error_and_writes_nothing(case: Case, tmp_path: Path):
    args = case.setup(tmp_path)
    before = tree_snapshot(tmp_path)
    dirs_before = sorted(p for p in tmp_path.rglob("*") if p.is_dir())
    proc = run_cli(args)
    assert_one_clear_error(proc, case.names, case.exit_code)
    assert tree_snapshot(tmp_path) == before, "files were written or changed"
    assert sorted(p for p in tmp_path.rglob("*") if p.is_dir()) == dirs_before, "folders were created"


def test_a_model_without_pooling_is_accepted(tmp_path: Path):
    # Issue 13, 15: a fully convolutional model needs no padding multiple (depth 0); it was refused.
    import keras

    inp = keras.Input((None, None, 1))
    model = keras.Model(inp, keras.layers.Conv2D(4, 3, padding="same")(inp))
    model.save(tmp_path / "flat.keras")
    vol = _volume(tmp_path, shape=(5, 13, 11))
    proc = run_cli(["-m", "model.predict", str(tmp_path / "flat.keras"), str(vol), "--planes", "rc",
                    "--out", str(tmp_path / "seg.h5"), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(tmp_path / "seg.h5") as f:
        assert f["labels"].shape == (5, 13, 11)
