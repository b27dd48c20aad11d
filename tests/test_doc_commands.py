"""Every ``python -m sweep…`` command of README.md, docs/*.md, slurm/README.md and the conf/ comments runs what
it says: each is extracted (code blocks with backslash continuations and ``S="..."`` variables, inline code
spans, YAML comments), its example paths replaced by a tiny prepared dataset and its tracking server by a
local SQLite file, and then composed and checked as ``python -m sweep.plan`` does (expand_sweep, every job's
config, check_jobs, the stand-in rule of sweep/resources/standin.py, the dataset checks), without SLURM, MLflow or
TensorFlow. A command that does not compose, or that the launchers would refuse, fails here.

Commands that are not sweeps: ``sweep.status`` and ``sweep.sync`` parse their options and compose their overrides
as the sweep they name; ``sweep.trials`` parses and must name the study folder of the Optuna command before it;
``sweep.predict`` composes conf/predict.yaml and checks its settings (sweep.predict.plan_volumes). SKIPPED lists
what is not checked, with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import typing as tp
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "slurm" / "README.md"]
CONF_FILES = sorted((REPO / "conf").rglob("*.yaml"))
EXAMPLE_DATASETS = ("/data/prepared", "/path/to/prepared")  # replaced by the tiny prepared dataset
EXAMPLE_RUN_ID = "0123456789abcdef0123456789abcdef"
# What is not checked, and why (a substring of the command's text -> reason).
SKIPPED = {
    "hydra/launcher=slurm_v100 ... -m": "elided (`...`): a sentence about the launcher, not a command to run",
}


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # file:line
    module: str  # sweep, sweep.plan, sweep.status, ...
    args: tuple[str, ...]
    text: str  # as written, variables expanded
    previous: tuple["Command", ...] = dataclasses.field(default=(), repr=False, compare=False)  # earlier, same file

    @property
    def id(self) -> str:
        return f"{self.where}: {self.module} {' '.join(self.args)}"[:150]


# ------------------------------------------------------------------------------------------- extraction

_VAR = re.compile(r"^([A-Za-z_]\w*)=(.*)$")
_PLACEHOLDER = re.compile(r"<([^<>]+)>")


def _placeholders(text: str) -> str:
    return _PLACEHOLDER.sub(lambda m: EXAMPLE_RUN_ID if "run id" in m.group(1) else "PLACEHOLDER", text)


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


def _commands_in(text: str, where: str, variables: dict[str, str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(text, module, args) of each ``python -m sweep…`` in one logical shell line (after variables)."""
    text = _expand(text.strip(), variables)
    try:
        tokens = shlex.split(_placeholders(text), comments=True)
    except ValueError as exc:
        raise AssertionError(f"{where}: cannot split {text!r}: {exc}") from None
    m = _VAR.match(tokens[0]) if len(tokens) == 1 else None
    if m:  # S="..." (a prefix such as VAR=x before a command is not an assignment)
        variables[m.group(1)] = " ".join(shlex.quote(v) for v in shlex.split(m.group(2)))
        return []
    out = []
    for i, tok in enumerate(tokens[:-2]):
        if (Path(tok).name.startswith("python") and tokens[i + 1] == "-m"
                and re.fullmatch(r"sweep(\.\w+)?", tokens[i + 2])):
            end = next((k for k in range(i + 3, len(tokens)) if tokens[k] in ("&&", "||", ";", "|")), len(tokens))
            out.append((text, tokens[i + 2], tuple(tokens[i + 3:end])))
    return out


def extract_markdown(text: str, name: str) -> list[Command]:
    """Every command of one Markdown file: fenced shell blocks (continuations, variables) and inline code."""
    found: list[Command] = []
    variables: dict[str, str] = {}
    lines = text.splitlines()
    fence, i = None, 0
    while i < len(lines):
        line = lines[i]
        start = i + 1
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else (line.strip()[3:].strip() or "sh")
            i += 1
            continue
        if fence is not None:
            if fence in ("bash", "sh", "shell", "console"):
                logical = line
                while logical.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    logical = logical.rstrip()[:-1] + " " + lines[i].strip()
                for t, module, args in _commands_in(logical, f"{name}:{start}", variables):
                    found.append(Command(f"{name}:{start}", module, args, t, tuple(found)))
        else:
            for span in re.findall(r"`([^`]*python -m sweep[^`]*)`", line):
                for t, module, args in _commands_in(span, f"{name}:{start}", variables):
                    found.append(Command(f"{name}:{start}", module, args, t, tuple(found)))
        i += 1
    return found


