"""Pruning (issue 21): trials stopped by an Optuna pruner in the asynchronous slots, a requeued trial judged again
without a double report, fold-level early stopping of grids, and what each run used (MLflow system metrics)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from sweep.core import trial_report
from sweep.core.errors import ConfigError
from sweep.core.fold_pruning import FoldPruning, fold_pruning_setting, paired_worse_p, skip_remaining_folds
from sweep.orchestration.trials import StudyError, make_pruner, open_storage, trial_reporter

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.width=32", "model.depth=1", "model.input_size=384", "data.synth.size=32", "data.synth.n_train=4",
        "data.synth.n_test=1", "train.batch_size=2", "train.val_crop=32", "train.val_slice_step=8",
        "train.final_slice_step=8", "train.open_slabs=2", "train.early_stop_patience_iters=100000"]


def _env(work: Path) -> dict:
    return dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3")


# ----------------------------------------------------------------------------- reports and the pruner


def _study(tmp: Path, pruner=None):
    return optuna.create_study(study_name="s", storage=open_storage(f"journal:{tmp}/s.journal"),
                               direction="maximize", pruner=pruner)


def test_a_requeued_trial_is_judged_again_and_never_reported_twice(tmp_path):
    study = _study(tmp_path, optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for v in (0.8, 0.9):  # two finished trials give the median at step 4
        t = study.ask()
        t.report(v, 4)
        study.tell(t, v)
    bad = study.ask()
    judge = trial_reporter(study, bad.number)
    assert judge(0.1, 4) is True  # below the median: prune
    again = trial_reporter(study, bad.number)  # the requeued job's new reporter, on the same trial
    assert again(0.1, 4) is True  # judged again ...
    assert study._storage.get_trial(bad._trial_id).intermediate_values == {4: 0.1}  # ... reported once
    good = study.ask()
    assert trial_reporter(study, good.number)(0.95, 4) is False


def test_report_raises_trial_pruned_only_inside_a_reporting_block():
    trial_report.report(0.1, 4)  # no search around this job: nothing happens
    with trial_report.reporting(lambda value, it: it >= 8):
        trial_report.report(0.5, 4)
        with pytest.raises(trial_report.TrialPruned) as e:
            trial_report.report(0.25, 8)
    assert e.value.run_status == "KILLED"
    assert e.value.run_tags == {"pruned_at_iteration": "8", "pruned_mean_iou": "0.25", "pruned_by": "pruner"}
    assert not trial_report.active()


def test_a_pruner_is_refused_for_a_multi_objective_study_and_for_a_non_pruner():
    node = {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 4}
    assert isinstance(make_pruner(node, 1), optuna.pruners.SuccessiveHalvingPruner)
    with pytest.raises(StudyError, match="single-objective study; this one has 2 directions"):
        make_pruner(node, 2)
    with pytest.raises(StudyError, match="is not an Optuna pruner"):
        make_pruner({"_target_": "optuna.samplers.RandomSampler"}, 1)


@pytest.mark.parametrize("name", ["asha", "hyperband", "median", "wilcoxon"])
def test_each_pruner_config_builds_its_optuna_pruner(name, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=optuna_asha", f"hydra/sweeper/pruner={name}",
                                           f"paths.work={tmp_path}"], return_hydra_config=True)
    node = OmegaConf.to_container(cfg.hydra.sweeper.pruner, resolve=True)
    pruner = make_pruner(node, 1)
    assert type(pruner).__name__ == node["_target_"].rsplit(".", 1)[-1]
    if name == "asha":
        assert node["min_resource"] == cfg.train.checkpoint_every  # the first rung: the first validation


# ----------------------------------------------------------------------------- a requeued trial, in the job


def _train_cfg(work: Path, *extra: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"paths.work={work}", "train.max_iters=8", "train.checkpoint_every=4",
                                            "mlflow.system_metrics_interval_s=0.5", *extra])


def test_a_preempted_trial_resumes_is_judged_again_and_its_run_carries_system_metrics(tmp_path, monkeypatch):
    """The job of a trial reports at its first checkpoint, is preempted (USR2: SystemExit) and requeued: the new
    attempt judges the trial again on that checkpoint's value (no second report of step 4), then reports step 8."""
    from sweep.jobs.train import run

    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    study = _study(tmp_path, optuna.pruners.NopPruner())
    trial = study.ask()
    cfg = _train_cfg(work)
    first = trial_reporter(study, trial.number)

    def preempted_after_report(value: float, iteration: int) -> bool:
        first(value, iteration)
        raise SystemExit(-1)  # submitit's requeue after USR2

    with trial_report.reporting(preempted_after_report), pytest.raises(SystemExit):
        run(cfg)
    usage = next((work / "checkpoints").glob("*/fold0/usage.json"))
    first_cpu_s = json.loads(usage.read_text())["cpu_core_s"]  # the first attempt's cost, kept beside its checkpoint
    assert first_cpu_s > 0
    calls = []
    second = trial_reporter(study, trial.number)

    def recording(value: float, iteration: int) -> bool:
        calls.append(iteration)
        return second(value, iteration)

    with trial_report.reporting(recording):
        metrics = run(cfg)
    assert calls == [4, 8]  # judged again on resume on its last checkpoint (4), then at the next one (8)
    values = study._storage.get_trial(trial._trial_id).intermediate_values
    assert sorted(values) == [4, 8]  # step 4 once, with the first attempt's value
    client = MlflowClient(str(cfg.mlflow.tracking_uri))
    (r,) = client.search_runs([client.get_experiment_by_name("scaling-unet").experiment_id])
    assert r.info.status == "FINISHED" and r.data.tags["resumed_from_iteration"] == "4"
    logged = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "val_mean_iou")}
    assert logged[4] == pytest.approx(values[4]) and logged[8] == pytest.approx(values[8])
    assert metrics["iterations"] == 8
    # What the run used: MLflow's system metrics and the process's CPU time (no GPU here: no GPU figures).
    assert "system/cpu_utilization_percentage" in r.data.metrics
    assert "system/system_memory_usage_megabytes" in r.data.metrics
    assert r.data.metrics["cpu_core_hours_used"] * 3600 > first_cpu_s  # both attempts, as sacct counts them
    assert "used_gpu_hours" not in r.data.metrics


