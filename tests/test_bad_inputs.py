"""Bad inputs a user can produce, table-driven, through the real CLIs on real files.

Every case runs the command as a user would, ``python -m <module> ...`` in a process of its own from the
repository root, and asserts: exit status 2, exactly one ``error:`` line on stderr that names the file or
field, no traceback, and nothing written or changed under the case's folder. README "Refused inputs" lists
the same cases. The processes are forks of one that imported the commands' libraries once
(tests/forked_cli.py: 1.5-2.5 s of imports per case otherwise); the case that saves a Keras model runs a
fresh interpreter.
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
from tests.forked_cli import ForkedCli

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    setup: tp.Callable[[Path], list[str]]  # makes the bad input under the folder, returns the command's args
    names: str  # what the error line must mention (a file name or a field)
    exit_code: int = 2
    in_case_folder: bool = False  # run from the case folder: a store MLflow creates in the cwd would show


# What the commands import before they look at their input; never TensorFlow (tests/forked_cli.py).
PRELOAD = ("numpy", "h5py", "scipy.ndimage", "pandas", "matplotlib", "omegaconf", "hydra", "mlflow",
           "data.prepare", "data.synth", "data.show", "model.predict", "model.summary", "analysis.__main__",
           "analysis.segment", "analysis.measures", "analysis.calibrate", "sweep.__main__", "sweep.plan",
           "sweep.status", "sweep.predict")


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def forked() -> tp.Iterator[ForkedCli]:
    with ForkedCli(PRELOAD, cwd=REPO, env=cli_env()) as cli:
        yield cli


def run_cli(args: list[str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


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


def _tiny_model(root: Path) -> Path:
    import keras

    inp = keras.Input((None, None, 1))
    keras.Model(inp, keras.layers.Conv2D(4, 3, padding="same")(inp)).save(root / "m.keras")
    return root / "m.keras"


def _predict(out: tp.Callable[[Path], list[str]]) -> tp.Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        return ["-m", "model.predict", str(_tiny_model(root)), str(_volume(root)), "--planes", "rc", "--no-progress",
                *out(root)]
    return setup


def _segment(*extra: str, aniso: bool = False, scan: str = "random") -> tp.Callable[[Path], list[str]]:
    """analysis.segment on a raw scan (without, or with anisotropic, voxel-size metadata; or ``scan`` missing, a
    text file named .h5, constant) and a garbage model: the scan's checks come before the model is even opened."""
    def setup(root: Path) -> list[str]:
        vol = _volume(root)
        if aniso:
            with h5py.File(vol, "a") as f:
                f["image"].attrs["element_size_um"] = [5.0, 2.5, 2.5]
        if scan == "missing":
            vol.unlink()
        elif scan == "text":
            vol.write_text("not an HDF5 file")
        elif scan == "constant":
            with h5py.File(vol, "w") as f:
                f["image"] = np.full((8, 16, 16), 7.0, np.float32)
                f["image"].attrs["voxel_size_um"] = 2.5
        (root / "model.keras").write_bytes(b"garbage")
        return ["-m", "analysis.segment", str(vol), "--model", str(root / "model.keras"), "--model-voxel-size", "5",
                "--out", str(root / "result"), "--no-progress", *extra]
    return setup


def _file(root: Path, name: str) -> Path:
    (root / name).write_text("x")
    return root / name


def _predict_unreachable_server(root: Path) -> list[str]:
    return ["-m", "model.predict", "runs:/0123456789abcdef/model", str(_volume(root)), "--out", str(root / "s.h5"),
            "--tracking-uri", "http://127.0.0.1:1", "--no-progress"]


def _measures_on_an_image(root: Path) -> list[str]:
    return ["-m", "analysis.measures", str(_volume(root)), "--dataset", "image", "--voxel-size-um", "5"]


def _summary_width_zero(root: Path) -> list[str]:
    return ["-m", "model.summary", "--width", "0", "--depth", "3", "--input-size", "384"]


def _sweep_predict_missing(root: Path) -> list[str]:
    # Hydra's run folder goes to an absolute path outside the case folder (the check compares the folder).
    return ["-m", "sweep.predict", f"model_uri={root / 'nope.keras'}", f"volumes=[{root / 'nope.h5'}]",
            f"hydra.run.dir={root.parent / (root.name + '-hydra')}"]