def extract_yaml_comments(text: str, name: str) -> list[Command]:
    """The commands in a config file's comments (``#   python -m sweep … \\`` and its continuation lines)."""
    found: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*#\s+((?:\S*/)?python -m sweep.*)$", lines[i])
        start = i + 1
        if m:
            logical = m.group(1)
            while logical.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                logical = logical.rstrip()[:-1] + " " + lines[i].lstrip().lstrip("#").strip()
            for t, module, args in _commands_in(logical, f"{name}:{start}", {}):
                found.append(Command(f"{name}:{start}", module, args, t, tuple(found)))
        i += 1
    return found


def all_commands() -> list[Command]:
    out = []
    for path in DOCS:
        out += extract_markdown(path.read_text(), str(path.relative_to(REPO)))
    for path in CONF_FILES:
        out += extract_yaml_comments(path.read_text(), str(path.relative_to(REPO)))
    return out


COMMANDS = all_commands()


# --------------------------------------------------------------------------------------------- checks


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A tiny prepared dataset (the project's writers), a work folder and a local SQLite tracking URI."""
    from data.prepare import prepare_dataset
    from tests.conftest import write_raw_dataset

    root = tmp_path_factory.mktemp("doc-commands")
    write_raw_dataset(root / "raw", n_train=4, n_test=1, shape=(8, 10, 12))
    prepare_dataset(root / "raw", root / "prepared")
    return {"root": root, "prepared": root / "prepared", "work": root / "work", "db": root / "mlflow.db"}


def _substitute(args: tp.Sequence[str], env: dict[str, Path]) -> list[str]:
    """Example paths and servers by local ones; ``paths.work`` under tmp (a command's own value still wins)."""
    out = [f"paths.work={env['work']}"]
    for a in args:
        key, eq, value = a.partition("=")
        if eq and key.lstrip("+~") == "data.dataset" and value.rstrip("/") in EXAMPLE_DATASETS:
            a = f"{key}={env['prepared']}"
        elif eq and key.lstrip("+~") in ("mlflow.tracking_uri", "tracking_uri") and value.startswith("http"):
            a = f"{key}=sqlite:///{env['db']}"
        out.append(a)
    return out


def check_sweep(overrides: tp.Sequence[str]) -> tp.Any:
    """Compose and check a training sweep (or single run) as ``python -m sweep.plan`` does; raises what it refuses."""
    from sweep.orchestration.prepare import check_jobs
    from sweep.orchestration.planning import compose_jobs, expand_sweep
    from sweep.resources.standin import check_stand_in
    from sweep.jobs.train import check_dataset

    _, job_overrides = expand_sweep(list(overrides))
    jobs = check_jobs(compose_jobs(job_overrides))
    check_stand_in([j.cfg for j in jobs])
    for path in sorted({str(j.plan.dataset) for j in jobs}):
        check_dataset(next(j.cfg for j in jobs if str(j.plan.dataset) == path))
    return jobs


_CHECKED: dict[tuple[str, ...], tp.Any] = {}


def _check_sweep_cached(overrides: list[str]) -> tp.Any:
    key = tuple(overrides)
    if key not in _CHECKED:
        _CHECKED[key] = check_sweep(overrides)
    return _CHECKED[key]


class _Parsed(Exception):
    pass


def parse_cli(main: tp.Callable, argv: tp.Sequence[str]) -> argparse.Namespace:
    """The namespace a CLI's ``main(argv)`` parses, stopping it right after argparse (nothing runs)."""
    parse = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            main(list(argv))
        except _Parsed as done:
            return done.args[0]
        except SystemExit as exc:
            raise AssertionError(f"arguments refused by argparse (exit {exc.code}): {list(argv)}") from None
    raise AssertionError("main() returned without parsing its arguments")


def _sweep_args(args: tp.Sequence[str]) -> list[str]:
    """A sweep's overrides: ``-m`` and sweep.plan's own options left out."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("-m", "--multirun"):
            continue
        elif a == "--tflops-per-gpu":
            skip = True
        elif not a.startswith("--tflops-per-gpu="):
            out.append(a)
    return out


def check_command(cmd: Command, env: dict[str, Path]) -> None:
    if cmd.module in ("sweep", "sweep.plan"):
        _check_sweep_cached(_substitute(_sweep_args(cmd.args), env))
    elif cmd.module in ("sweep.status", "sweep.sync"):
        if cmd.module == "sweep.status":
            from sweep.status import main
        else:
            from sweep.sync import main
        ns = parse_cli(main, cmd.args)
        if not getattr(ns, "sweep_id", None):  # the sweep's overrides: they must name a sweep that runs
            _check_sweep_cached(_substitute(ns.overrides, env))
    elif cmd.module in ("sweep.trials", "sweep.dashboard"):
        if cmd.module == "sweep.trials":
            from sweep.trials import main
        else:
            from sweep.dashboard import main

        ns = parse_cli(main, cmd.args)
        optuna = [c for c in cmd.previous if c.module == "sweep" and "+experiment=optuna" in c.args]
        if optuna:  # the folder the Optuna command before it writes: work/optuna/<study_name>
            jobs = _check_sweep_cached(_substitute(_sweep_args(optuna[-1].args), env))
            study = str(jobs[0].cfg.hydra.sweeper.study_name)
            assert Path(ns.folder).name == study, (
                f"{cmd.where}: {cmd.module} {ns.folder} but the Optuna command before it ({optuna[-1].where}) "
                f"names its study {study!r}")
    elif cmd.module == "sweep.predict":
        from hydra import compose, initialize_config_dir

        from sweep.orchestration.planning import CONF_DIR
        from sweep.predict import plan_volumes

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("predict", overrides=_substitute(cmd.args, env), return_hydra_config=True)
        plan_volumes(cfg)
    elif cmd.module == "sweep.register":
        from hydra import compose, initialize_config_dir

        from sweep.jobs.registry import check_settings
        from sweep.orchestration.planning import CONF_DIR

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("register", overrides=_substitute(cmd.args, env), return_hydra_config=True)
        check_settings(cfg)
    else:
        raise AssertionError(f"{cmd.where}: no check for python -m {cmd.module}: add one to tests/test_doc_commands.py")


# ---------------------------------------------------------------------------------------------- tests


def test_the_extraction_finds_the_commands_of_every_kind():
    modules = {c.module for c in COMMANDS}
    assert {"sweep", "sweep.plan", "sweep.status", "sweep.trials", "sweep.predict", "sweep.sync"} <= modules, modules
    assert len(COMMANDS) >= 40, len(COMMANDS)
    where = {c.where.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/cluster.md", "docs/sweeps.md", "docs/training.md", "conf/config.yaml",
            "conf/experiment/compound.yaml"} <= where, where
    # README's $S lines expand to the whole sweep, continuations are joined
    s_lines = [c for c in COMMANDS if c.where.startswith("README.md") and "hydra.launcher.wait=false" in c.args]
    assert s_lines and all("+experiment=compound" in c.args and "data=prepared" in c.args for c in s_lines)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_composes_and_is_not_refused(cmd: Command, env):
    reason = next((why for text, why in SKIPPED.items() if text in cmd.text), None)
    if reason:
        pytest.skip(reason)
    try:
        check_command(cmd, env)
    except Exception as exc:  # one message naming the command, as a reader would type it
        pytest.fail(f"{cmd.where}: `python -m {cmd.module} {' '.join(cmd.args)}` is refused: "
                    f"{type(exc).__name__}: {exc}", pytrace=False)


OLD_README = '''
```bash
S="+experiment=compound hydra/launcher=slurm_v100 profile=paper mlflow=server \\
   mlflow.tracking_uri=http://mlflow-host:5000"
.venv/bin/python -m sweep $S hydra.launcher.wait=false -m    # prints the sweep id, array ids, how to follow/cancel
.venv/bin/python -m sweep +experiment=optuna hydra/launcher=slurm_v100 hydra.sweeper.n_trials=64 \\
    hydra.sweeper.n_jobs=16 -m
```
'''


def test_an_offending_command_is_refused(env):
    """The README's cluster lines before this check: synthetic data (no data=prepared) and the laptop profile
    on 4-GPU SLURM jobs. The check must fail them, naming the field."""
    from sweep.core.errors import ConfigError

    compound, optuna = extract_markdown(OLD_README, "old-README.md")
    assert compound.args[:4] == ("+experiment=compound", "hydra/launcher=slurm_v100", "profile=paper", "mlflow=server")
    with pytest.raises(ConfigError, match=r"^data\.synthesize: .*synthetic data .* as GPU jobs .*data=prepared"):
        check_command(compound, env)
    with pytest.raises(ConfigError, match=r"^profile: .*profile=laptop .*allow_stand_in=true"):
        check_command(optuna, env)
    with pytest.raises(ConfigError, match=r"^profile: 1 run of profile=paper on this machine's CPU, up to 1,500,000"):
        check_sweep(_substitute(["profile=paper", "data=prepared", "data.dataset=/data/prepared"], env))
    with pytest.raises(Exception, match="model.input_size"):
        check_sweep(_substitute(["model.input_size=390"], env))
