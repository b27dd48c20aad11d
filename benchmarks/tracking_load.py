"""Load on one MLflow tracking server: N concurrent clients, each writing what one training run writes, on PostgreSQL
and on SQLite; lost writes, errors, latency per call, total time. Loopback only, bounded in count and time.

Each client (one "run"; each call retried as sweep.tracking retries, `--retries`): create_run; 150 params and 15 tags in log_batch calls; ``--checkpoints`` metric batches of
12 values (train_loss, val_loss, learning_rate, images_per_s, 4 IoUs, ...; log_batch, synchronous, as
sweep.tracking.RunRecorder logs a validation point); one 100 KB artifact (proxied upload); set_terminated FINISHED.
192 client processes would need ~60 GB here (MLflow's imports), so ``--processes`` processes run the clients as
threads (each client its own MlflowClient), all started together behind a barrier.

    python benchmarks/tracking_load.py                                   # 192 clients × 100 checkpoints, both
    python benchmarks/tracking_load.py --clients 24 --checkpoints 20 --backends sqlite
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METRICS = ("train_loss", "val_loss", "learning_rate", "images_per_s", "val_iou_bone", "val_iou_degradation_layer",
           "val_iou_residual_material", "val_mean_iou", "val_iou_background", "val_loss_bone", "val_loss_dl",
           "val_loss_rm")


def one_run(uri: str, exp_id: str, idx: int, checkpoints: int, artifact: Path, deadline: float,
            lat: dict, errors: collections.Counter, samples: dict, retries: int) -> str | None:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from sweep.tracking.client import TrackingError, _retry

    client = MlflowClient(uri)

    def call(kind: str, fn):
        if time.time() > deadline:
            raise TimeoutError("benchmark time limit")

        def counted():  # every failed attempt counted; a write is lost only when all tries fail
            try:
                return fn()
            except Exception as exc:
                key = f"{kind}: {type(exc).__name__}"
                errors[key] += 1
                samples.setdefault(key, str(exc)[:300])
                raise

        t0 = time.perf_counter()
        try:
            out = _retry(counted, kind, uri, 1 + retries, 0.5)  # the policy RunRecorder logs with
        except TrackingError:
            return None
        lat[kind].append(time.perf_counter() - t0)
        return out

    run = call("create_run", lambda: client.create_run(exp_id, run_name=f"load-{idx}"))
    if run is None:
        return None
    rid = run.info.run_id
    params = [Param(f"p.section{i // 20}.key{i}", str(i)) for i in range(150)]
    tags = [RunTag(f"tag{i}", f"value{i}") for i in range(15)]
    call("log_batch params+tags", lambda: client.log_batch(rid, params=params[:100], tags=tags, synchronous=True))
    call("log_batch params+tags", lambda: client.log_batch(rid, params=params[100:], synchronous=True))
    for step in range(1, checkpoints + 1):
        ts = int(time.time() * 1000)
        ms = [Metric(k, float(step) / (j + 1), ts, step) for j, k in enumerate(METRICS)]
        call("log_batch metrics", lambda ms=ms: client.log_batch(rid, metrics=ms, synchronous=True))
    call("log_artifact", lambda: client.log_artifact(rid, str(artifact)))
    call("set_terminated", lambda: client.set_terminated(rid, "FINISHED"))
    return rid


def process_main(args: tuple) -> dict:
    uri, exp_id, indices, checkpoints, artifact, deadline, barrier, retries = args
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # count what fails: a run's own retries are sweep.tracking's
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "120"
    lat: dict = collections.defaultdict(list)
    errors: collections.Counter = collections.Counter()
    samples: dict = {}
    rids: list = []
    barrier.wait()
    threads = [threading.Thread(target=lambda i=i: rids.append(one_run(uri, exp_id, i, checkpoints, Path(artifact),
                                                                       deadline, lat, errors, samples, retries)))
               for i in indices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"lat": dict(lat), "errors": dict(errors), "samples": samples, "rids": rids}


def verify(uri: str, rids: list, checkpoints: int) -> collections.Counter:
    """Read every run back: what did not arrive."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    lost: collections.Counter = collections.Counter()
    for rid in rids:
        run = client.get_run(rid)
        lost["params"] += 150 - len(run.data.params)
        lost["tags"] += 15 - len([k for k in run.data.tags if k.startswith("tag")])
        for k in METRICS:
            lost["metric values"] += checkpoints - len(client.get_metric_history(rid, k))
        lost["artifacts"] += 0 if [a for a in client.list_artifacts(rid) if a.path == "artifact.bin"] else 1
        lost["status"] += run.info.status != "FINISHED"
    return lost


