"""A real MLflow tracking server for tests: started once per session, stopped with its whole process group."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import typing as tp
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

START_TIMEOUT_S = 90.0
POOL_VARS = ("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW")
NULL_POOL = {"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"}  # a connection per session (docs/cluster.md)


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it; a tiny reuse race is acceptable in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ServerHandle:
    uri: str
    process: subprocess.Popen
    port: int
    log_path: Path | None = None
    started_in_s: float = 0.0

    def log_tail(self, n_chars: int = 4000) -> str:
        if self.log_path is None:
            return "<no server log>"
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "<no server log>"

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate the whole process group (uvicorn/gunicorn workers included), then kill what is left."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=timeout_s)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2.0) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


REPO = Path(__file__).resolve().parents[1]


def postgres_database(name: str | None = None) -> str:
    """A fresh database on the project's own PostgreSQL server (slurm/postgres.sh, started if needed): its URL."""
    name = name or f"mlflow_{uuid.uuid4().hex[:12]}"
    out = subprocess.run(["bash", str(REPO / "slurm" / "postgres.sh"), "createdb", name], capture_output=True,
                         text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"slurm/postgres.sh failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return f"{out.stdout.strip().splitlines()[-1]}/{name}"


def start_mlflow_server(workdir: Path, timeout_s: float = START_TIMEOUT_S, port: int | None = None,
                        backend_store_uri: str | None = None, workers: int = 1,
                        db_pool: tp.Mapping[str, str] | None = None) -> ServerHandle:
    """Start ``mlflow server`` on a free local port with proxied artifacts under ``workdir``; the store is
    ``backend_store_uri`` (a PostgreSQL database, as on a cluster) or a sqlite file under ``workdir``.
    ``db_pool``: the MLFLOW_SQLALCHEMYSTORE_* variables of the server's SQLAlchemy pool, in place of the inherited
    ones ({} = MLflow's default pool); None = NullPool on a database server (docs/cluster.md: MLflow's default pool
    deadlocks under load), the default pool on sqlite."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()  # a given port: the same server started again (an outage test)
    uri = f"http://127.0.0.1:{port}"
    log_path = workdir / "mlflow-server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--backend-store-uri", backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}",
        # Proxied artifacts (mlflow-artifacts:/): clients upload over HTTP, as a compute node without the disk would.
        "--serve-artifacts", "--artifacts-destination", str(workdir / "artifacts"),
    ]
    # Job execution spawns extra worker processes (~2 GB); tests need none of it.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if db_pool is None:
        on_db_server = bool(backend_store_uri) and not backend_store_uri.startswith("sqlite")
        db_pool = NULL_POOL if on_db_server else {}
    env = {**{k: v for k, v in env.items() if k not in POOL_VARS}, **db_pool}
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workdir, env=env, start_new_session=True)
    handle = ServerHandle(uri=uri, process=proc, port=port, log_path=log_path)
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before becoming healthy:\n"
                               f"{handle.log_tail()}")
        if _healthy(uri):
            handle.started_in_s = time.monotonic() - t0
            return handle
        time.sleep(0.25)
    handle.stop()
    raise RuntimeError(f"mlflow server at {uri} not healthy after {timeout_s:.0f} s:\n{handle.log_tail()}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """The tests' server, on PostgreSQL as docs/cluster.md recommends for many clients (SLURM arrays, Optuna slots)."""
    handle = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), backend_store_uri=postgres_database())
    try:
        yield handle
    finally:
        handle.stop()