# ----------------------------------------------------------------------------- ASHA in the slots, end to end


def test_asha_in_the_async_slots_ends_with_pruned_and_complete_trials_none_running(tmp_path):
    """Single-objective study, SuccessiveHalvingPruner (rungs at 4 and 12 iterations), local pool, one slot (the
    order of trials is then fixed by the sampler's seed): some trials stop at a rung, their MLflow runs KILLED."""
    work = tmp_path / "work"
    res = subprocess.run([sys.executable, "-m", "sweep", "+experiment=optuna_asha", *TINY, "train.max_iters=12",
                          "train.checkpoint_every=4", "train.learning_rate=tag(log, interval(1e-6, 1e-1))",
                          "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=1", "mlflow.system_metrics_interval_s=0.5",
                          "-m"], cwd=tmp_path, env=_env(work), capture_output=True, text=True, timeout=600)
    out = res.stderr + res.stdout
    assert res.returncode == 0, out[-4000:]
    assert "Error executing job" not in out  # a pruned trial is not an error
    folder = work / "optuna" / "scaling-unet-asha-laptop"
    rec = json.loads((folder / "study.json").read_text())
    study = optuna.load_study(study_name=rec["study_name"], storage=open_storage(rec["storage"]))
    states = [t.state for t in study.trials]
    assert len(states) == 6 and optuna.trial.TrialState.RUNNING not in states
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 6, states
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("scaling-unet").experiment_id])
    by_trial = {int(r.data.tags["optuna_trial"]): r for r in runs}
    for t in pruned:
        r = by_trial[t.number]
        stop = max(t.intermediate_values)
        assert r.info.status == "KILLED" and r.data.tags["pruned_at_iteration"] == str(stop)
        assert float(r.data.tags["pruned_mean_iou"]) == pytest.approx(t.intermediate_values[stop], rel=1e-5)
        assert r.data.metrics["val_mean_iou"] == pytest.approx(t.intermediate_values[stop])  # its last IoU logged
        assert "cpu_core_hours_used" in r.data.metrics
    for t in complete:
        assert by_trial[t.number].info.status == "FINISHED" and sorted(t.intermediate_values) == [4, 8, 12]
    assert any("system/cpu_utilization_percentage" in r.data.metrics for r in runs)
    trials = subprocess.run([sys.executable, "-m", "sweep.trials", str(folder)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert trials.returncode == 0, trials.stderr
    assert f"{len(pruned)} PRUNED" in trials.stdout and f"pruned: {len(pruned)} by the pruner" in trials.stdout
    status = subprocess.run([sys.executable, "-m", "sweep.status", "+experiment=optuna_asha"], cwd=tmp_path,
                            env=_env(work), capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout == trials.stdout, status.stdout + status.stderr  # the study


# ----------------------------------------------------------------------------- fold pruning in grids


def test_fold_pruning_skips_only_a_config_significantly_worse_on_the_same_folds():
    on = FoldPruning("paired_t", p=0.1, min_folds=2)
    best = {0: 0.80, 1: 0.82, 2: 0.81, 3: 0.79}
    worse = {0: 0.60, 1: 0.63}
    skip = skip_remaining_folds("bad", 2, {"best": best, "bad": worse}, on)
    assert skip is not None and skip.best_key == "best" and skip.folds == (0, 1) and skip.p < 0.1
    assert "folds 0,1 mean IoU 0.6150 < 0.8100 of config best" in skip.reason
    assert skip_remaining_folds("bad", 2, {"best": best, "bad": worse}, FoldPruning(None)) is None  # off
    assert skip_remaining_folds("bad", 1, {"best": best, "bad": {0: 0.6}}, on) is None  # one fold: not judged
    assert skip_remaining_folds("bad", 2, {"best": {0: 0.8}, "bad": worse}, on) is None  # no rival on folds 0,1
    noisy = {0: 0.60, 1: 0.84}  # worse on average, better on fold 1: not significant
    assert skip_remaining_folds("bad", 2, {"best": best, "bad": noisy}, on) is None
    assert skip_remaining_folds("best", 2, {"best": {0: 0.8, 1: 0.82}, "bad": worse}, on) is None  # the best itself
    # A constant gap (sd 0): certainly worse for the t-test; Wilcoxon's exact p over 3 folds is 1/8.
    assert paired_worse_p([0.5, 0.6], [0.7, 0.8], "paired_t") == 0.0
    assert paired_worse_p([0.5, 0.6, 0.7], [0.7, 0.8, 0.9], "wilcoxon") == pytest.approx(0.125)


def test_fold_pruning_settings_are_checked_and_named():
    from omegaconf import OmegaConf

    def setting(**node):
        return fold_pruning_setting(OmegaConf.create({"fold_pruning": node}), 4)

    assert not setting(test=None).on and setting(test="paired_t").min_folds == 2
    with pytest.raises(ConfigError, match="fold_pruning.test: must be null, paired_t or wilcoxon"):
        setting(test="ttest")
    with pytest.raises(ConfigError, match="fold_pruning.p"):
        setting(test="paired_t", p=1.5)
    with pytest.raises(ConfigError, match="fold_pruning.min_folds: 4 finished folds leave no fold of 4"):
        setting(test="paired_t", min_folds=4)
    with pytest.raises(ConfigError, match="its smallest one-sided p is 0.125"):
        setting(test="wilcoxon", p=0.1)  # 4 folds: Wilcoxon could never skip one
    assert setting(test="wilcoxon", p=0.2, min_folds=3).on


def test_a_grid_with_fold_pruning_skips_the_remaining_folds_of_a_worse_config(tmp_path):
    """One config, 4 folds, one worker: folds 0 and 1 train; against a (recorded) better config on folds 0 and 1 the
    paired t-test says worse, so folds 2 and 3 are not trained and are recorded as pruned (MLflow, sweep.status)."""
    work = tmp_path / "work"
    work.mkdir()
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.create_experiment("scaling-unet")
    for fold, iou in enumerate((0.99, 0.98, 0.99, 0.98)):  # an earlier sweep's best config, already FINISHED
        r = client.create_run(exp, tags={"config_key": "best00000000", "fold": str(fold)})
        client.log_metric(r.info.run_id, "mean_iou", iou)
        client.set_terminated(r.info.run_id, "FINISHED")
    args = [*TINY, "train.max_iters=4", "train.checkpoint_every=4", "fold=range(4)", "fold_pruning.test=paired_t",
            "fold_pruning.p=0.3", "hydra.launcher.n_workers=1"]
    res = subprocess.run([sys.executable, "-m", "sweep", *args, "-m"], cwd=tmp_path, env=_env(work),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stderr + res.stdout)[-4000:]
    runs = [r for r in client.search_runs([exp]) if r.data.tags.get("config_key") != "best00000000"
            and "fold" in r.data.tags]
    by_fold = {int(r.data.tags["fold"]): r for r in runs}
    assert sorted(by_fold) == [0, 1, 2, 3]
    assert {by_fold[f].info.status for f in (0, 1)} == {"FINISHED"}
    for f in (2, 3):
        r = by_fold[f]
        assert r.info.status == "KILLED" and r.data.tags["fold_pruned"] == "true"
        assert r.data.tags["skipped_reason"].startswith("fold pruning (paired_t): folds 0,1 mean IoU")
        assert r.data.tags["fold_pruning_best"] == "best00000000"
    key = by_fold[0].data.tags["config_key"]
    assert sorted(p.name for p in (work / "checkpoints" / key).iterdir()) == ["fold0", "fold1"]  # nothing trained
    # Fig. 3's note and missing.csv say which folds were not trained, and why.
    import pandas as pd

    from analysis.fig3 import fig3_note
    from analysis.results import config_table_from_runs, fold_pruned_configs, missing_training
    from analysis.store import RunRecord

    recs = [RunRecord.from_run(r) for r in client.search_runs([exp])]
    pruned = fold_pruned_configs(recs)
    assert list(pruned) == [(32, 1, 384)] and pruned[(32, 1, 384)].startswith("folds 2,3: fold pruning (paired_t)")
    note = fig3_note(pd.DataFrame({"n_folds": [2]}), pruned=pruned)
    assert "Folds not trained by fold pruning" in note and "c0=32 d=1 IS=384²: folds 2,3: fold pruning" in note
    table = config_table_from_runs(recs)  # configs.csv: what the config's trained folds used
    cost = table[table.config_key == key].iloc[0]
    assert cost.n_folds == 2 and cost.cpu_core_hours > 0 and pd.isna(cost.used_gpu_hours)
    (row,) = [r for r in missing_training(recs) if r["config_key"] == key]
    assert row["missing_folds"] == "2,3" and "folds 2,3: skipped, fold pruning (paired_t)" in row["note"], row
    status = subprocess.run([sys.executable, "-m", "sweep.status", *args], cwd=tmp_path, env=_env(work),
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr[-3000:]
    total = next(ln for ln in status.stdout.splitlines() if ln.startswith("total")).split()
    assert total[1:3] == ["2", "2"], status.stdout  # FINISHED 2, PRUNED 2
    assert "PRUNED       c32-d1-is384-fold2: fold pruning (paired_t)" in status.stdout


def test_a_trial_pruned_while_the_server_is_away_ends_killed_in_its_offline_store(tmp_path, monkeypatch):
    """Issue 29, item 4: the pruner stops a trial while the tracking server does not answer. Before, its pending
    metrics and tags were dropped and the server run stayed RUNNING; now it ends as any run ending in an outage:
    in its offline store, KILLED, with pruned_at_iteration and the metrics the server did not get (sweep.sync)."""
    from sweep.jobs.train import run
    from sweep.tracking.outbox import Outbox

    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    cfg = _train_cfg(work, "mlflow.end_wait_s=0.5")
    away = {"on": False}
    real_log, real_flush = Outbox.log_metrics, Outbox.flush

    def log_metrics(self, metrics, step=None, **kw):
        if step == 4 and "val_mean_iou" in metrics:
            away["on"] = True  # the server stops answering just as the first checkpoint's values come
        return real_log(self, metrics, step, **kw)

    monkeypatch.setattr(Outbox, "log_metrics", log_metrics)
    monkeypatch.setattr(Outbox, "flush", lambda self, **kw: False if away["on"] else real_flush(self, **kw))
    with trial_report.reporting(lambda value, iteration: True), pytest.raises(trial_report.TrialPruned):
        run(cfg)
    (store,) = list((work / "checkpoints").glob("*/fold0/mlflow/mlflow.db"))
    client = MlflowClient(f"sqlite:///{store}")
    (exp,) = [e for e in client.search_experiments() if e.name != "Default"]
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "KILLED" and r.data.tags["pruned_at_iteration"] == "4"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_mean_iou")] == [4]
    assert r.data.tags["server_run_id"]  # the server run it completes when sweep.sync copies it
