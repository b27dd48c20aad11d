"""The embedded default: `python -m sweep ... -m` through the local pool launcher, with a local MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.depth=2", "data.synth.size=32", "data.synth.n_train=4", "data.synth.n_test=1", "train.batch_size=2",
        "train.max_iters=4", "train.checkpoint_every=4", "train.val_crop=32", "train.val_slice_step=8",
        "train.final_slice_step=8", "train.open_slabs=2"]


def _sweep(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "sweep", *args, *TINY, "-m"], cwd=work.parent, env=env,
                          capture_output=True, text=True, timeout=600)


def _runs(work: Path) -> list:
    c = MlflowClient(f"sqlite:///{work}/mlflow.db")
    return c.search_runs([c.get_experiment_by_name("scaling-unet").experiment_id], max_results=1000)


def test_local_sweep_records_folds_and_parents_and_resumes(tmp_path, monkeypatch):
    work = tmp_path / "work"
    res = _sweep(work, "+experiment=compound", "model.width=32,64", "model.input_size=384", "fold=0,1")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = _runs(work)
    folds = [r for r in runs if "fold" in r.data.tags]
    parents = [r for r in runs if r.data.tags.get("is_parent") == "true"]
    assert len(folds) == 4 and all(r.info.status == "FINISHED" for r in folds)
    assert {r.data.tags["experiment"] for r in folds} == {"compound"}
    assert len(parents) == 2 and {p.data.tags["complete"] for p in parents} == {"false"}  # 2 of 4 folds
    for p in parents:
        kids = [r for r in folds if r.data.tags["mlflow.parentRunId"] == p.info.run_id]
        assert len(kids) == 2 and p.data.params["model.width"] == kids[0].data.params["model.width"]
        assert abs(p.data.metrics["mean_iou"] - sum(k.data.metrics["mean_iou"] for k in kids) / 2) < 1e-9
        assert p.info.start_time == min(k.info.start_time for k in kids)
        # The collapsed runs table shows the best fold's Dataset and Models on the parent row (issue 32)
        best = max(kids, key=lambda r: r.data.metrics["mean_iou"])
        full = MlflowClient(f"sqlite:///{work}/mlflow.db").get_run(p.info.run_id)
        assert p.data.tags["best_fold_run_id"] == best.info.run_id
        assert {d.dataset.name for d in full.inputs.dataset_inputs} == \
            {d.dataset.name for d in best.inputs.dataset_inputs} != set()
        assert [o.model_id for o in full.outputs.model_outputs] == [o.model_id for o in
                                                                   MlflowClient(f"sqlite:///{work}/mlflow.db")
                                                                   .get_run(best.info.run_id).outputs.model_outputs]
        # ... through a files-less logged model of the parent's own: the UI lists models by their source run
        client = MlflowClient(f"sqlite:///{work}/mlflow.db")
        own = client.search_logged_models(experiment_ids=[p.info.experiment_id],
                                          filter_string=f"source_run_id = '{p.info.run_id}'")
        assert [(m.name, m.tags["fold_model_id"]) for m in own] == \
            [("best-fold", client.get_run(best.info.run_id).outputs.model_outputs[-1].model_id)]
    # Again with all 4 folds: only the 4 missing runs are trained; the parents are updated, not duplicated.
    res = _sweep(work, "+experiment=compound", "model.width=32,64", "model.input_size=384", "fold=0,1,2,3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "8 jobs, 4 already FINISHED in MLflow (skipped)" in res.stderr + res.stdout
    runs = _runs(work)
    assert len([r for r in runs if "fold" in r.data.tags]) == 8
    parents = [r for r in runs if r.data.tags.get("is_parent") == "true"]
    assert len(parents) == 2 and {p.data.tags["complete"] for p in parents} == {"true"}
    assert all("mean_iou_se" in p.data.metrics for p in parents)
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    for p in parents:  # one best-fold model per parent, pointing at the best of its 4 folds now
        own = client.search_logged_models(experiment_ids=[p.info.experiment_id],
                                          filter_string=f"source_run_id = '{p.info.run_id}'")
        assert len(own) == 1 and own[0].tags["best_fold"] == p.data.tags["best_fold"]
    # parents linked again (a resumed sweep with nothing new): no duplicate link, no second best-fold model
    from sweep.tracking import parents as parents_mod

    warned = []
    monkeypatch.setattr(parents_mod.log, "warning", lambda *a: warned.append(a))
    parents_mod.link_parent_runs(f"sqlite:///{work}/mlflow.db", parents[0].info.experiment_id)
    assert warned == []
    for p in parents:
        assert len(client.search_logged_models(experiment_ids=[p.info.experiment_id],
                                               filter_string=f"source_run_id = '{p.info.run_id}'")) == 1
    # the sweep says where its runs are in the UI, on the model-training view (not MLflow's GenAI default)
    assert "/runs?workflowType=machine_learning" in res.stderr + res.stdout


def test_bad_config_in_a_sweep_stops_everything_before_training(tmp_path):
    work = tmp_path / "work"
    res = _sweep(work, "+experiment=compound", "model.width=32,0", "model.input_size=384", "fold=0")
    # Under -m as for a single run: exit status 2 and one error line, not Hydra's traceback.
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len([ln for ln in res.stderr.splitlines() if "error:" in ln]) == 1
    assert "1 of 2 configs is invalid; nothing was queued" in res.stderr and "model.width: must be positive" in res.stderr
    assert not (work / "checkpoints").exists()


def test_optuna_two_objectives_through_the_local_launcher(tmp_path):
    """Asynchronous slots as local processes; the same command again resumes the study instead of adding trials."""
    import json

    work = tmp_path / "work"
    res = _sweep(work, "+experiment=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Number of Pareto solutions" in res.stderr + res.stdout
    assert (work / "optuna" / "scaling-unet-laptop.journal").is_file()
    folds = [r for r in _runs(work) if "fold" in r.data.tags]
    assert len(folds) == 3 and {r.data.tags["experiment"] for r in folds} == {"optuna"}
    slots = work / "optuna" / "scaling-unet-laptop" / "slots"
    events = [json.loads(line) for p in sorted(slots.glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert {e["slot"] for e in events if e["event"] == "end"} == {0, 1}  # both slots ran trials
    again = _sweep(work, "+experiment=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 of 3 trials exist" in again.stderr + again.stdout
    assert len([r for r in _runs(work) if "fold" in r.data.tags]) == 3


def test_split_for_idle_workers_splits_only_when_configs_run_out():
    from hydra_plugins.scaling_unet.hints import JobGroup
    from hydra_plugins.scaling_unet.pool import split_for_idle_workers

    one = [JobGroup([0, 1, 2, 3], cost=4)]
    split_for_idle_workers(one, 2)
    assert [g.positions for g in one] == [[0, 1], [2, 3]]
    assert [g.cost for g in one] == [2, 2]
    many = [JobGroup([0, 1, 2, 3], cost=20), JobGroup([4, 5, 6, 7], cost=4)]
    split_for_idle_workers(many, 2)
    assert [len(g.positions) for g in many] == [4, 4]  # enough groups: folds stay together (traced model reused)
    three = [JobGroup([0], cost=5), JobGroup([1, 2, 3], cost=3)]
    split_for_idle_workers(three, 4)
    assert sorted(len(g.positions) for g in three) == [1, 1, 1, 1]


def test_the_folds_of_a_lone_config_run_on_both_workers(tmp_path):
    work = tmp_path / "work"
    res = _sweep(work, "model.width=32", "model.input_size=384", "fold=range(4)")
    assert res.returncode == 0, res.stderr[-3000:]
    folds = [r for r in _runs(work) if "fold" in r.data.tags]
    assert len(folds) == 4 and len({r.data.tags["pid"] for r in folds}) == 2


def test_runs_over_the_gpu_memory_are_skipped_recorded_and_reported(tmp_path):
    # gpu_mem_gb between the estimates of c0=32 and c0=64 (laptop: 2 and 4 channels): only c0=32 trains.
    from model.complexity import training_memory

    small, big = (training_memory(w, 2, 64, 2, "float32").total for w in (2, 4))
    limit = (small + big) / 2 / 1e9
    work = tmp_path / "work"
    args = ("model.width=32,64", "model.input_size=384", "fold=0", f"hydra.launcher.gpu_mem_gb={limit}")
    res = _sweep(work, *args, "on_oom=refuse")
    assert res.returncode != 0 and "1 config(s) do not fit the GPUs; nothing was queued" in res.stderr
    assert "c0=64 d=2 IS=384" in res.stderr and not (work / "mlflow.db").exists()
    res = _sweep(work, *args, "on_oom=skip")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [r for r in _runs(work) if "fold" in r.data.tags]
    by_width = {r.data.params["model.width"]: r for r in runs}
    assert by_width["32"].info.status == "FINISHED" and by_width["64"].info.status == "KILLED"
    assert "> gpu_mem_gb" in by_width["64"].data.tags["skipped_reason"]
    # The same command again trains nothing and records no second skip.
    res = _sweep(work, *args, "on_oom=skip")
    assert res.returncode == 0 and len([r for r in _runs(work) if "fold" in r.data.tags]) == 2
    # The missing-run report says why c0=64 is missing.
    rep = subprocess.run([sys.executable, "-m", "analysis", "missing", "--tracking-uri", f"sqlite:///{work}/mlflow.db",
                          "--out", str(tmp_path / "reports")], capture_output=True, text=True, timeout=300)
    assert rep.returncode in (0, 1), rep.stderr
    md = (tmp_path / "reports" / "missing.md").read_text()
    row = next(line for line in md.splitlines() if "| 64 | 2 | 384 |" in line)
    assert "fold 0: skipped, estimated peak GPU memory" in row


def test_default_halves_the_batch_or_skips_and_every_report_names_the_estimate(tmp_path):
    """on_oom=halve_batch (the default), laptop profile, tiny gpu_mem_gb: c0=32 fits at batch 2, c0=64 only at
    batch 1 (halved), c0=96 not even at one image (skipped); MLflow, sweep.status, missing.csv and Fig. 3 say so."""
    import pandas as pd

    from model.complexity import training_memory

    def gb(width: int, batch: int) -> float:  # laptop profile: widths ÷16, IS 384 → 64; TINY: depth 2, batch 2
        return training_memory(width // 16, 2, 64, batch, "float32").total

    assert gb(32, 2) < gb(96, 1) and gb(64, 1) < gb(96, 1) < gb(64, 2)
    limit = (max(gb(32, 2), gb(64, 1)) + gb(96, 1)) / 2 / 1e9
    work = tmp_path / "work"
    args = ("model.width=32,64,96", "model.input_size=384", "fold=0", f"hydra.launcher.gpu_mem_gb={limit!r}")
    res = _sweep(work, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "not fitting the GPUs (skipped), 1 at a halved batch" in res.stderr + res.stdout
    runs = {r.data.params["model.width"]: r for r in _runs(work) if "fold" in r.data.tags}
    assert runs["32"].info.status == "FINISHED" and "batch_halved" not in runs["32"].data.tags
    halved = runs["64"]
    assert halved.info.status == "FINISHED" and halved.data.params["train.batch_size"] == "1"
    why = halved.data.tags["batch_halved"]
    assert f"estimated peak GPU memory {gb(64, 2) / 1e9:.1f} GB per replica (global batch 2, 2 per GPU" in why
    assert f"global batch halved 2 → 1 (1 per GPU, estimated {gb(64, 1) / 1e9:.1f} GB per replica)" in why
    assert (halved.data.tags["batch_halved_from"], halved.data.tags["batch_halved_to"]) == ("2", "1")
    assert not any(k.startswith("batch_halved") for k in halved.data.params)  # bookkeeping, not a parameter
    skipped = runs["96"]
    assert skipped.info.status == "KILLED" and "batch_halved" not in skipped.data.tags
    assert f"{gb(96, 2) / 1e9:.1f} GB per replica (global batch 2" in skipped.data.tags["skipped_reason"]
    assert f"still {gb(96, 1) / 1e9:.1f} GB per replica at one image per GPU" in skipped.data.tags["skipped_reason"]
    # The same command again: nothing to train (the halved run's key is found FINISHED), no second skip.
    again = _sweep(work, *args)
    assert again.returncode == 0 and "3 jobs, 2 already FINISHED in MLflow (skipped)" in again.stderr + again.stdout
    assert len([r for r in _runs(work) if "fold" in r.data.tags]) == 3
    # sweep.status (same overrides): finished, with the halved and the skipped config and their estimates.
    env = dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3")
    st = subprocess.run([sys.executable, "-m", "sweep.status", *args, *TINY, "--no-parents"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
    assert st.returncode == 0, st.stdout + st.stderr
    assert "GPU memory (on_oom): 1 config(s) trained at a halved batch, 1 skipped" in st.stdout
    assert f"  halved: c64-d2-is384 (folds 0): {why}" in st.stdout
    assert f"  skipped: c96-d2-is384 (folds 0): {skipped.data.tags['skipped_reason']}" in st.stdout
    # missing.csv names the skipped config with its estimate; configs.csv and missing.md the halved one;
    # Fig. 3's note both.
    out = tmp_path / "reports"
    rep = subprocess.run([sys.executable, "-m", "analysis", "reports", "--tracking-uri",
                          f"sqlite:///{work}/mlflow.db", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert rep.returncode == 0, rep.stderr
    missing = pd.read_csv(out / "missing.csv", dtype=str).fillna("")
    at = {w: missing[(missing.width == w) & (missing.depth == "2") & (missing.input_size == "384")] for w in ("64", "96")}
    assert list(at["64"].missing_folds) == ["1,2,3"] and "skipped" not in at["64"].iloc[0].note  # fold 0 trained
    assert at["96"].iloc[0].note == f"fold 0: skipped, {skipped.data.tags['skipped_reason']}"
    configs = pd.read_csv(out / "configs.csv", dtype=str).fillna("")
    assert configs[configs.width == "64"].iloc[0].batch_halved == why
    assert configs[configs.width == "32"].iloc[0].batch_halved == ""
    assert f"c0=64 d=2 IS=384: {why}" in (out / "missing.md").read_text()
    note = rep.stdout[rep.stdout.index("Fig. 3: note under the figure: "):]
    assert "Trained at a halved global batch" in note and f"c0=64 d=2 IS=384²: {why}" in note
    assert "Not trained" in note and f"c0=96 d=2 IS=384²: {skipped.data.tags['skipped_reason']}" in note
    assert f"c0=64 d=2 IS=384: trained at a halved batch, {why}" in rep.stderr


def test_pool_workers_die_with_a_killed_sweep(tmp_path):
    # SIGKILL of the sweep process (no Ctrl-C clean-up) must not leave workers training on as orphans.
    import signal
    import time

    work = tmp_path / "work"
    env = dict(os.environ, SCALING_UNET_WORK=str(work), TF_CPP_MIN_LOG_LEVEL="3")
    args = [a for a in TINY if not a.startswith(("train.max_iters", "train.checkpoint_every"))]
    proc = subprocess.Popen([sys.executable, "-m", "sweep", "fold=0,1", *args, "train.max_iters=100000",
                             "train.checkpoint_every=100000", "-m"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    deadline = time.time() + 120
    while time.time() < deadline and not (work / "checkpoints").exists():  # a worker has started training
        time.sleep(0.5)
    workers = children()
    assert workers and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    alive = workers
    while alive and time.time() < deadline:
        alive = [p for p in workers if Path(f"/proc/{p}").exists() and "Z" not in
                 Path(f"/proc/{p}/stat").read_text().split()[2]]
        time.sleep(0.5)
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the killed sweep"


def test_a_local_sweep_leaves_a_pair_a_live_process_trains_and_ends_in_one_line_with_exit_3(tmp_path):
    """Issue 29 item 8: a (config, fold) whose lease a live process holds (a single run started beside the sweep)
    gave a 16-line Hydra traceback and rc 1; now it is left to that process, the sweep's other runs train, and the
    command ends as a single run on a held lease does: one error line, exit 3. Run again after: it trains the pair."""
    import json
    import socket

    from hydra import compose, initialize_config_dir

    import sweep  # noqa: F401 - registers the abspath resolver
    from sweep.core.runplan import plan_run

    work = tmp_path / "work"
    grid = ["+experiment=compound", "model.width=32", "model.input_size=384"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*grid, *TINY, "fold=1", f"paths.work={work}"])
    ckpt = plan_run(cfg).ckpt_dir
    ckpt.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (ckpt / "lease.json").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                     "since": 0.0}))
        res = _sweep(work, *grid, "fold=0,1")
        assert res.returncode == 3, res.stderr[-3000:]
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
        errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and f"process {holder.pid}" in errors[0] and "-fold1" in errors[0], errors
        folds = {r.data.tags["fold"]: r.info.status for r in _runs(work) if "fold" in r.data.tags}
        assert folds == {"0": "FINISHED"}  # the free pair trained; the held one was not touched
        assert json.loads((ckpt / "lease.json").read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    res = _sweep(work, *grid, "fold=0,1")  # the holder is gone: its lease is taken over, the pair trains
    assert res.returncode == 0, res.stderr[-3000:]
    folds = {r.data.tags["fold"]: r.info.status for r in _runs(work) if "fold" in r.data.tags}
    assert folds == {"0": "FINISHED", "1": "FINISHED"}
