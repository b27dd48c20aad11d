"""Bad inputs of the commands that follow a sweep (sweep.status, sweep.trials, sweep.sync), called in-process through
their ``main(argv)`` (a subprocess costs seconds of imports; tests/test_bad_inputs.py proves the real exit codes):
exit 2, one ``error:`` line naming the file or field, no traceback, nothing written."""

from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import pytest

from tests.conftest import tree_snapshot


def _study(root: Path, journal_text: tp.Optional[str]) -> list[str]:
    folder = root / "work" / "optuna" / "s"
    folder.mkdir(parents=True)
    journal = root / "work" / "optuna" / "s.journal"
    (folder / "study.json").write_text(json.dumps({"study_name": "s", "storage": f"journal:{journal}",
                                                   "n_trials": 4, "n_slots": 2, "directions": ["maximize"]}))
    if journal_text is not None:
        journal.write_text(journal_text)
    return [str(folder)]


def _corrupt_store(root: Path) -> list[str]:
    db = root / "work" / "checkpoints" / "abc" / "fold0" / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True)
    db.write_text("not a database\n" * 20)
    return [f"paths.work={root / 'work'}", f"mlflow.tracking_uri=sqlite:///{root / 'work' / 'server.db'}"]


CASES: list[tuple[str, str, tp.Callable[[Path], list[str]], str]] = [
    ("status: --watch inf", "sweep.status", lambda r: ["--watch", "inf", f"paths.work={r}"], "--watch"),
    ("status: --watch nan", "sweep.status", lambda r: ["--watch", "nan", f"paths.work={r}"], "--watch"),
    ("status: --watch -1", "sweep.status", lambda r: ["--watch", "-1", f"paths.work={r}"], "--watch"),
    ("status: a typo in an override", "sweep.status", lambda r: ["mlfow.experiment=x", f"paths.work={r}"], "mlfow"),
    ("trials: a corrupt journal", "sweep.trials", lambda r: _study(r, "{not json\n"), "cannot be read"),
    ("trials: study.json names a missing journal", "sweep.trials", lambda r: _study(r, None), "does not exist"),
    ("trials: no study.json", "sweep.trials", lambda r: [str(r)], "study.json"),
    ("trials: study.json without storage", "sweep.trials",
     lambda r: ((r / "study.json").write_text('{"study_name": "s"}'), [str(r)])[1], "storage"),
    ("sync: a corrupt offline store", "sweep.sync", _corrupt_store, "fold0/mlflow/mlflow.db"),
    ("sync: a typo in an override", "sweep.sync", lambda r: ["mlfow.experiment=x", f"paths.work={r}"], "mlfow"),
]


@pytest.mark.parametrize("name,module,setup,names", CASES, ids=[c[0] for c in CASES])
def test_command_refuses_bad_input_in_one_line_and_writes_nothing(name, module, setup, names, tmp_path, capsys):
    import importlib

    args = setup(tmp_path)
    before = tree_snapshot(tmp_path)
    dirs_before = sorted(p for p in tmp_path.rglob("*") if p.is_dir())
    main = importlib.import_module(module).main
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert names in lines[0], (names, lines[0])
    assert tree_snapshot(tmp_path) == before, "files were written or changed"
    assert sorted(p for p in tmp_path.rglob("*") if p.is_dir()) == dirs_before, "folders were created"
