"""MLflow's Model Registry: ``python -m sweep.register`` registers the chosen config's fold models as ONE version
(tagged, aliased, idempotent), and ``models:/<name>/<version>`` / ``models:/<name>@<alias>`` predict as their
ensemble, on the session's MLflow server (PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
import typing as tp
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.test_predict import phantom
from tests.test_predict_cli import oracle_model

REPO = Path(__file__).resolve().parents[1]
BEST, WORSE, THREE_FOLDS, UNFINISHED = "aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd"
SHAPE = (12, 16, 16)


def fold_models(folder: Path) -> list[Path]:
    """Four distinct fold models (two oracles, a soft one, one with bone and degradation layer swapped): an ensemble
    of them has other probabilities than any one of them."""
    oracle, soft, swapped = oracle_model(), oracle_model(), oracle_model()
    w, b = soft.get_layer("oracle").get_weights()
    soft.get_layer("oracle").set_weights([w / 16, b / 16])
    swapped.get_layer("oracle").set_weights([w[..., [0, 2, 1, 3]], b[[0, 2, 1, 3]]])
    paths = []
    for i, m in enumerate((oracle, oracle, soft, swapped)):
        paths.append(folder / f"f{i}" / "best.keras")
        paths[-1].parent.mkdir(parents=True)
        m.save(paths[-1])
    return paths


def make_fold_runs(uri: str, experiment: str, models: tp.Sequence[Path]) -> dict[str, list[str]]:
    """Training runs as a sweep leaves them, cheaply (as tests/test_predict_cli.py): per config key, one run per fold
    with config_key/fold tags, mean_iou, flops, params, model.* params and its model under model/. BEST has the higher
    mean IoU; THREE_FOLDS lacks a FINISHED fold 3; UNFINISHED has no FINISHED run."""
    client = MlflowClient(uri)
    exp = client.create_experiment(experiment)
    ids: dict[str, list[str]] = {}
    plan = ((BEST, 0.9, range(4), "FINISHED"), (WORSE, 0.5, range(4), "FINISHED"),
            (THREE_FOLDS, 0.95, range(4), None), (UNFINISHED, 0.99, range(2), "FAILED"))
    for key, iou, folds, status in plan:
        for fold in folds:
            r = client.create_run(exp, tags={"config_key": key, "fold": str(fold)})
            rid = r.info.run_id
            client.log_metric(rid, "mean_iou", iou + fold / 100)
            client.log_metric(rid, "flops", 1.5e9)
            client.log_metric(rid, "params", 123456)
            client.log_param(rid, "model.width", 32)
            client.log_param(rid, "data.prepare.voxel_size_um", 5.0)
            client.log_param(rid, "preprocessing.clip_low_percentile", 2.0)  # what data.prepare recorded (train.py)
            client.log_param(rid, "preprocessing.clip_high_percentile", 98.0)
            client.log_artifact(rid, str(models[fold]), "model")
            client.set_terminated(rid, status or ("FINISHED" if fold < 3 else "FAILED"))
            ids.setdefault(key, []).append(rid)
    return ids


@pytest.fixture(scope="module")
def trained(mlflow_server, tmp_path_factory) -> dict[str, tp.Any]:
    root = tmp_path_factory.mktemp("registry")
    experiment = f"reg-{uuid.uuid4().hex[:8]}"
    models = fold_models(root)
    runs = make_fold_runs(mlflow_server.uri, experiment, models)
    lab = phantom(SHAPE)
    with h5py.File(root / "vol.h5", "w") as f:
        f["image"] = (lab / 3).astype(np.float32)
    return {"uri": mlflow_server.uri, "experiment": experiment, "runs": runs, "volume": root / "vol.h5",
            "root": root}


def compose(uri: str, experiment: str, work: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("register", overrides=[f"paths.work={work}", f"mlflow.tracking_uri={uri}",
                                                    f"mlflow.experiment={experiment}", *overrides])


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO)))


def test_register_best_is_one_tagged_aliased_version_and_a_rerun_adds_none(trained, tmp_path):
    from sweep.jobs.registry import register

    uri, exp = trained["uri"], trained["experiment"]
    res = run_cli("sweep.register", f"paths.work={tmp_path}", f"mlflow.tracking_uri={uri}",
                  f"mlflow.experiment={exp}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"models:/{exp}/1: registered: config {BEST}, 4 folds, mean IoU 0.9150 ± 0.0065" in res.stdout, res.stdout
    client = MlflowClient(uri)
    (mv,) = client.search_model_versions(f"name = '{exp}'")
    tags = mv.tags
    assert tags["config_key"] == BEST and tags["folds"] == "4" and tags["mean_iou"] == "0.9150"
    assert tags["mean_iou_se"] == "0.0065" and tags["flops"] == "1500000000" and tags["params"] == "123456"
    assert tags["training_experiment"] == exp and tags["fold_run_ids"] == ",".join(trained["runs"][BEST])
    assert tags["fold_mean_iou"] == "0.9000,0.9100,0.9200,0.9300" and tags["model.width"] == "32"
    assert not any(str(tmp_path) in v or os.path.expanduser("~") + "/" in v for v in tags.values())
    assert client.get_model_version_by_alias(exp, "best").version == mv.version
    model = client.get_registered_model(exp)
    assert model.tags["training_experiment"] == exp and "fold" in model.description.lower()
    # The version's folder: one fold<k>.keras per fold, in a FINISHED run of the registry experiment.
    assert sorted(a.path for a in client.list_artifacts(mv.run_id, "model")) == [
        f"model/fold{k}.keras" for k in range(4)]
    reg_run = client.get_run(mv.run_id)
    assert reg_run.info.status == "FINISHED"
    assert client.get_experiment(reg_run.info.experiment_id).name == f"{exp}-registry"
    # Again, in this process: the version of that config is found, nothing new.
    again = register(compose(uri, exp, tmp_path))
    assert (again.new, again.version) == (False, "1")
    assert len(client.search_model_versions(f"name = '{exp}'")) == 1
    assert len(client.search_runs([reg_run.info.experiment_id], filter_string=f"tags.registered_model = '{exp}'")) == 1
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def registered(trained, tmp_path_factory) -> str:
    """The fold ensemble of BEST as version 1 of a registered model of its own; its name."""
    from sweep.jobs.registry import register

    name = f"{trained['experiment']}-predict"
    out = register(compose(trained["uri"], trained["experiment"], tmp_path_factory.mktemp("w"),
                           f"register.name={name}"))
    assert out.new and out.version == "1"
    return name


def _predict(capsys, *argv) -> tuple[int, str]:
    from model.predict import main

    rc = main([str(a) for a in argv] + ["--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_a_registered_version_predicts_as_the_ensemble_of_its_fold_models(trained, registered, tmp_path, capsys,
                                                                          monkeypatch):
    """``models:/<name>/1`` and ``models:/<name>@best`` give the probabilities of the same 4 fold models given as
    ``runs:/`` URIs (an ensemble: they differ from fold 0's alone), resolved in the registry of --tracking-uri."""
    from model.predict import load_models

    monkeypatch.chdir(tmp_path)  # MLflow's process-wide default registry would be ./mlflow.db: it must stay unused
    uri, vol = trained["uri"], trained["volume"]
    outs = {}
    for tag, models in (("version", [f"models:/{registered}/1"]), ("alias", [f"models:/{registered}@best"]),
                        ("runs", [f"runs:/{r}/model" for r in trained["runs"][BEST]]),
                        ("fold0", [f"runs:/{trained['runs'][BEST][0]}/model"])):
        rc, text = _predict(capsys, *models, vol, "--planes", "rc", "--probabilities", "--out", tmp_path / f"{tag}.h5",
                            "--tracking-uri", uri)
        assert rc == 0, text
        with h5py.File(tmp_path / f"{tag}.h5", "r") as f:
            outs[tag] = (f["labels"][...], f["probabilities"][...])
    for tag in ("version", "alias"):
        np.testing.assert_array_equal(outs[tag][0], outs["runs"][0])
        np.testing.assert_array_equal(outs[tag][1], outs["runs"][1])
    assert not np.array_equal(outs["version"][1], outs["fold0"][1])
    models, identity = load_models([f"models:/{registered}@best"], tracking_uri=uri)
    assert len(models) == 4 and identity.startswith(f"models:/{registered}@best:") and identity.count("fold") == 4
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".h5"] == []


