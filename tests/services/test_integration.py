"""The service end to end: real `ecif serve` and `ecif worker` processes on the real Postgres
and Redis, a digits audit submitted over HTTP, and a worker killed in the middle of a shard."""
from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
import redis
from sqlalchemy import select

from ecif_core.datasets.digits import class_prompts, label_of_caption
from services.db.models import Shard
from services.db.session import session_scope
from services.embedded import run_audit
from tests.services.conftest import (REDIS_URL, SLOW_SHARD_OPTIONS, assert_same_ranking, manifest_json, read_csv_rows,
                                     write_manifest)
from tests.services.processes import Service, service_env

pytestmark = pytest.mark.slow


def _redis_db(offset: int) -> str:
    """The test Redis database plus `offset` (ECIF_TEST_REDIS=.../5 gives 6, 7, 8: concurrent
    runs on one server pick bases that do not overlap)."""
    base, number = REDIS_URL.rsplit("/", 1)
    url = f"{base}/{int(number) + offset}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def service(pg_url, data_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    svc = Service(service_env(pg_url, _redis_db(1), tmp_path_factory.mktemp("store"), data_root), logs)
    try:
        svc.start_server()
        svc.start_worker("w1")
        key = svc.run("keys", "create", "--owner", "itest")
        assert key.returncode == 0, key.stderr
        svc.env["ECIF_API_KEY"], svc.env["ECIF_SERVER_URL"] = key.stdout.strip(), svc.url
        yield svc
    finally:
        svc.stop()


