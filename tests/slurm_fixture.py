"""A real single-node SLURM cluster (slurm/start.sh) for tests: installed and started once per session.

Usage in a test module::

    from tests.slurm_fixture import slurm_cluster  # noqa: F401

    def test_something(slurm_cluster):
        job = slurm_cluster.sbatch("--time=1", wrap="hostname", output=slurm_cluster.out_dir / "x.out")
        slurm_cluster.wait_state(job, "COMPLETED")

The cluster is left running after the session (start.sh is idempotent: the next session finds it
warm in ~1 s); ``slurm/stop.sh`` stops it. ``SLURM_CONF`` is set in ``os.environ`` for the session.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
import typing as tp
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
JOB_PREFIX = "su-test-"  # job names of test jobs; leftovers of an interrupted session are cancelled
INSTALL_TIMEOUT_S = 900.0
START_TIMEOUT_S = 300.0
CMD_TIMEOUT_S = 30.0


@dataclasses.dataclass
class SlurmCluster:
    state_dir: Path
    conf: Path
    out_dir: Path
    start_output: str
    started_in_s: float
    node: str
    partition: str = "gpu"
    submitted: list[str] = dataclasses.field(default_factory=list)

    # ------------------------------------------------------------------ commands
    def run(self, *cmd: str, check: bool = True, timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess:
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        p = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}\n{self.diagnostics()}")
        return p

    def sbatch(self, *args: str, wrap: str, output: Path | str | None = None, name: str = "job") -> str:
        """Submit ``wrap`` with extra sbatch ``args``; returns the job id (a string, arrays have "_" tasks)."""
        out = str(output) if output is not None else str(self.out_dir / f"{name}-%j.out")
        p = self.run("sbatch", "--parsable", f"--job-name={JOB_PREFIX}{name}", f"--output={out}",
                     f"--chdir={self.out_dir}", *args, "--wrap", wrap)
        job_id = p.stdout.strip().split(";")[0]
        self.submitted.append(job_id)
        return job_id

    def cancel(self, *job_ids: str) -> None:
        if job_ids:
            self.run("scancel", *job_ids, check=False)

    def cancel_submitted(self) -> None:
        self.cancel(*self.submitted)
        self.submitted.clear()

    # ------------------------------------------------------------------ queries
    def squeue_states(self, job_id: str) -> dict[str, str]:
        """{job or array task id: state} of the jobs still known to slurmctld (``-r``: one line per task)."""
        p = self.run("squeue", "-h", "-r", "-j", job_id, "-o", "%i|%T", check=False)
        rows = [line.split("|") for line in p.stdout.splitlines() if "|" in line]
        return {r[0]: r[1] for r in rows}

    def sacct(self, job_id: str) -> dict[str, tuple[str, str]]:
        """{JobID: (State, ExitCode)} from the accounting database, steps included."""
        p = self.run("sacct", "-j", job_id, "--format=JobID,State,ExitCode", "-n", "-P", check=False)
        rows = [line.split("|") for line in p.stdout.splitlines() if line.count("|") == 2]
        return {r[0]: (r[1], r[2]) for r in rows}

    def show_job(self, job_id: str) -> dict[str, str]:
        p = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields: dict[str, str] = {}
        for tok in p.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_for(self, what: str, predicate: tp.Callable[[], tp.Any], timeout: float = 30.0, interval: float = 0.3):
        """Poll ``predicate`` until it returns something truthy (returned); fail with diagnostics on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timeout after {timeout:.0f}s waiting for {what}\n{self.diagnostics()}")
            time.sleep(interval)

    def wait_state(self, job_id: str, state: str, timeout: float = 30.0) -> tuple[str, str]:
        """Wait until sacct reports ``state`` (prefix match: "CANCELLED by 0") for the job; returns (State, ExitCode)."""
        def check():
            row = self.sacct(job_id).get(job_id)
            return row if row and row[0].startswith(state) else None
        return self.wait_for(f"job {job_id} in state {state} (sacct)", check, timeout)

    def wait_running(self, job_id: str, timeout: float = 30.0) -> None:
        self.wait_for(f"job {job_id} RUNNING", lambda: self.squeue_states(job_id).get(job_id) == "RUNNING", timeout)

    def diagnostics(self) -> str:
        parts = []
        for cmd in (["sinfo", "-N", "-l"], ["squeue", "-l"]):
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                                   env={**os.environ, "SLURM_CONF": str(self.conf)})
                parts.append(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
            except (OSError, subprocess.TimeoutExpired) as e:
                parts.append(f"$ {' '.join(cmd)}: {e}")
        for name in ("slurmctld.log", "slurmd.log", "slurmdbd.log"):
            path = self.state_dir / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"--- {path} (tail)\n" + "\n".join(tail))
        return "\n".join(parts)


def _run_script(name: str, timeout: float) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", str(SLURM_DIR / name)], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"slurm/{name} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> tp.Iterator[SlurmCluster]:
    """Install (fast no-op when installed) and start the local cluster; leave it running afterwards."""
    # `make test` (what CI runs) starts the cluster itself and sets SCALING_UNET_REQUIRE_SLURM=1: there a SLURM test
    # that cannot run fails the suite; a skip would hide it (issue 29, item 7). Elsewhere (a laptop) it skips.
    unavailable = pytest.fail if os.environ.get("SCALING_UNET_REQUIRE_SLURM") == "1" else pytest.skip
    if os.geteuid() != 0:
        unavailable("the local SLURM cluster needs root (apt-get install, munge/mysql users); run slurm/start.sh with sudo")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        unavailable("SLURM is not installed and apt-get is not available")
    _run_script("install.sh", INSTALL_TIMEOUT_S)
    t0 = time.monotonic()
    p = _run_script("start.sh", START_TIMEOUT_S)
    started_in = time.monotonic() - t0
    conf = next((line.split("=", 1)[1] for line in p.stdout.splitlines() if line.startswith("export SLURM_CONF=")), None)
    assert conf, f"start.sh printed no SLURM_CONF:\n{p.stdout}\n{p.stderr}"
    conf_path = Path(conf)

    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf_path)
    out_dir = tmp_path_factory.mktemp("slurm-jobs")
    out_dir.chmod(0o777)
    node = next((line.split("=", 1)[1].split()[0] for line in conf_path.read_text().splitlines()
                 if line.startswith("NodeName=")), "")
    cluster = SlurmCluster(state_dir=conf_path.parent, conf=conf_path, out_dir=out_dir, start_output=p.stdout + p.stderr,
                           started_in_s=started_in, node=node)
    # Jobs of an interrupted earlier test session would hold GPUs: cancel them (test jobs only).
    leftovers = cluster.run("squeue", "-h", "-o", "%A|%j", check=False).stdout.split()
    cluster.cancel(*[row.split("|")[0] for row in leftovers if row.split("|")[-1].startswith(JOB_PREFIX)])
    try:
        yield cluster
    finally:
        cluster.cancel_submitted()
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf


def checkpoint_at(work: Path, iteration: int) -> tp.Callable[[], tp.Optional[Path]]:
    """For ``wait_for``: the ``state.json`` of a fold-0 run under ``work`` once it is at ``iteration`` or later."""
    def check() -> tp.Optional[Path]:
        for f in (Path(work) / "checkpoints").glob("*/fold0/state.json"):
            try:
                if json.loads(f.read_text())["iteration"] >= iteration:
                    return f
            except ValueError:  # being replaced
                pass
        return None
    return check
