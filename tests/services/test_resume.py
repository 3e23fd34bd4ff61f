"""A failed audit resumes where it stopped (POST /audits/{id}/retry, `ecif retry`, a rerun of
`ecif audit`): a full disk fails it with an error naming the shard; once space is freed the retry
keeps the finished shards and ends with the same bytes as an uninterrupted run."""
from __future__ import annotations

import errno
import os
import time
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from ecif_core.stages import gradients as core_audit
from ecif_core.data.manifest import load_manifest
from ecif_core.data.store import AuditStore
from services import repository
from services.api.app import InProcessStarter, create_app
from services.db.models import Audit, Shard
from services.db.session import session_scope
from services.reconcile import reconcile
from services.settings import Settings
from tests.services.conftest import manifest_json
from tests.services.test_pipeline import RecordingDispatcher

FULL = "gradients shard 3: OSError: [Errno 28] No space left on device"


class FullDisk:
    """The store's disk fills after `room` gradient shards were written: the next shard's write
    raises ENOSPC as the disk would; `free()` makes room again. Also counts every shard whose
    gradients were computed (a shard skipped by its completion marker is not)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, room: int) -> None:
        self.room: int | None = room
        self.computed: Counter[int] = Counter()
        write_gradients, accumulate = AuditStore.write_gradients, core_audit._accumulate_shard

        def full_write_gradients(store: AuditStore, start: int, values: dict) -> None:
            if self.room is not None:
                if self.room == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.room -= 1
            write_gradients(store, start, values)

        def counted_accumulate(*args, **kwargs):
            self.computed[args[5]] += 1  # (manifest, loaded, params, projector, start, shard, ...)
            return accumulate(*args, **kwargs)

        monkeypatch.setattr(AuditStore, "write_gradients", full_write_gradients)
        monkeypatch.setattr(core_audit, "_accumulate_shard", counted_accumulate)

    def free(self) -> None:
        self.room = None


def _wait(api, headers: dict, audit_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = api.get(f"/audits/{audit_id}", headers=headers).json()
        if status["status"] in ("succeeded", "failed", "cancelled"):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def _shards_done(url: str, audit_id: str, stage: str = "gradients") -> list[int]:
    with session_scope(url) as session:
        return sorted(session.scalars(select(Shard.shard).where(Shard.audit_id == audit_id, Shard.stage == stage,
                                                                Shard.status == "done")))


class RefusingStarter:
    """A broker that refuses every task."""

    def __init__(self, url: str) -> None:
        self.url = url

    def resume(self, audit_id: str):
        from kombu.exceptions import OperationalError

        from services.resume import resume_audit

        def refuse(stage: str, audit_id: str, shard: int | None = None) -> None:
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

        return resume_audit(self.url, audit_id, refuse)


def test_a_full_disk_fails_the_audit_and_retry_resumes_it_keeping_finished_shards(
        pg_url, data_root, embedded_csv, tmp_path, monkeypatch, capsys):
    from services import cli
    from services.client import Client

    disk = FullDisk(monkeypatch, room=3)
    settings = Settings(database_url=pg_url, store_url=str(tmp_path / "store"), data_roots=[data_root])
    with session_scope(pg_url) as session:
        alice, bob = repository.create_key(session, "alice-retry"), repository.create_key(session, "bob-retry")
    headers = {"Authorization": f"Bearer {alice}"}
    with TestClient(create_app(settings, starter=InProcessStarter(settings))) as api:
        audit_id = api.post("/audits", json=manifest_json(), headers=headers).json()["id"]
        failed = _wait(api, headers, audit_id)
        assert (failed["status"], failed["stage"], failed["error"]) == ("failed", "gradients", FULL)
        assert _shards_done(pg_url, audit_id) == [0, 1, 2]
        # the reconciler leaves a failed audit alone, however long it has been idle
        sent = RecordingDispatcher()
        reconcile(pg_url, sent.send, stale_after=0)
        assert [s for s in sent.sent if s[1] == audit_id] == []
        # another owner's audit and an unknown id are 404; a broker that refuses is 503 and changes nothing
        assert api.post(f"/audits/{audit_id}/retry", headers={"Authorization": f"Bearer {bob}"}).status_code == 404
        assert api.post("/audits/00000000-0000-0000-0000-000000000000/retry", headers=headers).status_code == 404
        api.app.state.dispatcher, starter = RefusingStarter(pg_url), api.app.state.dispatcher
        refused = api.post(f"/audits/{audit_id}/retry", headers=headers)
        assert refused.status_code == 503 and "not resumed" in refused.json()["detail"]
        unchanged = api.get(f"/audits/{audit_id}", headers=headers).json()
        assert (unchanged["status"], unchanged["error"]) == ("failed", FULL)
        api.app.state.dispatcher = starter

        disk.free()
        # `ecif retry ID`: the CLI's client through this app's route
        client = Client("http://testserver", alice)
        client.http = api
        monkeypatch.setattr(cli, "_client", lambda args: client)
        api.headers.update(headers)
        assert cli.main(["retry", audit_id]) == 0
        line = capsys.readouterr().out.strip()
        assert line == f"{audit_id} running at stage gradients (3/6 shards done)"
        resumed = _wait(api, headers, audit_id)
        assert (resumed["status"], resumed["error"]) == ("succeeded", None) and resumed["finished_at"]
        assert api.get(f"/audits/{audit_id}/results.csv", headers=headers).content == embedded_csv.read_bytes()
        # shards 0-2 were computed once; shard 3 again (its write had failed), 4 and 5 once
        assert disk.computed == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1}

        # nothing to resume: a succeeded audit, a queued one
        assert cli.main(["retry", audit_id]) == 2
        assert "server answered 409" in capsys.readouterr().err
        with session_scope(pg_url) as session:
            queued = repository.create_audit(session, "alice-retry", load_manifest(data_root / "manifest.json"),
                                             tmp_path / "store").id
        conflict = api.post(f"/audits/{queued}/retry", headers=headers)
        assert conflict.status_code == 409 and "is queued" in conflict.json()["detail"]
        responses = api.get("/openapi.json").json()["paths"]["/audits/{audit_id}/retry"]["post"]["responses"]
        assert {"202", "401", "404", "409", "503"} <= set(responses)


def test_rerunning_ecif_audit_on_a_failed_folder_resumes_the_same_audit(data_root, embedded_csv, tmp_path,
                                                                          monkeypatch):
    from services.embedded import AuditFailed, database_url_for, run_audit

    disk = FullDisk(monkeypatch, room=3)
    out = tmp_path / "audit"
    with pytest.raises(AuditFailed) as failure:
        run_audit(data_root / "manifest.json", out)  # `ecif audit` prints it as one `ecif: error:` line
    assert str(failure.value) == (f"{FULL} (run the same command again to resume where it stopped: "
                                  "finished shards are kept)")
    url = database_url_for(out)
    with session_scope(url) as session:
        (first,) = session.scalars(select(Audit)).all()
        assert (first.status, first.error) == ("failed", FULL)
    disk.free()
    assert run_audit(data_root / "manifest.json", out).read_bytes() == embedded_csv.read_bytes()
    with session_scope(url) as session:
        (audit,) = session.scalars(select(Audit)).all()
        assert (audit.id, audit.status, audit.error) == (first.id, "succeeded", None)  # resumed, not re-created
    assert _shards_done(url, first.id) == list(range(6))
    assert disk.computed == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1}


def test_a_cancel_that_came_as_the_last_shard_finished_resumes_by_moving_the_stage_on(pg_url, data_root, tmp_path):
    """Every gradients shard done, the stage never moved (the cancel won): resuming sends one
    finished shard, whose run is a skip that moves the audit on; nothing is computed again."""
    from services.pipeline import LocalDispatcher, Pipeline
    from services.resume import Resumed, resume_audit
    from tests.services.test_pipeline import _new_audit

    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(pg_url, dispatcher)
    pipeline.run("prepare", audit_id)
    finish = pipeline._shard_finished

    def finish_then_cancel(audit_id: str, stage: str, shard: int, seconds: float) -> None:
        finish(audit_id, stage, shard, seconds)
        if (stage, shard) == ("gradients", 5):
            with session_scope(pg_url) as session:
                repository.cancel_audit(session, session.get(Audit, audit_id))

    pipeline._shard_finished = finish_then_cancel
    dispatcher.drain(pipeline)
    with session_scope(pg_url) as session:
        audit = session.get(Audit, audit_id)
        assert (audit.status, audit.stage) == ("cancelled", "gradients")
    assert _shards_done(pg_url, audit_id) == list(range(6))
    sent = RecordingDispatcher()
    assert resume_audit(pg_url, audit_id, sent.send) == Resumed("running", "gradients", 1)
    assert sent.sent == [("gradients", audit_id, 0)]
    dispatcher.queue.extend(sent.sent)
    dispatcher.drain(pipeline)
    with session_scope(pg_url) as session:
        audit = session.get(Audit, audit_id)
        assert (audit.status, audit.stage, audit.finished_at is not None) == ("succeeded", "done", True)
        attempts = session.scalars(select(Shard.attempts).where(Shard.audit_id == audit_id,
                                                                Shard.stage == "gradients")).all()
    assert attempts == [1] * 6


def test_a_resumed_audit_is_not_sent_again_by_the_reconciler(pg_url, data_root, tmp_path):
    """An audit that failed an hour ago: the resume records its dispatch times, so a reconciler
    running right after it finds nothing lost (it would otherwise send every shard twice)."""
    from datetime import timedelta

    from sqlalchemy import update

    from services.db.models import utcnow
    from services.pipeline import Pipeline
    from services.resume import Resumed, resume_audit
    from tests.services.test_pipeline import _new_audit

    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    pipeline = Pipeline(pg_url, RecordingDispatcher())
    pipeline.run("prepare", audit_id)
    for shard in (0, 1):
        pipeline.run("gradients", audit_id, shard)
    hour_ago = utcnow() - timedelta(hours=1)
    with session_scope(pg_url) as session:
        repository.fail_audit(session, session.get(Audit, audit_id), "gradients shard 2: OSError: disk full")
        session.execute(update(Audit).where(Audit.id == audit_id).values(
            created_at=hour_ago, started_at=hour_ago, dispatched_at=hour_ago, heartbeat_at=hour_ago))
        session.execute(update(Shard).where(Shard.audit_id == audit_id).values(
            started_at=hour_ago, heartbeat_at=hour_ago, dispatched_at=hour_ago, finished_at=hour_ago))
    sent = RecordingDispatcher()
    assert resume_audit(pg_url, audit_id, sent.send) == Resumed("running", "gradients", 4)
    assert sent.sent == [("gradients", audit_id, s) for s in (2, 3, 4, 5)]
    again = RecordingDispatcher()
    reconcile(pg_url, again.send, stale_after=60)
    assert [s for s in again.sent if s[1] == audit_id] == []
    with session_scope(pg_url) as session:
        audit = session.get(Audit, audit_id)
        assert (audit.status, audit.error, audit.finished_at) == ("running", None, None)


def test_rerunning_ecif_audit_after_its_process_was_stopped_resumes_the_same_audit(data_root, embedded_csv,
                                                                                   tmp_path, monkeypatch):
    """Ctrl-C (or a kill) leaves the folder's audit `running`: the rerun resumes it like a failure."""
    from services.embedded import database_url_for, run_audit

    computed: Counter[int] = Counter()
    accumulate = core_audit._accumulate_shard

    def interrupted_at_shard_3(*args, **kwargs):
        computed[args[5]] += 1
        if args[5] == 3 and computed[3] == 1:
            raise KeyboardInterrupt
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(core_audit, "_accumulate_shard", interrupted_at_shard_3)
    out = tmp_path / "audit"
    with pytest.raises(KeyboardInterrupt):
        run_audit(data_root / "manifest.json", out)
    url = database_url_for(out)
    with session_scope(url) as session:
        (first,) = session.scalars(select(Audit)).all()
        assert (first.status, first.stage) == ("running", "gradients")
    assert run_audit(data_root / "manifest.json", out).read_bytes() == embedded_csv.read_bytes()
    with session_scope(url) as session:
        (audit,) = session.scalars(select(Audit)).all()
        assert (audit.id, audit.status, audit.error) == (first.id, "succeeded", None)
    assert computed == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1}


