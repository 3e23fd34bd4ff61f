"""Service vs embedded wall time on the demo audit, and 2 worker processes vs 1.

    python -m bench.service [--workdir bench/out/service] [--scaling-shard-batches 4]

Builds the demo data (digits, 1200 pairs, 20% shuffled captions) and trains the demo's tiny
CLIP (30 epochs) once in WORKDIR, then, in one run:
1. the embedded mode (`ecif audit`: SQLite, in-process) on the demo manifest;
2. the service (a real `ecif serve` + one `ecif worker`, Postgres, Redis) on the same
   manifest, timed from POST /audits to status succeeded (processes started beforehand);
3. the same audit with shard_batches=4 (10 shards) on `ecif worker --concurrency 1` (one
   pool process, 2 torch threads), on `--concurrency 2` (two processes, 1 thread each), and
   on one process with 1 thread (ECIF_TORCH_THREADS=1).
Needs the local Postgres (database created and dropped here) and Redis (db 14, flushed).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import psycopg
import redis

from ecif_core.datasets.digits import build_digits
from ecif_core.demo import DemoSettings, tiny_model_config
from ecif_core.train import TrainConfig, train
from services.db.session import upgrade
from services.embedded import run_audit
from tests.services.processes import Service, service_env

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/14"


def prepare_workdir(workdir: Path) -> Path:
    """Demo data and model (built once; reused by later runs)."""
    settings = DemoSettings()
    if not (workdir / "model.pt").exists():
        data = build_digits(workdir / "data", corruption=settings.corruption, fraction=settings.fraction,
                            seed=settings.seed, n_train=settings.n_train)
        (workdir / "tiny-clip.json").write_text(json.dumps(tiny_model_config(), indent=1))
        train(data.train, workdir / "tiny-clip.json", workdir / "model.pt",
              TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                          weight_decay=settings.weight_decay, seed=settings.seed))
    return workdir


def manifest(workdir: Path, name: str, options: dict) -> Path:
    path = workdir / name
    path.write_text(json.dumps({"model": {"config": "tiny-clip.json", "checkpoint": "model.pt"},
                                "train": "data/train.jsonl", "validation": "data/val.jsonl", "options": options}))
    return path


def timed_service_audit(svc: Service, manifest_path: Path, key: str) -> tuple[float, int]:
    """Seconds from the audit's creation to its end (the server's own timestamps, so the
    poll interval does not round the figure; polling once a second keeps the API's CPU use
    out of the measurement) and the audit's shard count."""
    headers = {"Authorization": f"Bearer {key}"}
    body = json.loads(manifest_path.read_text())
    audit_id = httpx.post(f"{svc.url}/audits", json=body, headers=headers, timeout=30).json()["id"]
    while True:
        status = httpx.get(f"{svc.url}/audits/{audit_id}", headers=headers, timeout=30).json()
        if status["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1.0)
    if status["status"] != "succeeded":
        raise RuntimeError(status)
    elapsed = datetime.fromisoformat(status["finished_at"]) - datetime.fromisoformat(status["created_at"])
    return elapsed.total_seconds(), status["shards_total"]


def run_service(workdir: Path, db_url: str, manifests: list[Path], concurrency: int,
                **env: str) -> list[tuple[float, int]]:
    redis.Redis.from_url(REDIS_URL).flushdb()
    store = workdir / f"store-{uuid.uuid4().hex[:6]}"
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    svc = Service(service_env(db_url, REDIS_URL, store, workdir, **env), logs)
    try:
        svc.start_server()
        svc.start_worker(f"bench{concurrency}", concurrency=concurrency)
        key = svc.run("keys", "create", "--owner", "bench").stdout.strip()
        return [timed_service_audit(svc, m, key) for m in manifests]
    finally:
        svc.stop()
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="bench/out/service")
    parser.add_argument("--scaling-shard-batches", type=int, default=4)
    args = parser.parse_args()
    workdir = prepare_workdir(Path(args.workdir).resolve())
    demo = manifest(workdir, "demo-manifest.json", {})
    scaling = manifest(workdir, "scaling-manifest.json", {"shard_batches": args.scaling_shard_batches})
    name = f"ecif_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade(db_url)
        shutil.rmtree(workdir / "embedded", ignore_errors=True)
        started = time.perf_counter()
        run_audit(demo, workdir / "embedded")
        embedded = time.perf_counter() - started
        (service_demo, _), (one_worker, shards) = run_service(workdir, db_url, [demo, scaling], concurrency=1)
        ((two_workers, _),) = run_service(workdir, db_url, [scaling], concurrency=2)
        # the same work with one torch thread per process: what process-level scaling gives
        ((one_worker_1t, _),) = run_service(workdir, db_url, [scaling], concurrency=1, ECIF_TORCH_THREADS="1")
    finally:
        from services.db.session import get_engine

        get_engine(db_url).dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    result = {"embedded_s": embedded, "service_s": service_demo, "service_over_embedded": service_demo / embedded,
              "scaling_shards": shards, "one_worker_s": one_worker, "two_workers_s": two_workers,
              "speedup_2_over_1": one_worker / two_workers, "one_worker_one_thread_s": one_worker_1t,
              "speedup_2_over_1_single_thread": one_worker_1t / two_workers}
    print(json.dumps(result, indent=1))
    (workdir / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