def test_an_unknown_registered_model_is_one_error_line_naming_the_uri(trained, tmp_path, capsys):
    rc, text = _predict(capsys, "models:/no-such-model/1", trained["volume"], "--out", tmp_path / "x.h5",
                        "--tracking-uri", trained["uri"])
    assert rc == 2 and "models:/no-such-model/1" in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("override, words", [
    ("model_uri=dddddddddddd", ["model_uri=dddddddddddd", "no FINISHED fold run of config dddddddddddd"]),
    ("model_uri=cccccccccccc", ["model_uri=cccccccccccc", "folds [0, 1, 2] only", "missing: [3]"]),
    ("model_uri=eeeeeeeeeeee", ["model_uri=eeeeeeeeeeee", "unknown config key"]),
    ("model_uri=newest", ["model_uri: give best or a 12-hex config key"]),
    ("register.alias=latest", ["register.alias", "reserved"]),
    ("register.name=a/b", ["register.name", "'a/b'"]),
    ("data.num_folds=5", ["model_uri=best", "all 5 folds"]),
    ("mlflow.experiment=no-such-experiment", ["mlflow.experiment", "no-such-experiment"]),
    ("unreachable", ["unreachable", "127.0.0.1"]),
])
def test_refusals_name_the_field_and_write_nothing(trained, tmp_path, override, words):
    from sweep.jobs.registry import register
    from sweep.tracking.store import TrackingError
    from tests.mlflow_server import free_port

    uri, exp, name = trained["uri"], trained["experiment"], f"refused-{uuid.uuid4().hex[:8]}"
    if override == "unreachable":
        override = f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}"
    overrides = [override] if override.startswith("register.name") else [f"register.name={name}", override]
    with pytest.raises((ValueError, TrackingError)) as err:
        register(compose(uri, exp, tmp_path, *overrides))
    msg = str(err.value)
    assert all(w in msg for w in words), msg
    client = MlflowClient(uri)
    assert client.search_registered_models(f"name = '{name}'") == []
    registry_exp = client.get_experiment_by_name(f"{exp}-registry")  # other tests register BEST only
    assert registry_exp is None or not client.search_runs([registry_exp.experiment_id],
                                                          filter_string=f"tags.config_key != '{BEST}'")


