"""The tests' MLflow server runs on PostgreSQL (slurm/postgres.sh), as docs/cluster.md recommends for a cluster:
a run logged through the server is a row of PostgreSQL's own `runs` table."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sweep.tracking import client as tracking

REPO = Path(__file__).resolve().parents[1]


def test_the_session_server_stores_runs_in_postgresql(mlflow_server):
    import psycopg2

    exp = tracking.ensure_experiment(mlflow_server.uri, "on-postgres")
    rec = tracking.RunRecorder(mlflow_server.uri, exp, run_name="pg-run")
    rec.start()
    rec.log_metrics({"val_mean_iou": 0.5}, step=3)
    rec.finish()
    cmdline = " ".join(Path(f"/proc/{mlflow_server.process.pid}/cmdline").read_text().split("\0"))
    url = cmdline.split("--backend-store-uri ")[1].split()[0]
    assert url.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    with psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://")) as con, con.cursor() as cur:
        cur.execute("SELECT name, status FROM runs WHERE run_uuid = %s", (rec.run_id,))
        assert cur.fetchall() == [("pg-run", "FINISHED")]
        cur.execute("SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'val_mean_iou'", (rec.run_id,))
        assert cur.fetchall() == [(3, 0.5)]
        # NullPool (docs/cluster.md): the server keeps no connection once its requests are answered
        dbname = url.rsplit("/", 1)[1]
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
        assert cur.fetchone() == (0,)


def test_postgres_script_is_idempotent_and_listens_on_loopback_only():
    first = subprocess.run(["bash", str(REPO / "slurm" / "postgres.sh")], capture_output=True, text=True, timeout=120)
    again = subprocess.run(["bash", str(REPO / "slurm" / "postgres.sh")], capture_output=True, text=True, timeout=120)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == again.stdout and "starting" not in again.stderr
    import psycopg2

    with psycopg2.connect(first.stdout.strip().replace("postgresql+psycopg2://", "postgresql://") + "/postgres") as con:
        with con.cursor() as cur:
            cur.execute("SHOW listen_addresses")
            assert cur.fetchone() == ("127.0.0.1",)
