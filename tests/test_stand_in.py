"""The stand-in rule (sweep/resources/standin.py): GPU jobs with the laptop profile or synthetic data, and the paper
profile on this machine's CPU, are refused unless allow_stand_in=true; sweep.plan and the sweep agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from sweep.orchestration.planning import CONF_DIR
from sweep.resources.standin import check_stand_in, stand_in_rule
from sweep.core.errors import ConfigError
from sweep.core.runplan import plan_run

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"paths.work={tmp_path}", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("overrides, field, what", [
    (["hydra/launcher=slurm_v100"], "profile",
     "1 run of profile=laptop (a CPU-scale stand-in: widths ÷16, train.max_iters=30) on synthetic data "
     "(data.synthesize=true) as GPU jobs (hydra.launcher.gpus_per_node=4)"),
    (["hydra/launcher=slurm_v100", "profile=paper"], "data.synthesize",
     "1 run of synthetic data (data.synthesize=true) as GPU jobs (hydra.launcher.gpus_per_node=4)"),
    (["hydra/launcher=slurm_v100", "data=prepared", "data.dataset=/x"], "profile", "1 run of profile=laptop"),
    (["profile=paper"], "profile",
     "1 run of profile=paper on this machine's CPU, up to 1,500,000 iterations (train.max_iters): the local "
     "launcher with no GPU declared (hydra.launcher.gpu_mem_gb=null)"),
])
def test_stand_ins_are_refused_naming_the_field_and_how_to_allow_them(tmp_path, overrides, field, what):
    cfg = _cfg(tmp_path, *overrides)
    verdict = stand_in_rule([cfg])
    assert verdict is not None and not verdict.allowed
    assert verdict.field == field and verdict.what.startswith(what), verdict.what
    with pytest.raises(ConfigError) as exc:
        check_stand_in([cfg])
    line = str(exc.value)
    assert line.startswith(f"{field}: ") and line.endswith("or allow_stand_in=true to run it anyway") and "\n" not in line


@pytest.mark.parametrize("overrides", [
    [],  # the embedded default: laptop profile, synthetic data, local CPU
    ["hydra/launcher=slurm_v100", "profile=paper", "data=prepared", "data.dataset=/x"],  # what the cluster is for
    ["profile=paper", "hydra.launcher.gpu_mem_gb=80"],  # a GPU workstation
    ["profile=paper", "+experiment=fusing"],  # Table 2 of trained models: no 1.5 M iterations
])
def test_commands_that_run_what_they_say_pass(tmp_path, overrides):
    assert stand_in_rule([_cfg(tmp_path, *overrides)]) is None


def test_allow_stand_in_runs_it_and_says_what_and_keeps_the_config_key(tmp_path, caplog):
    import logging

    cfg = _cfg(tmp_path, "hydra/launcher=slurm_v100", "allow_stand_in=true", "train.cpu_replicas=4",
               "train.batch_size=4")
    with caplog.at_level(logging.WARNING):
        verdict = check_stand_in([cfg, cfg], log=logging.getLogger("test"))
    assert verdict.allowed and verdict.runs == 2 and "2 runs of profile=laptop" in caplog.text
    assert plan_run(cfg).config_key == plan_run(_cfg(tmp_path, "hydra/launcher=slurm_v100",
                                                     "train.batch_size=4")).config_key


def test_a_refused_config_counts_before_an_allowed_one_and_runs_are_counted(tmp_path):
    ok = _cfg(tmp_path, "hydra/launcher=slurm_v100", "allow_stand_in=true")
    bad = _cfg(tmp_path, "hydra/launcher=slurm_v100")
    verdict = stand_in_rule([ok, bad, bad])
    assert not verdict.allowed and verdict.runs == 2 and verdict.what.startswith("2 runs of")
    optuna = _cfg(tmp_path, "+experiment=optuna", "hydra/launcher=slurm_v100", "hydra.sweeper.n_trials=64")
    assert stand_in_rule([optuna] * 3).what.startswith("64 runs of")  # an Optuna sweep: its trials


def test_a_single_runs_config_is_judged_with_the_launcher_given(tmp_path):
    cfg = _cfg(tmp_path, "profile=paper")
    launcher = cfg.hydra.launcher
    with open_dict(cfg):
        del cfg["hydra"]  # what @hydra.main hands the task function
    assert stand_in_rule([cfg]).field == "profile"  # no launcher known: a run on this machine
    assert stand_in_rule([cfg], launcher=launcher).field == "profile"
    assert stand_in_rule([cfg], launcher={"gpu_mem_gb": 32}) is None


def test_the_rule_imports_no_tensorflow():
    code = "import sys, sweep.resources.standin; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.slow
def test_plan_sweep_and_single_run_refuse_alike(tmp_path):
    """One error line, the same from sweep.plan and from the launch (SLURM launcher: nothing queued); the paper
    profile on this CPU alike from a single run and a local sweep."""
    env = dict(os.environ, SCALING_UNET_WORK=str(tmp_path / "work"), TF_CPP_MIN_LOG_LEVEL="3")
    hydra_dirs = [f"hydra.run.dir={tmp_path / 'hydra-run'}", f"hydra.sweep.dir={tmp_path / 'hydra-sweep'}"]

    def error_line(*args: str) -> str:
        multirun = ["-m"] if args[-1] == "-m" else []
        proc = subprocess.run([sys.executable, "-m", *args[:len(args) - len(multirun)], *hydra_dirs, *multirun],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return lines[0]

    gpu = ["+experiment=depth", "hydra/launcher=slurm_v100", "hydra.launcher.partition=gpu"]
    planned = error_line("sweep.plan", *gpu)
    assert planned == error_line("sweep", *gpu, "-m")
    assert planned.startswith("error: profile: 16 runs of profile=laptop")
    cpu = ["profile=paper", "model.depth=3"]
    single = error_line("sweep", *cpu)
    assert single == error_line("sweep.plan", *cpu)
    assert single.startswith("error: profile: 1 run of profile=paper on this machine's CPU, up to 1,500,000")
    assert error_line("sweep", "+experiment=depth", *cpu[:1], "-m").startswith("error: profile: 16 runs of profile=paper")
    assert not (tmp_path / "work").exists()  # refused before the dataset, the store or a job