def _stored_model(module: str, uri: tp.Optional[tp.Callable[[Path], str]] = None) -> tp.Callable[[Path], list[str]]:
    """model.predict / analysis.segment given a models:/ or runs:/ model and no store, or a missing sqlite store:
    MLflow created ./mlflow.db (or that file) and then did not find the model."""
    def setup(root: Path) -> list[str]:
        vol = _volume(root)
        extra = ["--tracking-uri", uri(root)] if uri else []
        if module == "model.predict":
            return ["-m", module, "models:/screws/1", str(vol), "--out", str(root / "seg.h5"), "--no-progress", *extra]
        return ["-m", module, str(vol), "--model", "runs:/0123456789abcdef/model", "--voxel-size", "5", "--out",
                str(root / "result"), "--no-progress", *extra]
    return setup


def _store_with_folds(root: Path, folds: tp.Sequence[int], key: str = "0123456789ab") -> str:
    """A sqlite store with FINISHED training runs of config ``key`` for ``folds`` (tags as the sweep writes them)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'work' / 'mlflow.db'}"
    (root / "work").mkdir(exist_ok=True)
    client = MlflowClient(uri)
    exp = client.create_experiment("scaling-unet", artifact_location=(root / "work" / "artifacts").as_uri())
    for f in folds:
        run = client.create_run(exp, tags={"config_key": key, "fold": str(f)})
        client.log_metric(run.info.run_id, "mean_iou", 0.5)
        client.set_terminated(run.info.run_id, "FINISHED")
    return uri


def _hydra_outside(root: Path) -> list[str]:
    outside = root.parent / (root.name + "-hydra")
    return [f"hydra.run.dir={outside}", f"hydra.sweep.dir={outside}"]


def _sweep_predict_partial_folds(root: Path) -> list[str]:
    uri = _store_with_folds(root, [0, 1, 2])
    return ["-m", "sweep.predict", "model_uri=0123456789ab", f"volumes=[{_volume(root)}]", f"mlflow.tracking_uri={uri}",
            f"paths.work={root / 'work'}", *_hydra_outside(root)]


def _sweep_predict_best_no_store(root: Path) -> list[str]:
    return ["-m", "sweep.predict", "model_uri=best", f"volumes=[{_volume(root)}]",
            f"mlflow.tracking_uri=sqlite:///{root / 'none.db'}", f"paths.work={root / 'work'}", *_hydra_outside(root)]


def _ensemble_misspelt_experiment(root: Path) -> list[str]:
    uri = _store_with_folds(root, [0, 1, 2, 3])
    return ["-m", "sweep", "+experiment=fusing", "fusing.ensemble=true", "mlflow.experiment=scalng-unet",
            f"mlflow.tracking_uri={uri}", f"paths.work={root / 'work'}", *_hydra_outside(root)]


def _offline_on_an_online_run(root: Path) -> list[str]:
    from hydra import compose, initialize_config_dir

    import sweep  # noqa: F401 - registers the abspath resolver
    from sweep.core.runplan import plan_run

    overrides = ["model.width=32", "model.depth=1", f"paths.work={root / 'work'}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        ckpt = plan_run(compose("config", overrides=overrides)).ckpt_dir
    ckpt.mkdir(parents=True)
    (ckpt / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef")  # started on the server
    return ["-m", "sweep", *overrides, "mlflow.offline=true", *_hydra_outside(root)]


def _calibrate(*extra: str, scans: str = "raw") -> tp.Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        raw = _raw(root)  # WF-labelled training samples and one test sample
        return ["-m", "analysis", "calibrate", "--model", str(_tiny_model(root)), "--scans",
                str(raw if scans == "raw" else root / scans), "--out", str(root / "cal.json"), *extra]
    return setup


def _segment_bad_calibration(root: Path) -> list[str]:
    (root / "cal.json").write_text('{"not": "a table"}')
    return [*_segment("--voxel-size", "5")(root), "--calibration", str(root / "cal.json")]


def _optuna_bad_storage(root: Path) -> list[str]:
    return ["-m", "sweep", "+experiment=optuna", "hydra.sweeper.storage=optuna.db", f"paths.work={root / 'work'}",
            f"hydra.sweep.dir={root.parent / (root.name + '-hydra')}", "-m"]


def _optuna(*overrides: str, under_file: bool = False) -> tp.Callable[[Path], list[str]]:
    """``+experiment=optuna`` with bad sweeper/launcher settings; Hydra's sweep folder outside the case folder."""
    def setup(root: Path) -> list[str]:
        extra = []
        if under_file:
            (root / "afile").write_text("not a folder")
            extra = [f"hydra.sweeper.storage=journal:{root / 'afile' / 'studies' / 's.journal'}"]
        return ["-m", "sweep", "+experiment=optuna", *overrides, *extra, f"paths.work={root / 'work'}",
                f"hydra.sweep.dir={root.parent / (root.name + '-hydra')}", "-m"]
    return setup


