"""sweep.plan and the experiment configs: job expansion, validation of all configs, the pinned sbatch script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sweep.orchestration.planning import CONF_DIR, expand_sweep, launcher_params
from sweep.slurm.sbatch import render_sbatch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "sbatch_slurm_v100.txt"
GOLDEN_GROUPS = REPO / "tests" / "golden" / "plan_groups_slurm_v100.txt"  # sweep.plan's arrays of the compound grid


def _prepared(tmp_path: Path) -> Path:
    """A tiny prepared dataset (data.synth, then data.prepare), for data=prepared."""
    from data.prepare import prepare_dataset
    from data.synth import main as synth_main

    raw, out = tmp_path / "raw", tmp_path / "prepared"
    synth_main(["--out", str(raw), "--size", "32", "--n-train", "4", "--n-test", "1"])
    prepare_dataset(raw, out)
    return out


def _plan(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SCALING_UNET_WORK=str(tmp_path / "work"), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "sweep.plan", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("experiment, n", [("compound", 192), ("depth", 16), ("width", 16), ("input_size", 12)])
def test_experiments_expand_to_the_papers_grids(tmp_path, experiment, n):
    _, jobs = expand_sweep([f"+experiment={experiment}", f"paths.work={tmp_path}"])
    assert len(jobs) == n
    assert len({tuple(sorted(j)) for j in jobs}) == n
    folds = {o for j in jobs for o in j if o.startswith("fold=")}
    assert folds == {"fold=0", "fold=1", "fold=2", "fold=3"}


def test_compound_grid_has_every_width_depth_input_size(tmp_path):
    _, jobs = expand_sweep(["+experiment=compound", f"paths.work={tmp_path}"])
    combos = {tuple(sorted(o for o in j if o.split("=")[0] in ("model.width", "model.depth", "model.input_size")))
              for j in jobs}
    assert len(combos) == 48


def test_command_line_sweep_overrides_the_experiments(tmp_path):
    _, jobs = expand_sweep(["+experiment=compound", "model.width=32,64", "model.depth=3", f"paths.work={tmp_path}"])
    assert len(jobs) == 2 * 1 * 3 * 4


def test_sbatch_script_is_pinned_by_the_golden_file(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm_v100", f"paths.work={tmp_path}"],
                      return_hydra_config=True)
    text = render_sbatch(launcher_params(cfg), 192, folder="/sweeps/compound/.submitit/%j", python="/opt/venv/bin/python")
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    # What a cluster admin relies on, spelled out:
    for line in ("#SBATCH --array=0-191%16", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --signal=USR2@300", "#SBATCH --time=2880", "#SBATCH --cpus-per-task=16"):
        assert line in text


def test_launcher_options_are_overridable(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm_v100", f"paths.work={tmp_path}",
                                           "hydra.launcher.array_parallelism=3", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.account=bone", "hydra.launcher.qos=high",
                                           "hydra.launcher.constraint=v100-32g", "hydra.launcher.gpus_per_node=8",
                                           "hydra.launcher.setup=[module load cuda]"], return_hydra_config=True)
    text = render_sbatch(launcher_params(cfg), 10, folder="/f/%j", python="python")
    for line in ("--array=0-9%3", "--partition=gpu", "--account=bone", "--qos=high", "--constraint=v100-32g",
                 "--gpus-per-node=8", "module load cuda"):
        assert line in text


def test_plan_prints_runs_configs_estimate_and_the_sbatch_of_each_time_group(tmp_path):
    res = _plan(tmp_path, "+experiment=compound", "hydra/launcher=slurm_v100", "profile=paper", "on_oom=skip",
                "allow_stand_in=true", "hydra.sweep.dir=/sweeps/compound")  # synthetic data on GPUs: allowed
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "runs: 192" in out and "to queue: 176" in out and "finished: 0 already FINISHED" in out
    assert "not fitting the GPUs: 16 runs skipped (on_oom)" in out
    assert "279,873,796" in out  # c0=96, d=5: the paper's ~280 M parameters
    assert "GPU-hours, upper bound" in out
    # The 176 runs in 3 arrays by predicted time: each its own --time, together at most 16 tasks at once.
    arrays = [line.split("=")[1] for line in out.splitlines() if line.startswith("#SBATCH --array=")]
    times = [int(line.split("=")[1]) for line in out.splitlines() if line.startswith("#SBATCH --time=")]
    assert len(arrays) == 3 and sum(int(a.split("%")[0].split("-")[1]) + 1 for a in arrays) == 176
    assert sum(int(a.split("%")[1]) for a in arrays) == 16
    assert times == sorted(times, reverse=True) and len(set(times)) == 3 and times[0] == 2880
    groups = out[out.index("arrays: "):].replace(sys.executable, "PYTHON")
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN_GROUPS.write_text(groups)
    assert groups == GOLDEN_GROUPS.read_text()
    assert not (tmp_path / "work").exists()  # planning writes nothing


def test_plan_at_paper_scale_halves_or_skips_what_does_not_fit_a_32_gb_v100(tmp_path):
    """The default (on_oom=halve_batch): exit 0, every config that fits is queued, each halved or skipped
    config is named with its estimate (GB per replica, global batch before and after)."""
    prepared = _prepared(tmp_path)
    res = _plan(tmp_path, "+experiment=compound", "hydra/launcher=slurm_v100", "profile=paper", "data=prepared",
                f"data.dataset={prepared}")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "runs: 192" in out and "to queue: 188" in out
    assert "halved batch: 12 runs of 3 config(s) queued at a smaller global batch" in out
    assert "not fitting the GPUs: 4 runs skipped (on_oom)" in out
    assert "GPU memory: 3 config(s) halved, 1 skipped (on_oom=halve_batch, gpu_mem_gb 32 per GPU, 4 GPUs per run):" in out
    section = {line.split(": ", 1)[1].split(":")[0]: line.strip() for line in out.splitlines()
               if line.startswith(("  halved: ", "  skipped: "))}
    assert sorted(section) == ["c0=112 d=6 IS=384", "c0=112 d=6 IS=512", "c0=112 d=6 IS=640", "c0=96 d=6 IS=640"]
    for name, gb, after in (("c0=112 d=6 IS=384", "33.8", "halved 16 → 8 (2 per GPU, estimated 31.2 GB"),
                            ("c0=112 d=6 IS=512", "37.9", "halved 16 → 4 (1 per GPU, estimated 30.9 GB"),
                            ("c0=96 d=6 IS=640", "33.9", "halved 16 → 8 (2 per GPU, estimated 27.6 GB")):
        assert section[name].startswith("halved: ") and after in section[name]
        assert f"{gb} GB per replica (global batch 16, 4 per GPU, mixed_float16) > gpu_mem_gb 32" in section[name]
    skip = section["c0=112 d=6 IS=640"]
    assert skip.startswith("skipped: ") and "43.3 GB per replica (global batch 16, 4 per GPU" in skip
    assert "still 32.2 GB per replica at one image per GPU (global batch 4)" in skip and "not queued" in skip
    rows = {tuple(line.split()[:3]): line for line in out.splitlines() if line[:4].strip().isdigit()}
    assert rows[("112", "6", "384")].split()[6] == "8" and "batch 8" in rows[("112", "6", "384")]
    assert "NO: skip" in rows[("112", "6", "640")] and " yes " in rows[("32", "3", "384")]
    assert not (tmp_path / "work").exists()


def test_plan_refuses_configs_that_do_not_fit_a_32_gb_v100_with_on_oom_refuse(tmp_path):
    res = _plan(tmp_path, "+experiment=compound", "hydra/launcher=slurm_v100", "profile=paper", "on_oom=refuse",
                "data=prepared", f"data.dataset={_prepared(tmp_path)}")
    assert res.returncode == 2
    assert "4 config(s) do not fit the GPUs; nothing was queued" in res.stderr
    # c0=112, d=6 at every input size, c0=96, d=6 at 640²: each named with its estimate
    for name in ("c0=112 d=6 IS=384", "c0=112 d=6 IS=512", "c0=112 d=6 IS=640", "c0=96 d=6 IS=640"):
        assert name in res.stderr
    assert "43.3 GB per replica (global batch 16, 4 per GPU, mixed_float16) > gpu_mem_gb 32" in res.stderr
    rows = {tuple(line.split()[:3]): line for line in res.stdout.splitlines() if line.strip().endswith("0.0")
            or " NO" in line or " yes " in line}
    assert " NO" in rows[("112", "6", "640")] and " yes " in rows[("32", "3", "384")]
    assert not (tmp_path / "work").exists()


def test_plan_rejects_all_bad_configs_together(tmp_path):
    res = _plan(tmp_path, "+experiment=depth", "model.input_size=100,384", "model.width=0,32")
    assert res.returncode == 2
    err = res.stderr
    assert "of 64 configs are invalid; nothing was queued" in err
    assert "model.width: must be positive" in err and "model.input_size: 100 is not divisible" in err


def test_optuna_experiment_composes_with_two_objectives(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=optuna", f"paths.work={tmp_path}"], return_hydra_config=True)
    assert "optuna" in cfg.hydra.sweeper._target_.lower()
    assert list(cfg.hydra.sweeper.direction) == ["maximize", "minimize"]
    assert list(cfg.objectives) == ["mean_iou", "flops"]
    assert cfg.hydra.sweeper._target_.endswith("AsyncOptunaSweeper")
    assert cfg.hydra.sweeper.storage == f"journal:{tmp_path}/optuna/scaling-unet-laptop.journal"


def test_optuna_experiment_plans_its_categorical_grid(tmp_path):
    _, jobs = expand_sweep(["+experiment=optuna", f"paths.work={tmp_path}"])
    assert len(jobs) == 4 * 4 * 3  # width × depth × input size; the learning rate at its low end
    assert all("train.learning_rate=0.0001" in j for j in jobs)


def test_plan_with_a_pruner_previews_how_many_trials_reach_each_length(tmp_path):
    from sweep.orchestration.planning import pruning_preview

    asha = {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 10, "reduction_factor": 3}
    steps = pruning_preview(asha, 12, 90, 10)
    assert [s for s, _ in steps] == [10, 30, 90]
    assert [round(n, 2) for _, n in steps] == [8.0, 2.67, 1.33]  # 12 → 4 → 1.33 go on past the rungs at 10 and 30
    # "auto" (Optuna: 1/100 of the first COMPLETE trial's steps), rungs between two checkpoints judged at the later one.
    auto = pruning_preview({**asha, "min_resource": "auto"}, 27, 1_500_000, 1000)
    assert auto[0] == (15000, 18.0) and auto[-1][0] == 1_500_000 and sum(n for _, n in auto) == pytest.approx(27)
    assert pruning_preview({"_target_": "optuna.pruners.MedianPruner"}, 12, 90, 10) is None
    res = _plan(tmp_path, "+experiment=optuna_asha", "train.max_iters=90", "train.checkpoint_every=10")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pruner: SuccessiveHalvingPruner (reduction factor 3, first rung 10 iterations): of 12 trials" in res.stdout
    assert "        90 iterations:    1.3 trials  (train.max_iters)" in res.stdout and "(26%;" in res.stdout
    one = _plan(tmp_path, "+experiment=optuna_asha")  # the laptop profile validates once per run
    assert "cannot stop a trial early here: one validation per trial" in one.stdout
