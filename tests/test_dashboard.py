"""Optuna's own dashboard on this project's study (python -m sweep.dashboard): it serves the study's trials over HTTP
from a snapshot of the journal, and the live journal is never written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, deadline: float) -> dict:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_the_dashboard_serves_a_finished_study_and_leaves_its_journal_untouched(tmp_path):
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "s.journal"
    study = optuna.create_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))),
                                direction="maximize")
    for width in (16, 32, 64):
        study.enqueue_trial({"width": width})
        t = study.ask({"width": optuna.distributions.IntDistribution(16, 64)})
        t.report(0.1 * width / 16, step=10)  # a rung's intermediate value, as the pruners see it
        study.tell(t, 0.5 + width / 1000)
    folder = tmp_path / "optuna" / "s"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"study_name": "s", "storage": f"journal:{journal}",
                                                   "n_trials": 3, "n_slots": 1}))
    before = journal.read_bytes()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sweep.dashboard", str(folder), "--port", str(port)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        studies = _get(f"http://127.0.0.1:{port}/api/studies", deadline)["study_summaries"]
        (s,) = [x for x in studies if x["study_name"] == "s"]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{s['study_id']}", deadline)
        trials = detail["trials"]
        assert len(trials) == 3 and {t["state"] for t in trials} == {"Complete"}
        assert sorted(t["params"][0]["param_internal_value"] for t in trials) == [16, 32, 64]
        assert all(t["intermediate_values"] for t in trials)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "optuna-dashboard: study 's'" in out and "127.0.0.1" in out
    assert journal.read_bytes() == before  # served from a snapshot: the study the slots write is not touched


def test_a_folder_without_a_study_record_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sweep.dashboard", str(tmp_path), "--port", "1"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "study.json" in proc.stderr