# ------------------------------------------------------------------ a real full disk

PAGE = 4096


def _used(path) -> int:
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (a real filesystem that fills up), or a skip where mounting is not allowed."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(result.stderr or result.stdout).strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


@pytest.mark.slow
def test_a_real_full_disk_fails_the_audit_and_retry_after_freeing_space_resumes_it(
        pg_url, data_root, embedded_csv, small_disk, monkeypatch):
    """The store on a tmpfs filled by a file: the disk really runs out during the gradients
    stage; the filler is deleted, the retry resumes and the CSV is the uninterrupted one."""
    import shutil

    from services.pipeline import LocalDispatcher, Pipeline

    store = small_disk / "store"
    settings = Settings(database_url=pg_url, store_url=str(store), data_roots=[data_root])
    # Calibration: what the audit occupies on this disk after prepare and after each gradients shard.
    with session_scope(pg_url) as session:
        calibration = repository.create_audit(session, "carol-disk", load_manifest(data_root / "manifest.json"),
                                              store).id
    empty, used_after = _used(small_disk), {}
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(pg_url, dispatcher, image_roots=settings.resolved_roots())
    pipeline.start(calibration)
    started = time.perf_counter()
    dispatcher.drain(pipeline, lambda stage, _, shard: used_after.setdefault((stage, shard), _used(small_disk) - empty))
    uninterrupted = time.perf_counter() - started
    shutil.rmtree(store / calibration)
    # room for prepare, three gradients shards and half of the fourth
    third, fourth = used_after[("gradients", 2)], used_after[("gradients", 3)]
    assert fourth > third, used_after
    room = third + (fourth - third) // 2 // PAGE * PAGE
    stat = os.statvfs(small_disk)
    with (small_disk / "filler").open("wb") as handle:
        handle.write(b"\0" * (stat.f_bavail * stat.f_frsize - room))

    computed: Counter[int] = Counter()
    accumulate = core_audit._accumulate_shard

    def counted_accumulate(*args, **kwargs):
        computed[args[5]] += 1
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(core_audit, "_accumulate_shard", counted_accumulate)
    with session_scope(pg_url) as session:
        key = repository.create_key(session, "carol-disk")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, starter=InProcessStarter(settings))) as api:
        audit_id = api.post("/audits", json=manifest_json(), headers=headers).json()["id"]
        failed = _wait(api, headers, audit_id)
        assert failed["status"] == "failed" and failed["stage"] == "gradients", failed
        assert failed["error"].startswith("gradients shard ")
        assert "[Errno 28] No space left on device" in failed["error"]
        finished = _shards_done(pg_url, audit_id)
        assert finished and finished == list(range(len(finished))), finished
        (small_disk / "filler").unlink()  # space freed
        retried = time.perf_counter()
        response = api.post(f"/audits/{audit_id}/retry", headers=headers)
        assert response.status_code == 202 and response.json()["status"] == "running", response.text
        resumed = _wait(api, headers, audit_id)
        recovery = time.perf_counter() - retried
        assert resumed["status"] == "succeeded", resumed
        assert api.get(f"/audits/{audit_id}/results.csv", headers=headers).content == embedded_csv.read_bytes()
    assert all(computed[s] == 1 for s in finished), (finished, computed)
    print(f"\n{failed['error']!r}: {finished} kept; recovery (retry call to "
          f"succeeded) {recovery:.2f} s; an uninterrupted run {uninterrupted:.2f} s")
