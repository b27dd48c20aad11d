"""``python -m <module> <args>`` in a process forked from one that imported the command lines' libraries once.

A bad-input case costs its command's imports (Hydra, MLflow, h5py, SciPy: 1.5–2.5 s of CPU) far more than
its check. A zygote process imports those once; each command is then a fork of it that runs the module as
``python -m`` does (``sys.argv``, the working directory first on ``sys.path``, ``__main__``, exit status,
atexit handlers, stdout and stderr of its own), so a case still sees the real command line, exit status and
stderr. The zygote never imports TensorFlow (forking after its threads start is unsafe) and refuses to fork
while any thread but its own runs; a command that needs TensorFlow imports it in the fork, as a fresh
process would.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import typing as tp
from pathlib import Path

# Runs in the zygote: `python -c ZYGOTE <module>...`. One request per line on stdin, JSON; answers on stdout:
# the fork's pid, then its exit status as subprocess reports it (negative: killed by that signal).
ZYGOTE = r'''
import importlib, json, os, sys, threading
for name in sys.argv[1:]:
    importlib.import_module(name)

def child(req):
    import atexit, runpy
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    for target, path in ((1, req["out"]), (2, req["err"])):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    sys.path[0] = os.getcwd()  # as `python -m` puts it
    sys.argv = ["-m", *req["args"][1:]]
    code = 0
    try:
        runpy._run_module_as_main(req["args"][0], True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()  # joins non-daemon threads, as the interpreter does at exit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)

for line in sys.stdin:
    req = json.loads(line)
    if threading.active_count() != 1:
        os.write(1, (json.dumps({"error": f"{threading.active_count()} threads in the zygote: no fork"}) + "\n").encode())
        continue
    pid = os.fork()
    if pid == 0:
        child(req)
    os.write(1, (json.dumps({"pid": pid}) + "\n").encode())
    _, status = os.waitpid(pid, 0)
    os.write(1, (json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n").encode())
'''


class ForkedCli:
    """A zygote with ``preload`` imported; :meth:`run` is ``subprocess.run([python, "-m", ...])`` by fork."""

    def __init__(self, preload: tp.Sequence[str], cwd: Path, env: dict[str, str]) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="forked-cli-")
        self._proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, *preload], cwd=cwd, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _answer(self, timeout: float | None) -> dict[str, tp.Any] | None:
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote ended (status {self._proc.wait()}): see the test's stderr")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        assert args[0] == "-m", args  # only `python -m <module> ...`
        assert self._proc.stdin is not None
        out, err = Path(self._tmp.name, "stdout"), Path(self._tmp.name, "stderr")
        self._proc.stdin.write(json.dumps({"args": args[1:], "cwd": str(cwd), "env": env, "out": str(out),
                                           "err": str(err)}) + "\n")
        self._proc.stdin.flush()
        forked = self._answer(60)
        if forked is None:
            raise RuntimeError("the zygote did not fork within 60 s")
        pid = forked["pid"]
        answer = self._answer(timeout)
        if answer is None:
            os.kill(pid, signal.SIGKILL)
            self._answer(60)
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess([sys.executable, *args], answer["status"], out.read_text(), err.read_text())

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._tmp.cleanup()

    def __enter__(self) -> ForkedCli:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