POOLS = {  # the server's SQLAlchemy pool (tests.mlflow_server.start_mlflow_server's db_pool)
    "default": {},  # QueuePool, 5 + 10 overflow per server worker
    "null": {"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"},  # = tests.mlflow_server.NULL_POOL
    "large": {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "40", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "40"},
}


def bench(backend: str, clients: int, checkpoints: int, processes: int, workers: int, limit_s: float,
          work: Path, pool: str = "null", retries: int = 4) -> dict:
    from sweep.tracking import client as tracking
    from tests.mlflow_server import postgres_database, start_mlflow_server

    store = postgres_database() if backend == "postgresql" else f"sqlite:///{work / backend / 'mlflow.db'}"
    t0 = time.perf_counter()
    server = start_mlflow_server(work / backend, backend_store_uri=store, workers=workers, db_pool=POOLS[pool])
    start_s = time.perf_counter() - t0
    try:
        exp_id = tracking.ensure_experiment(server.uri, "load")
        artifact = work / "artifact.bin"
        artifact.write_bytes(os.urandom(100_000))
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Manager().Barrier(processes)
        chunks = [list(range(clients))[p::processes] for p in range(processes)]
        deadline = time.time() + limit_s + 60  # + start-up of the processes
        with ctx.Pool(processes) as procs:
            t0 = time.perf_counter()
            parts = procs.map(process_main, [(server.uri, exp_id, c, checkpoints, str(artifact), deadline, barrier,
                                              retries) for c in chunks])
            total_s = time.perf_counter() - t0
        lat = collections.defaultdict(list)
        errors: collections.Counter = collections.Counter()
        samples: dict = {}
        rids = []
        for p in parts:
            for k, v in p["samples"].items():
                samples.setdefault(k, v)
            for k, v in p["lat"].items():
                lat[k] += v
            errors.update(p["errors"])
            rids += [r for r in p["rids"] if r]
        lost = verify(server.uri, rids, checkpoints)
        lost["runs never created"] = clients - len(rids)
    finally:
        server.stop()
    q = {k: (statistics.median(v) * 1000, sorted(v)[int(0.99 * (len(v) - 1))] * 1000, len(v)) for k, v in lat.items()}
    return {"backend": backend, "pool": pool, "clients": clients, "checkpoints": checkpoints, "server_workers": workers,
            "server_start_s": round(start_s, 1), "total_s": round(total_s, 1), "retries": retries,
            "errors": dict(errors), "error_samples": samples,
            "lost": dict(lost), "latency_ms": {k: {"p50": round(a, 1), "p99": round(b, 1), "calls": n}
                                               for k, (a, b, n) in q.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=192)
    ap.add_argument("--checkpoints", type=int, default=100)
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4, help="mlflow server --workers")
    ap.add_argument("--backends", nargs="+", default=["postgresql", "sqlite"], choices=["postgresql", "sqlite"])
    ap.add_argument("--limit-s", type=float, default=600.0, help="per backend: calls after this are not made")
    ap.add_argument("--pool", default="null", choices=sorted(POOLS),
                    help="the server's database pool: default (5+10 per worker; deadlocks under load on PostgreSQL), "
                         "null (NullPool) or large (40+40 per worker)")
    ap.add_argument("--retries", type=int, default=4,
                    help="retries per call as sweep.tracking makes them (0.5 s doubling); lost = failed every try")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 1000 and 1 <= args.checkpoints <= 1000 and 1 <= args.processes <= 64):
        ap.error("--clients 1..1000, --checkpoints 1..1000, --processes 1..64")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.backends:
            r = bench(b, args.clients, args.checkpoints, args.processes, args.workers, args.limit_s, Path(tmp),
                      pool=args.pool, retries=args.retries)
            results.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n| backend | pool | clients × checkpoints | server workers | total s | lost writes | errors | "
          "p50 / p99 ms: create_run, metrics batch, artifact, terminate (retries included) |")
    print("|---|---|---|---|---:|---|---|---|")  # errors: failed attempts; lost writes: values absent at the end
    for r in results:
        L = r["latency_ms"]
        cell = ", ".join(f"{L[k]['p50']:.0f} / {L[k]['p99']:.0f}" if k in L else "-"
                         for k in ("create_run", "log_batch metrics", "log_artifact", "set_terminated"))
        print(f"| {r['backend']} | {r['pool']} | {r['clients']} × {r['checkpoints']} | {r['server_workers']} | {r['total_s']} | "
              f"{sum(r['lost'].values())} {r['lost'] if sum(r['lost'].values()) else ''} | "
              f"{sum(r['errors'].values())} {r['errors'] if r['errors'] else ''} | {cell} |")
    for r in results:
        for k, v in r["error_samples"].items():
            print(f"{r['backend']}: {k}: {v}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