def _stand_in(module: str, *overrides: str, multirun: bool = False) -> tp.Callable[[Path], list[str]]:
    """A stand-in (sweep/resources/standin.py); Hydra's own folders outside the case folder."""
    def setup(root: Path) -> list[str]:
        outside = root.parent / (root.name + "-hydra")
        return ["-m", module, *overrides, f"paths.work={root / 'work'}", f"hydra.run.dir={outside}",
                f"hydra.sweep.dir={outside}", *(["-m"] if multirun else [])]
    return setup


def _status_unknown_sweep(root: Path) -> list[str]:
    return ["-m", "sweep.status", "--sweep-id", "nope", f"paths.work={root / 'work'}"]


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
    Case("predict: --out under an existing file", _predict(lambda r: ["--out", str(_file(r, "vol2.h5") / "x.h5")]),
         "vol2.h5"),
    Case("predict: --work-dir is an existing file",
         _predict(lambda r: ["--out", str(r / "s.h5"), "--work-dir", str(_file(r, "planes"))]), "--work-dir"),
    Case("predict: --out an existing directory with --overwrite",
         _predict(lambda r: ["--out", str((r / "outdir").mkdir() or r / "outdir"), "--overwrite"]), "is a directory"),
    Case("predict: runs:/ URI with an unreachable server", _predict_unreachable_server, "127.0.0.1:1"),
    Case("segment: a scan whose voxel size is unknown", _segment(), "--voxel-size"),
    Case("segment: anisotropic voxels", _segment(aniso=True), "anisotropic voxels [5.0, 2.5, 2.5]"),
    Case("segment: --voxel-size 0", _segment("--voxel-size", "0"), "--voxel-size: must be a positive"),
    Case("segment: a missing scan", _segment("--voxel-size", "5", scan="missing"), "vol.h5"),
    Case("segment: a text file named .h5", _segment("--voxel-size", "5", scan="text"), "vol.h5"),
    Case("segment: a constant scan", _segment(scan="constant"), "a constant scan has no contrast"),
    Case("segment: --out under a file", lambda r: [*_segment("--voxel-size", "5")(r)[:-3], "--out",
                                                   str(_file(r, "afile") / "result"), "--no-progress"], "afile"),
    Case("segment: --batch-size 0", _segment("--voxel-size", "5", "--batch-size", "0"), "--batch-size"),
    Case("segment: inverted --clip-percentiles", _segment("--voxel-size", "5", "--clip-percentiles", "99", "1"),
         "--clip-percentiles"),
    Case("segment: --roi-um 0", _segment("--voxel-size", "5", "--roi-um", "0"), "--roi-um"),
    Case("segment: --days -1", _segment("--voxel-size", "5", "--days", "-1"), "--days"),
    Case("segment: --workers 0", _segment("--voxel-size", "5", "--workers", "0"), "--workers"),
    Case("model.summary: --width 0", _summary_width_zero, "width"),
    Case("sweep.predict: missing model and volume", _sweep_predict_missing, "nothing was queued"),
    Case("analysis.measures: an image instead of labels", _measures_on_an_image, "vol.h5"),
    Case("sweep.status: unknown --sweep-id", _status_unknown_sweep, "--sweep-id nope"),
    Case("sweep: Optuna storage neither journal:<file> nor a URL", _optuna_bad_storage, "hydra.sweeper.storage"),
    Case("sweep: Optuna journal under a regular file", _optuna(under_file=True), "afile is a file"),
    Case("sweep: hydra.sweeper.n_trials=0", _optuna("hydra.sweeper.n_trials=0"), "hydra.sweeper.n_trials"),
    Case("sweep: hydra.sweeper.n_trials=-1", _optuna("hydra.sweeper.n_trials=-1"), "hydra.sweeper.n_trials"),
    Case("sweep: hydra.sweeper.n_jobs=0", _optuna("hydra.sweeper.n_jobs=0"), "hydra.sweeper.n_jobs"),
    Case("sweep: hydra.sweeper.max_failure_rate=2", _optuna("hydra.sweeper.max_failure_rate=2"),
         "hydra.sweeper.max_failure_rate"),
    Case("sweep: hydra.sweeper.lease_wait_s=-1", _optuna("hydra.sweeper.lease_wait_s=-1"), "hydra.sweeper.lease_wait_s"),
    Case("sweep: a pruner on a multi-objective study", _optuna("+hydra/sweeper/pruner=asha"),
         "hydra.sweeper.pruner: pruning needs a single-objective study"),
    Case("sweep: fold_pruning.test=wilcoxon over 4 folds", _stand_in("sweep", "fold_pruning.test=wilcoxon"),
         "fold_pruning.test: wilcoxon over at most 3 finished folds cannot reach p < 0.1"),
    Case("sweep: mlflow.system_metrics_interval_s=-1", _stand_in("sweep", "mlflow.system_metrics_interval_s=-1"),
         "mlflow.system_metrics_interval_s"),
    Case("sweep: hydra.launcher.n_workers=0 (local pool)",
         _stand_in("sweep", "model.input_size=384,512", "hydra.launcher.n_workers=0", multirun=True),
         "hydra.launcher.n_workers"),
    Case("sweep: mlflow.outage_tolerance_s=-1", _stand_in("sweep", "mlflow.outage_tolerance_s=-1"),
         "mlflow.outage_tolerance_s"),
    Case("sweep: allow_stand_in=maybe (was read as true)", _stand_in("sweep", "allow_stand_in=maybe"),
         "allow_stand_in: must be true or false"),
    Case("sweep: train.jit_compile=maybe", _stand_in("sweep", "train.jit_compile=maybe"), "train.jit_compile"),
    Case("sweep: train.cpu_replicas=2.5 (blamed the batch size)", _stand_in("sweep", "train.cpu_replicas=2.5"),
         "train.cpu_replicas: must be a whole number"),
    Case("sweep -m: laptop profile on synthetic data as GPU jobs",
         _stand_in("sweep", "+experiment=depth", "hydra/launcher=slurm_v100", multirun=True),
         "profile: 16 runs of profile=laptop"),
    Case("sweep.plan: synthetic data as GPU jobs (profile=paper)",
         _stand_in("sweep.plan", "+experiment=depth", "hydra/launcher=slurm_v100", "profile=paper"),
         "data.synthesize: 16 runs of synthetic data"),
    Case("sweep: profile=paper on this CPU (no GPU declared)", _stand_in("sweep", "profile=paper"),
         "profile: 1 run of profile=paper on this machine's CPU, up to 1,500,000 iterations"),
    Case("analysis reports: --out is a file", _analysis("reports", lambda r: f"sqlite:///{r / 'none.db'}", _file_as_out),
         "--out"),
    Case("analysis reports: sqlite file that is not a database", _analysis("reports", _not_a_database), "mlflow.db"),
    Case("analysis reports: empty sqlite file", _analysis("reports", _empty_file_db), "mlflow.db"),
    Case("analysis fig3: unknown URI scheme", _analysis("fig3", lambda r: "foo://bar"), "foo"),
    Case("analysis table2: missing sqlite file", _analysis("table2", lambda r: f"sqlite:///{r / 'none.db'}"), "none.db"),
    Case("analysis fig3: unreachable server", _analysis("fig3", lambda r: "http://127.0.0.1:1"), "127.0.0.1:1"),
    Case("predict: models:/ without a tracking URI (created ./mlflow.db)", _stored_model("model.predict"),
         "--tracking-uri", in_case_folder=True),
    Case("predict: models:/ in a missing sqlite store", _stored_model("model.predict", lambda r: f"sqlite:///{r / 'no.db'}"),
         "no.db"),
    Case("segment: runs:/ without a tracking URI (created ./mlflow.db)", _stored_model("analysis.segment"),
         "--tracking-uri", in_case_folder=True),
    Case("sweep.predict: model_uri=best on a missing store", _sweep_predict_best_no_store, "none.db"),
    Case("sweep.predict: a config with 3 of 4 folds FINISHED (predicted as 3)", _sweep_predict_partial_folds,
         "missing: [3]"),
    Case("sweep: fusing.ensemble with a misspelt experiment (created it)", _ensemble_misspelt_experiment,
         "mlflow.experiment: no training experiment 'scalng-unet'"),
    Case("sweep: mlflow.offline=true on a run started online (empty offline store)", _offline_on_an_online_run,
         "mlflow.offline"),
    Case("calibrate: --alpha 1.5", _calibrate("--alpha", "1.5"), "--alpha"),
    Case("calibrate: --scans a missing folder", _calibrate(scans="nope"), "nope"),
    Case("calibrate: --roi-um 0", _calibrate("--roi-um", "0"), "--roi-um"),
    Case("segment: --calibration not a calibration table", _segment_bad_calibration, "cal.json"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_clear_error_and_writes_nothing(case: Case, tmp_path: Path, forked: ForkedCli):
    args = case.setup(tmp_path)
    before = tree_snapshot(tmp_path)
    dirs_before = sorted(p for p in tmp_path.rglob("*") if p.is_dir())
    proc = forked.run(args, cwd=tmp_path if case.in_case_folder else REPO, env=cli_env(), timeout=120)
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


SWEEP_TINY = ["model.depth=2", "data.synth.size=32", "data.synth.n_train=4", "data.synth.n_test=1",
              "train.batch_size=2", "train.max_iters=2", "train.checkpoint_every=2", "train.val_crop=32"]


@pytest.mark.parametrize("multirun", [False, True], ids=["single run", "-m"])
@pytest.mark.parametrize("bad,names", [
    (lambda raw: ["data=prepared", f"data.dataset={raw}"], "not prepared data"),
    (lambda raw: ["model.input_size=390"], "model.input_size"),
    (lambda raw: ["data=prepared", f"data.dataset={raw.parent / 'nonexistent'}"], "data.dataset"),
], ids=["raw dataset as prepared", "input size not divisible", "missing dataset"])
def test_sweep_refuses_bad_input_alike_with_and_without_multirun(tmp_path: Path, bad, names, multirun,
                                                                forked: ForkedCli):
    # Issue 13, 2 and 12: a raw dataset would train on grey values and record a FINISHED run that later
    # sweeps skip; under -m each check failed inside Hydra's traceback with status 1.
    raw = _raw(tmp_path)
    before = tree_snapshot(tmp_path)
    env_work = tmp_path / "work"
    args = ["-m", "sweep", *bad(raw), *SWEEP_TINY, f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    proc = forked.run([*args, *(["-m"] if multirun else [])], cwd=tmp_path,
                      env=cli_env(SCALING_UNET_WORK=str(env_work)), timeout=300)
    assert_one_clear_error(proc, names)
    after = tree_snapshot(tmp_path)
    hydra_logs = {p for p in after if p.startswith(("work/hydra/", "work/multirun/"))}  # Hydra's own run folder
    assert {p: after[p] for p in set(after) - hydra_logs} == before


def test_plan_runs_the_sweeps_dataset_checks_and_plans_a_single_run(tmp_path: Path, forked: ForkedCli):
    # Issue 13, 10 and 11: the plan said "to queue: 16" for a dataset the sweep refuses; a plan of a
    # single run (no experiment) failed with "Input cfg is not an OmegaConf config object".
    env = cli_env(SCALING_UNET_WORK=str(tmp_path / "work"))
    plan = ["-m", "sweep.plan"]
    proc = forked.run(plan + ["+experiment=depth", "data=prepared", f"data.dataset={tmp_path / 'nonexistent'}"],
                      cwd=tmp_path, env=env, timeout=300)
    assert_one_clear_error(proc, "data.dataset")
    raw = _raw(tmp_path)
    proc = forked.run(plan + ["data=prepared", f"data.dataset={raw}"], cwd=tmp_path, env=env, timeout=300)
    assert_one_clear_error(proc, "not prepared data")
    proc = forked.run(plan, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0 and "runs: 1" in proc.stdout, proc.stderr[-3000:]
    assert not (tmp_path / "work").exists()
