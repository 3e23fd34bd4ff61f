"""Fixtures of the service tests: a fresh Postgres database per session, a Redis database,
a trained micro CLIP on digits inside a data root, API clients."""
from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

from ecif_core.datasets.digits import build_digits
from tests.conftest import xdist_worker_index
from ecif_core.train import TrainConfig, train
from tests.core.helpers import MICRO_CONFIG

PG_ADMIN = os.environ.get("ECIF_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _redis_url(base: str) -> str:
    """The test Redis database for this process: ECIF_TEST_REDIS's for a plain run and pytest-xdist's
    first worker; the next worker's is 5 databases on (mod 16), since the service tests use the
    base database and the four after it."""
    server, number = base.rsplit("/", 1)
    return f"{server}/{(int(number) + 5 * xdist_worker_index()) % 16}"


REDIS_URL = _redis_url(os.environ.get("ECIF_TEST_REDIS", "redis://127.0.0.1:6379/11"))
OPTIONS = {"projection": {"k_in": 4, "k_out": 4}, "shard_batches": 2}


@pytest.fixture(scope="session")
def pg_url():
    """A database of its own (created here, dropped at the end) on the real Postgres server."""
    name = f"ecif_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    from services.db.session import upgrade

    upgrade(url)
    yield url
    from services.db.session import get_engine

    get_engine(url).dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def scratch_pg():
    """A running PostgreSQL cluster of this test's own (its own port and folder, empty): the test
    may stop() and start() it under a running service. Removed afterwards."""
    from services.db.session import get_engine
    from tests.services.scratch_postgres import ScratchPostgres

    cluster = ScratchPostgres()
    try:
        cluster.start()
        yield cluster
    finally:
        get_engine(cluster.url).dispose()
        cluster.remove()


@pytest.fixture(scope="session")
def redis_url():
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root holding digits (96 train pairs, 25% shuffled), a micro CLIP trained on them
    and a manifest with relative paths."""
    root = tmp_path_factory.mktemp("data_root").resolve()
    data = build_digits(root / "digits", fraction=0.25, seed=2, n_train=96, n_val=24, n_test=16)
    (root / "cfg.json").write_text(json.dumps(MICRO_CONFIG))
    train(data.train, root / "cfg.json", root / "model.pt",
          TrainConfig(epochs=2, batch_size=8, lr=1e-3, weight_decay=1e-2, seed=2))
    write_manifest(root / "manifest.json", OPTIONS)
    return root


def write_manifest(path: Path, options: dict, **overrides) -> Path:
    manifest = {"model": {"config": "cfg.json", "checkpoint": "model.pt"}, "train": "digits/train.jsonl",
                "validation": "digits/val.jsonl", "options": options, **overrides}
    path.write_text(json.dumps(manifest))
    return path


def manifest_json(options: dict | None = None, **overrides) -> dict:
    return {"model": {"config": "cfg.json", "checkpoint": "model.pt"}, "train": "digits/train.jsonl",
            "validation": "digits/val.jsonl", "options": OPTIONS if options is None else options, **overrides}


@pytest.fixture(scope="session")
def embedded_csv(data_root, tmp_path_factory) -> Path:
    """ranked.csv of the embedded mode (SQLite, in-process) for the data root's manifest."""
    from services.embedded import run_audit

    return run_audit(data_root / "manifest.json", tmp_path_factory.mktemp("embedded") / "audit")


def read_csv_rows(text_or_path) -> list[dict]:
    text = Path(text_or_path).read_text() if isinstance(text_or_path, Path) else text_or_path
    return list(csv.DictReader(text.splitlines()))


def assert_same_ranking(rows: list[dict], expected: list[dict]) -> None:
    """Same ids in the same order, every score equal to 1e-6, same flags."""
    assert [r["id"] for r in rows] == [r["id"] for r in expected]
    for got, want in zip(rows, expected):
        for column in ("influence", "influence_pos", "influence_neg", "self_influence", "clip_score"):
            a, b = got[column], want[column]
            assert (a == "") == (b == ""), column
            if a:
                assert abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b))), (column, got["id"], a, b)
        assert got["suspected"] == want["suspected"] and got["rank"] == want["rank"]


@pytest.fixture(scope="session")
def s3_data_root(s3, data_root) -> str:
    """The data root's files (digits pairs and images, config, checkpoint and its training
    sidecar) uploaded under an s3:// prefix."""
    from tests.s3 import upload_tree

    url = f"s3://{s3.new_bucket('data')}/root"
    upload_tree(data_root, url)
    return url


@pytest.fixture(scope="session")
def s3_inputs_csv(s3, s3_data_root) -> bytes:
    """ranked.csv (bytes) of the embedded mode with every input under the s3:// data root (absolute
    s3:// paths in a manifest stored in the bucket) and its folder in another bucket."""
    return _s3_ranked_csv(s3, s3_data_root, OPTIONS, "manifest-s3.json")


# theta blocks:2: a gradients shard long enough for a kill to land half way through its computation (with the
# default theta, the projections, a micro shard's gradients take a fraction of a second)
SLOW_SHARD_OPTIONS = {**OPTIONS, "theta": ["blocks:2"]}


@pytest.fixture(scope="session")
def s3_inputs_csv_slow_shards(s3, s3_data_root) -> bytes:
    """As s3_inputs_csv, with SLOW_SHARD_OPTIONS."""
    return _s3_ranked_csv(s3, s3_data_root, SLOW_SHARD_OPTIONS, "manifest-s3-slow.json")


def _s3_ranked_csv(s3, s3_data_root: str, options: dict, name: str) -> bytes:
    from ecif_core.data.storage import location
    from services.embedded import run_audit

    manifest = location(f"{s3_data_root}/{name}")
    manifest.write_text(json.dumps({"model": {"config": f"{s3_data_root}/cfg.json",
                                              "checkpoint": f"{s3_data_root}/model.pt"},
                                    "train": f"{s3_data_root}/digits/train.jsonl",
                                    "validation": f"{s3_data_root}/digits/val.jsonl", "options": options}))
    return run_audit(str(manifest), f"s3://{s3.new_bucket()}/audit").read_bytes()
