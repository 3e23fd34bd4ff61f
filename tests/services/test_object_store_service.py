"""Workers that share nothing but the database, the broker and a bucket: real `ecif serve` and
`ecif worker` processes, each in a working folder (and temporary folder) of its own, with the
audit store and every input on a real S3 server (moto)."""
from __future__ import annotations

import os
import signal

import httpx
import pytest

from ecif_core.data.storage import location
from tests.services.conftest import SLOW_SHARD_OPTIONS
from tests.services.processes import Service, service_env
from tests.services.test_integration import (_redis_db, _shards, _wait_finished, _wait_for_running_gradient_shard,
                                             _wait_for_shard)

pytestmark = pytest.mark.slow


def test_two_workers_without_a_shared_folder_finish_one_audit_and_survive_a_kill(
        pg_url, s3, s3_data_root, s3_inputs_csv_slow_shards, tmp_path_factory):
    """Two workers on "machines" of their own finish one audit together: one serves the cpu
    queue (prepare, curvature, scores, finalize), the other the gpu queue (gradients,
    validation), so each reads what the other wrote, through the bucket only. The pool process
    running a gradients shard is SIGKILLed half way, and the audit still ends with the CSV of
    an uninterrupted run on the same bucket inputs, byte for byte."""
    expected = s3_inputs_csv_slow_shards  # the embedded mode on the same bucket inputs, uninterrupted
    store = f"s3://{s3.new_bucket('store')}/audits"
    env = service_env(pg_url, _redis_db(4), store, s3_data_root, ECIF_HEARTBEAT_INTERVAL="2", **s3.env())
    svc = Service(env, tmp_path_factory.mktemp("s3-logs"))
    machines = {name: tmp_path_factory.mktemp(f"machine-{name}") for name in ("api", "cpu", "gpu")}

    def own(name: str) -> dict:
        folder = machines[name]
        (folder / "tmp").mkdir(exist_ok=True)
        return {"cwd": folder, "TMPDIR": str(folder / "tmp"), "ECIF_CACHE_DIR": str(folder / "cache")}

    try:
        svc.start_server(**own("api"))
        svc.start_worker("cpu", queues="cpu", **own("cpu"))
        svc.start_worker("gpu", queues="gpu", **own("gpu"))
        key = svc.run("keys", "create", "--owner", "s3test").stdout.strip()
        headers = {"Authorization": f"Bearer {key}"}
        relative = {"model": {"config": "cfg.json", "checkpoint": "model.pt"}, "train": "digits/train.jsonl",
                    "validation": "digits/val.jsonl", "options": SLOW_SHARD_OPTIONS}  # against the s3:// data root
        response = httpx.post(f"{svc.url}/audits", json=relative, headers=headers, timeout=60)
        assert response.status_code == 202, response.text
        audit_id = response.json()["id"]
        running = _wait_for_running_gradient_shard(pg_url, audit_id, timeout=180)
        os.kill(int(running.worker.split(":")[-1]), signal.SIGKILL)  # the pool process running the shard
        done_before = {s.shard for s in _shards(pg_url, audit_id) if s.status == "done"}
        _wait_for_shard(pg_url, audit_id, running.shard, lambda s: s.attempts == 2, timeout=120)
        status = _wait_finished(svc.url, audit_id, headers)
        logs = "".join((svc.logs / f"{n}.log").read_text()[-2000:] for n in ("cpu", "gpu"))
        assert status["status"] == "succeeded", (status, logs)
        csv_bytes = httpx.get(f"{svc.url}/audits/{audit_id}/results.csv", headers=headers, timeout=60).content
        assert csv_bytes.replace(b"\r\n", b"\n") == expected.replace(b"\r\n", b"\n")
        shards = {s.shard: s for s in _shards(pg_url, audit_id)}
        assert shards[running.shard].attempts == 2
        assert all(shards[s].attempts == 1 for s in done_before)  # finished shards kept, not redone
        for name, task in (("cpu", "cpu.prepare"), ("cpu", "cpu.shard_scores"), ("gpu", "gpu.shard_gradients")):
            assert any(task in line and "succeeded in" in line  # each machine did its part
                       for line in (svc.logs / f"{name}.log").read_text().splitlines()), (name, task)
        report = httpx.get(f"{svc.url}/audits/{audit_id}/report", headers=headers, timeout=120)
        assert report.status_code == 200 and "data:image/png;base64," in report.text  # thumbnails from the bucket
        assert location(f"{store}/{audit_id}/thumbs").exists()
        for name, folder in machines.items():  # nothing of the audit on any machine's own disk
            left = [p for p in folder.rglob("*") if p.is_file() and "cache" not in p.parts]
            assert left == [], (name, left)
        deleted = httpx.delete(f"{svc.url}/audits/{audit_id}", headers=headers, timeout=60)
        assert deleted.status_code == 204 and not location(f"{store}/{audit_id}/plan.json").exists()
        assert location(store).fs.find(f"{location(store).path}/{audit_id}") == []  # the whole prefix is gone
    finally:
        svc.stop()