def test_audit_over_http_matches_the_embedded_mode(service, data_root, embedded_csv, tmp_path):
    submitted = service.run("submit", str(data_root / "manifest.json"), "--wait", "--poll", "0.3")
    assert submitted.returncode == 0, submitted.stderr + (service.logs / "w1.log").read_text()[-3000:]
    audit_id = submitted.stdout.split()[0]
    assert "gradients" in submitted.stderr  # the progress bar named the stage
    downloaded = service.run("results", audit_id, "-o", str(tmp_path / "ranked.csv"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert_same_ranking(read_csv_rows(tmp_path / "ranked.csv"), read_csv_rows(embedded_csv))
    status = service.run("status", audit_id)
    assert '"status": "succeeded"' in status.stdout and '"shards_done": 6' in status.stdout
    # the calibration summary: the same as the embedded mode's summary.json
    assert json.loads(status.stdout)["summary"] == json.loads((embedded_csv.parent / "summary.json").read_text())
    # a trace on the gpu queue: the worker computes the test-loss gradient
    row = json.loads((data_root / "digits" / "test.jsonl").read_text().splitlines()[0])
    prompts = [arg for text in class_prompts() for arg in ("--prompt", text)]
    traced = service.run("trace", audit_id, "--image", str(data_root / "digits" / row["image"]), *prompts,
                         "--label", str(label_of_caption(row["caption"])), "--k", "5",
                         "-o", str(tmp_path / "trace.csv"))
    assert traced.returncode == 0, traced.stderr + (service.logs / "w1.log").read_text()[-3000:]
    assert "top 5 training pairs by relative-IS" in traced.stdout
    assert len(read_csv_rows(tmp_path / "trace.csv")) == 5
    assert httpx.get(f"{service.url}/metrics").status_code == 401
    metrics = httpx.get(f"{service.url}/metrics", headers={"Authorization": f"Bearer {service.env['ECIF_API_KEY']}"}).text
    assert 'ecif_audits{status="succeeded"}' in metrics and 'ecif_shard_seconds_count{stage="gradients"}' in metrics
    # a removal preview, then a model edit on the gpu queue, downloaded as a checkpoint that loads
    previewed = service.run("preview", audit_id, "--remove", "top:0.1:influence")
    assert previewed.returncode == 0 and json.loads(previewed.stdout)["predicted_validation_change"] < 0
    edited = service.run("edit", audit_id, "--remove", "top:0.1:influence", "--max-iterations", "3",
                         "--out", str(tmp_path / "edited"))
    assert edited.returncode == 0, edited.stderr + (service.logs / "w1.log").read_text()[-3000:]
    import torch
    from open_clip.model import CLIP

    config = json.loads((data_root / "cfg.json").read_text())
    CLIP(**config).load_state_dict(torch.load(tmp_path / "edited" / "model.pt", weights_only=True), strict=True)
    record = json.loads((tmp_path / "edited" / "edit.json").read_text())
    assert record["remove"]["pairs"] == 10 and json.loads(edited.stdout)["status"] == "succeeded"


@pytest.mark.parametrize("victim", ["whole worker", "pool process"])
def test_a_worker_killed_mid_shard_loses_nothing(pg_url, data_root, tmp_path_factory, victim):
    """SIGKILL during a gradients shard, and the audit still ends with the CSV of an
    uninterrupted run, byte for byte; finished shards are kept, not redone.

    "whole worker": the machine is gone (pool parent and child) and its task sits unacked in
    Redis for the 6 h visibility timeout; a new worker's reconciler finds the shard neither
    beating nor queued and sends it again, with the default settings (only the heartbeat
    interval is shorter): the audit must resume within 5 minutes of the new worker starting.
    "pool process": only the process running the shard dies; its parent re-queues the task at
    once (task_reject_on_worker_lost).
    """
    # one-batch shards, slow enough that the kill lands while one is running (SLOW_SHARD_OPTIONS)
    options = {**SLOW_SHARD_OPTIONS, "shard_batches": 1}
    manifest = write_manifest(data_root / "kill-manifest.json", options)
    expected_text = run_audit(manifest, tmp_path_factory.mktemp("uninterrupted") / "audit").read_text()
    env = service_env(pg_url, _redis_db(2), tmp_path_factory.mktemp("store"), data_root, ECIF_HEARTBEAT_INTERVAL="2")
    svc = Service(env, tmp_path_factory.mktemp("kill-logs"))
    try:
        svc.start_server()
        first = svc.start_worker("doomed")
        key = svc.run("keys", "create", "--owner", "ktest").stdout.strip()
        headers = {"Authorization": f"Bearer {key}"}
        response = httpx.post(f"{svc.url}/audits", json=manifest_json(options), headers=headers, timeout=30)
        assert response.status_code == 202, response.text
        audit_id = response.json()["id"]
        running = _wait_for_running_gradient_shard(pg_url, audit_id)
        child = int(running.worker.split(":")[-1])
        if victim == "whole worker":
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        else:
            os.kill(child, signal.SIGKILL)
        assert _shard(pg_url, audit_id, running.shard).status == "running"  # killed before it finished
        done_before = {s.shard for s in _shards(pg_url, audit_id) if s.status == "done"}
        available = time.monotonic()
        if victim == "whole worker":
            svc.start_worker("rescuer")
        resumed = _wait_for_shard(pg_url, audit_id, running.shard, lambda s: s.attempts == 2, timeout=330)
        recovery = time.monotonic() - available
        print(f"\n{victim} SIGKILL: shard {running.shard} running again {recovery:.0f} s after a worker was available")
        assert recovery < 300, recovery
        status = _wait_finished(svc.url, audit_id, headers)
        assert status["status"] == "succeeded", status
        csv_text = httpx.get(f"{svc.url}/audits/{audit_id}/results.csv", headers=headers, timeout=30).text
        assert csv_text.replace("\r\n", "\n") == expected_text.replace("\r\n", "\n")  # byte for byte
        assert resumed.worker != running.worker
        shards = {s.shard: s for s in _shards(pg_url, audit_id)}
        assert shards[running.shard].attempts == 2 and shards[running.shard].worker != running.worker
        assert all(shards[s].attempts == 1 for s in done_before)  # finished shards were kept, not redone
    finally:
        svc.stop()


def test_tasks_lost_with_the_broker_are_resumed_from_the_database(pg_url, data_root, tmp_path_factory):
    """The queue is wiped mid-audit (a Redis restart without persistence): shards are left
    pending with nothing queued; the worker's own reconciler sends them again, with the default
    settings (only the heartbeat interval is shorter), and the audit ends with the CSV of an
    uninterrupted run, byte for byte, within 5 minutes."""
    options = {"projection": {"k_in": 4, "k_out": 4}, "shard_batches": 1}
    manifest = write_manifest(data_root / "kill-manifest.json", options)
    expected_text = run_audit(manifest, tmp_path_factory.mktemp("reference") / "audit").read_text()
    broker = _redis_db(3)
    svc = Service(service_env(pg_url, broker, tmp_path_factory.mktemp("store"), data_root,
                              ECIF_HEARTBEAT_INTERVAL="2"), tmp_path_factory.mktemp("lost-logs"))
    try:
        svc.start_server()
        svc.start_worker("w")
        key = svc.run("keys", "create", "--owner", "rtest").stdout.strip()
        headers = {"Authorization": f"Bearer {key}"}
        audit_id = httpx.post(f"{svc.url}/audits", json=manifest_json(options), headers=headers,
                              timeout=30).json()["id"]
        _wait_for_running_gradient_shard(pg_url, audit_id)
        redis.Redis.from_url(broker).flushdb()  # every queued task is gone
        wiped = time.monotonic()
        time.sleep(8)  # the shard that was running finishes; nothing else arrives
        pending = [s.shard for s in _shards(pg_url, audit_id) if s.status != "done"]
        assert pending, "the audit should be stalled with gradient shards left"
        _wait_for_shard(pg_url, audit_id, pending[0], lambda s: s.attempts >= 1, timeout=330)
        recovery = time.monotonic() - wiped
        print(f"\nRedis wiped: shard {pending[0]} running {recovery:.0f} s later")
        assert recovery < 300, recovery
        status = _wait_finished(svc.url, audit_id, headers)
        assert status["status"] == "succeeded", status
        csv_text = httpx.get(f"{svc.url}/audits/{audit_id}/results.csv", headers=headers, timeout=30).text
        assert csv_text.replace("\r\n", "\n") == expected_text.replace("\r\n", "\n")  # byte for byte
        shards = _shards(pg_url, audit_id)
        assert all(s.attempts == 1 for s in shards), [(s.shard, s.attempts) for s in shards]  # each sent again once
    finally:
        svc.stop()


def _shards(url: str, audit_id: str) -> list[Shard]:
    with session_scope(url) as session:
        return list(session.scalars(select(Shard).where(Shard.audit_id == audit_id, Shard.stage == "gradients")))


def _shard(url: str, audit_id: str, shard: int) -> Shard:
    return next(s for s in _shards(url, audit_id) if s.shard == shard)


def _wait_for_shard(url: str, audit_id: str, shard: int, condition, timeout: float) -> Shard:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _shard(url, audit_id, shard)
        if condition(found):
            return found
        time.sleep(0.5)
    raise AssertionError(f"shard {shard} of {audit_id} never got there: {found.status}, {found.attempts} attempts")


def _wait_for_running_gradient_shard(url: str, audit_id: str, timeout: float = 120) -> Shard:
    """A shard that is running after at least one other finished (so both kinds are tested)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shards = _shards(url, audit_id)
        running = [s for s in shards if s.status == "running"]
        if running and any(s.status == "done" for s in shards):
            return running[0]
        time.sleep(0.02)
    raise AssertionError("no gradients shard was seen running")


def _wait_finished(url: str, audit_id: str, headers: dict, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/audits/{audit_id}", headers=headers, timeout=30).json()
        if status["status"] in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"audit did not finish: {status}")