def test_the_cli_refuses_in_one_line(trained, tmp_path):
    res = run_cli("sweep.register", f"paths.work={tmp_path}", f"mlflow.tracking_uri={trained['uri']}",
                  f"mlflow.experiment={trained['experiment']}", "model_uri=cccccccccccc", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith("error: model_uri="), \
        res.stderr


def test_sweep_predict_takes_a_registered_version(trained, registered, tmp_path):
    """``python -m sweep.predict model_uri=models:/<name>@best``: the version's fold models as one ensemble, fetched
    from ``mlflow.tracking_uri``; OUT names the URI it was given."""
    res = run_cli("sweep.predict", f"model_uri=models:/{registered}@best", f"volumes=[{trained['volume']}]",
                  "planes=rc", f"out_dir={tmp_path / 'pred'}", "progress=false",
                  f"mlflow.tracking_uri={trained['uri']}", f"paths.work={tmp_path}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    with h5py.File(tmp_path / "pred" / "vol.h5", "r") as f:
        assert [str(m) for m in f.attrs["models"]] == [f"models:/{registered}@best"]
        assert (f["labels"][...] == phantom(SHAPE)).mean() > 0.99


def test_a_raw_scan_is_segmented_by_the_registered_ensemble_at_its_training_voxel_size(trained, registered, tmp_path,
                                                                                     capsys):
    """analysis.segment with ``models:/<name>@best``: the 4 fold models predict, and the voxel size the scan is
    resampled to is read from the fold runs the version names (param data.prepare.voxel_size_um)."""
    import json

    from analysis.segment import main

    lab = phantom((24, 32, 32))
    with h5py.File(tmp_path / "raw.h5", "w") as f:
        f["image"] = (100 + 300 * lab.astype(np.uint16)).astype(np.uint16)
        f["image"].attrs["voxel_size_um"] = 2.5
    rc = main([str(tmp_path / "raw.h5"), "--model", f"models:/{registered}@best", "--out", str(tmp_path / "out"),
               "--tracking-uri", trained["uri"], "--planes", "3", "--no-progress"])
    text = capsys.readouterr()
    assert rc == 0, text.out + text.err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["prepared"]["voxel_size_um"] == 5.0 and report["prepared"]["shape"] == [12, 16, 16]
    assert report["prepared"]["voxel_size_from"] == "MLflow param data.prepare.voxel_size_um"
    # the training data's clip percentiles, not the command line's default (issue 32)
    assert report["prepared"]["clip_percentiles"] == [2.0, 98.0]
    assert "training run's preprocessing" in report["prepared"]["clip_percentiles_from"]
    assert report["models"]["identity"].count("fold") == 4 and report["prediction"]["fold_vote"] == "soft"
    with h5py.File(tmp_path / "out" / "segmentation.h5", "r") as f:
        assert "fold_disagreement" in f and f["fold_disagreement"][...].any()


def test_a_calibration_logged_with_the_version_gives_segment_its_conformal_intervals(trained, registered, tmp_path,
                                                                                    capsys):
    """Issue 30: analysis calibrate logs calibration.json to the registered version's run; analysis.segment with
    ``--calibration auto`` (the default) finds it there and reports its intervals and where they came from."""
    import json

    from analysis.__main__ import main as analysis_main
    from analysis.calibration import Calibration
    from analysis.segment import main as segment_main
    from data.prepare import prepare_dataset
    from tests.conftest import write_raw_dataset

    write_raw_dataset(tmp_path / "raw", n_train=0, n_test=3, shape=(12, 16, 16))
    prepare_dataset(tmp_path / "raw", tmp_path / "hq", voxel_size_um=5.0)
    spec = f"models:/{registered}@best"
    assert analysis_main(["calibrate", "--model", spec, "--tracking-uri", trained["uri"], "--scans",
                          str(tmp_path / "hq"), "--alpha", "0.25", "--no-members",
                          "--out", str(tmp_path / "cal.json")]) == 0
    assert "logged calibration.json to run" in capsys.readouterr().out
    cal = Calibration.read(tmp_path / "cal.json")
    lab = phantom((12, 16, 16))
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f["image"] = (100 + 300 * lab.astype(np.uint16)).astype(np.uint16)
        f["image"].attrs["voxel_size_um"] = 5.0
    assert segment_main([str(tmp_path / "scan.h5"), "--model", spec, "--out", str(tmp_path / "out"),
                         "--tracking-uri", trained["uri"], "--planes", "3", "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["source"] == f"the artifact calibration.json of {spec}"
    assert report["calibration"]["scans"] == cal.n == 3 and report["calibration"]["alpha"] == 0.25
    bic = report["measures"]["bic_percent"]
    lo, hi = report["conformal_intervals"]["bic_percent"]
    c = cal.measures["bic_percent"]
    assert lo == pytest.approx(bic - c.bias - c.q_absolute) and hi == pytest.approx(bic - c.bias + c.q_absolute)
