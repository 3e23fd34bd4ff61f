"""Stalled audits (their tasks lost with the broker) are found from the database and resumed."""
from __future__ import annotations

from services.db.models import Audit
from services.db.session import session_scope
from services.pipeline import Pipeline
from services.reconcile import reconcile, resume, stalled_audits
from tests.services.test_pipeline import RecordingDispatcher, _new_audit


def test_only_audits_without_recent_activity_are_stalled(pg_url, data_root, tmp_path):
    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    assert audit_id in stalled_audits(pg_url, stale_after=0)
    assert audit_id not in stalled_audits(pg_url, stale_after=3600)  # just created: not stalled
    sent = RecordingDispatcher()
    assert resume(pg_url, audit_id, sent.send) == 1 and sent.sent == [("prepare", audit_id, None)]


def test_resume_sends_the_unfinished_shards_of_the_current_stage(pg_url, data_root, tmp_path):
    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    pipeline = Pipeline(pg_url, RecordingDispatcher())
    pipeline.run("prepare", audit_id)
    for shard in (0, 3):
        pipeline.run("gradients", audit_id, shard)
    sent = RecordingDispatcher()
    resumed = reconcile(pg_url, sent.send, stale_after=0)
    assert resumed[audit_id] == 4
    assert [s for s in sent.sent if s[1] == audit_id] == [("gradients", audit_id, s) for s in (1, 2, 4, 5)]
    with session_scope(pg_url) as session:
        session.get(Audit, audit_id).status = "cancelled"
    assert audit_id not in reconcile(pg_url, RecordingDispatcher().send, stale_after=0)


# ------------------------------------------------------------------ liveness: heartbeats, queues, no double sends

from datetime import timedelta  # noqa: E402

from sqlalchemy import select, update  # noqa: E402

from services import repository  # noqa: E402
from services.db.models import Shard, utcnow  # noqa: E402
from services.liveness import Heartbeat, queued_tasks  # noqa: E402


def _prepared(pg_url, data_root, tmp_path) -> tuple[str, Pipeline]:
    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    pipeline = Pipeline(pg_url, RecordingDispatcher())
    pipeline.run("prepare", audit_id)
    return audit_id, pipeline


def _age(pg_url, audit_id, seconds: float) -> None:
    """Move every recorded moment of the audit `seconds` into the past."""
    with session_scope(pg_url) as session:
        for table in (Audit, Shard):
            key = table.id if table is Audit else table.audit_id
            for column in ("created_at", "started_at", "heartbeat_at", "dispatched_at", "finished_at"):
                if hasattr(table, column):
                    attr = getattr(table, column)
                    session.execute(update(table).where(key == audit_id, attr.is_not(None))
                                    .values({column: attr - timedelta(seconds=seconds)}))


def test_a_killed_shard_is_sent_again_once_and_a_queued_one_never(pg_url, data_root, tmp_path):
    audit_id, pipeline = _prepared(pg_url, data_root, tmp_path)
    pipeline.run("gradients", audit_id, 0)
    with session_scope(pg_url) as session:  # shard 1 "running" on a worker that was then killed
        session.execute(update(Shard).where(Shard.audit_id == audit_id, Shard.stage == "gradients", Shard.shard == 1)
                        .values(status="running", started_at=utcnow(), heartbeat_at=utcnow()))
    queued = {("gradients", audit_id, s) for s in (2, 3, 4, 5)}  # the others wait in the broker
    sent = RecordingDispatcher()
    assert audit_id not in reconcile(pg_url, sent.send, 60, queued)  # beating recently: alive
    _age(pg_url, audit_id, 61)
    assert reconcile(pg_url, sent.send, 60, queued)[audit_id] == 1
    assert [s for s in sent.sent if s[1] == audit_id] == [("gradients", audit_id, 1)]
    for _ in range(3):  # the reconciler runs again (every worker, every 30 s): nothing is sent twice
        assert audit_id not in reconcile(pg_url, sent.send, 60, queued | {("gradients", audit_id, 1)})
        assert audit_id not in reconcile(pg_url, sent.send, 60, queued)  # just sent: not lost yet
    assert len([s for s in sent.sent if s[1] == audit_id]) == 1
    # the broker forgets everything (a Redis restart): all five are sent again, once
    _age(pg_url, audit_id, 61)
    assert reconcile(pg_url, sent.send, 60, set())[audit_id] == 5
    assert audit_id not in reconcile(pg_url, sent.send, 60, set())


def test_a_stage_that_did_not_move_on_and_a_lost_unsharded_task_are_sent_again(pg_url, data_root, tmp_path):
    audit_id, pipeline = _prepared(pg_url, data_root, tmp_path)
    for shard in range(6):
        pipeline.run("gradients", audit_id, shard)
    with session_scope(pg_url) as session:  # the last task died between its commit and the advance
        session.execute(update(Audit).where(Audit.id == audit_id).values(stage="gradients"))
    _age(pg_url, audit_id, 61)
    sent = RecordingDispatcher()
    assert reconcile(pg_url, sent.send, 60, set())[audit_id] == 1
    stage, _, shard = sent.sent[0]
    pipeline.run(stage, audit_id, shard)  # a duplicate of a done shard: it moves the stage on
    with session_scope(pg_url) as session:
        assert session.get(Audit, audit_id).stage == "curvature"
    _age(pg_url, audit_id, 61)  # the curvature task is lost too
    sent = RecordingDispatcher()
    assert reconcile(pg_url, sent.send, 60, {("curvature", "another audit", None)})[audit_id] == 1
    assert sent.sent == [("curvature", audit_id, None)]
    assert audit_id not in reconcile(pg_url, sent.send, 60, {("curvature", audit_id, None)})


def test_a_running_task_beats_and_status_reports_a_stall_instead_of_an_eta(pg_url, data_root, tmp_path):
    audit_id, pipeline = _prepared(pg_url, data_root, tmp_path)
    _age(pg_url, audit_id, 120)
    import time

    with Heartbeat(pg_url, audit_id, "gradients", 0, interval=0.1):
        time.sleep(0.5)
    with session_scope(pg_url) as session:
        beat = session.scalar(select(Shard.heartbeat_at).where(Shard.audit_id == audit_id, Shard.shard == 0,
                                                               Shard.stage == "gradients"))
        assert (utcnow() - beat).total_seconds() < 5
        audit = session.get(Audit, audit_id)
        assert repository.progress(session, audit, 60)["stall_reason"] is None  # the beat counts as activity
    _age(pg_url, audit_id, 120)
    with session_scope(pg_url) as session:
        status = repository.progress(session, session.get(Audit, audit_id), 60)
    assert status["eta_seconds"] is None and "for 1" in status["stall_reason"]


def test_queued_tasks_are_read_from_the_redis_queues(redis_url):
    from celery import Celery

    import redis

    app = Celery("probe", broker=redis_url)
    app.conf.task_routes = {"ecif.tasks.gpu.*": {"queue": "gpu"}, "ecif.tasks.cpu.*": {"queue": "cpu"}}
    redis.Redis.from_url(redis_url).flushdb()
    app.send_task("ecif.tasks.gpu.shard_gradients", args=["audit-a", 3])
    app.send_task("ecif.tasks.cpu.curvature", args=["audit-b"])
    app.send_task("ecif.tasks.gpu.trace", args=["trace-c"])
    app.send_task("ecif.tasks.gpu.edit", args=["edit-d"])
    assert queued_tasks(redis_url) == {("gradients", "audit-a", 3), ("curvature", "audit-b", None),
                                       ("trace", "trace-c", None), ("edit", "edit-d", None)}
    assert queued_tasks("redis://127.0.0.1:1/0") is None  # unreachable: unknown, not empty
    redis.Redis.from_url(redis_url).flushdb()


# ------------------------------------------------------------------ traces and edits: beats, re-sends, give-ups

from services.db.models import Edit, Trace  # noqa: E402


def _request_rows(pg_url, data_root, tmp_path) -> tuple[str, str]:
    """An edit and a trace of a (queued) audit, as the API creates them: queued, dispatched now."""
    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    with session_scope(pg_url) as session:
        audit = session.get(Audit, audit_id)
        edit = repository.create_edit(session, audit, {"remove": "suspected"})
        trace = repository.create_trace(session, audit, [], 3)
        return edit.id, trace.id


def _age_request(pg_url, table, row_id: str, seconds: float) -> None:
    with session_scope(pg_url) as session:
        for column in ("created_at", "heartbeat_at", "dispatched_at"):
            attr = getattr(table, column)
            session.execute(update(table).where(table.id == row_id, attr.is_not(None))
                            .values({column: attr - timedelta(seconds=seconds)}))


def test_a_lost_edit_or_trace_is_sent_again_once_and_a_queued_or_beating_one_never(pg_url, data_root, tmp_path):
    from services.liveness import RequestHeartbeat

    edit_id, trace_id = _request_rows(pg_url, data_root, tmp_path)
    sent = RecordingDispatcher()
    assert edit_id not in reconcile(pg_url, sent.send, 60, set())  # just sent
    _age_request(pg_url, Edit, edit_id, 61)
    _age_request(pg_url, Trace, trace_id, 61)
    waiting = {("trace", trace_id, None)}  # the trace waits in the broker; the edit's message was lost
    assert reconcile(pg_url, sent.send, 60, waiting) == {edit_id: 1}
    assert [s for s in sent.sent if s[1] in (edit_id, trace_id)] == [("edit", edit_id, None)]
    for _ in range(3):  # every worker's reconciler, every 30 s: sent once
        assert edit_id not in reconcile(pg_url, sent.send, 60, waiting)
    # a worker starts the edit and is killed: it stops beating
    with session_scope(pg_url) as session:
        session.execute(update(Edit).where(Edit.id == edit_id).values(status="running", attempts=1,
                                                                      heartbeat_at=utcnow()))
    with RequestHeartbeat(pg_url, "edit", edit_id, interval=0.1):
        import time

        _age_request(pg_url, Edit, edit_id, 120)
        time.sleep(0.5)
    assert edit_id not in reconcile(pg_url, sent.send, 60, set())  # it beat a moment ago: alive
    _age_request(pg_url, Edit, edit_id, 61)
    assert reconcile(pg_url, sent.send, 60, waiting) == {edit_id: 1}
    assert [s for s in sent.sent if s[1] == edit_id] == [("edit", edit_id, None)] * 2
    with session_scope(pg_url) as session:
        assert session.get(Edit, edit_id).status == "running"  # sent again, not failed


def test_an_edit_whose_worker_keeps_dying_is_failed_with_the_reason(pg_url, data_root, tmp_path):
    from services.liveness import MAX_ATTEMPTS
    from services.pipeline import run_edit

    edit_id, trace_id = _request_rows(pg_url, data_root, tmp_path)
    with session_scope(pg_url) as session:  # started MAX_ATTEMPTS times, each worker killed (out of memory)
        for table, row_id in ((Edit, edit_id), (Trace, trace_id)):
            session.execute(update(table).where(table.id == row_id).values(status="running", attempts=MAX_ATTEMPTS,
                                                                          heartbeat_at=utcnow()))
    _age_request(pg_url, Edit, edit_id, 61)
    sent = RecordingDispatcher()
    assert edit_id not in reconcile(pg_url, sent.send, 60, set()) and sent.sent == []
    with session_scope(pg_url) as session:
        edit = session.get(Edit, edit_id)
        assert edit.status == "failed" and f"started {MAX_ATTEMPTS} times" in edit.error and edit.finished_at
        assert session.get(Trace, trace_id).status == "running"  # beating a moment ago: left alone
    # a redelivery by the broker (task_reject_on_worker_lost) meets the same limit in the worker
    with session_scope(pg_url) as session:
        session.execute(update(Edit).where(Edit.id == edit_id).values(status="running", error=None))
    run_edit(pg_url, edit_id)
    with session_scope(pg_url) as session:
        assert session.get(Edit, edit_id).status == "failed" and session.get(Edit, edit_id).attempts == MAX_ATTEMPTS


def test_a_duplicate_delivery_neither_runs_beside_a_beating_edit_nor_overwrites_a_success(pg_url, data_root,
                                                                                       tmp_path, monkeypatch):
    """The broker may deliver an edit twice (visibility timeout, a reconciler's send racing a slow
    start): the second must not write the same folder beside a live run, and a failing duplicate
    must not turn a finished edit into a failed one."""
    import ecif_core.edit.from_audit as edit_audit_module
    from services.pipeline import run_edit

    edit_id, _ = _request_rows(pg_url, data_root, tmp_path)
    with session_scope(pg_url) as session:  # a worker runs it and beat a second ago
        session.execute(update(Edit).where(Edit.id == edit_id).values(status="running", attempts=1,
                                                                      heartbeat_at=utcnow()))
    calls = []
    monkeypatch.setattr(edit_audit_module, "edit_audit", lambda *a, **k: calls.append(a) or {})
    run_edit(pg_url, edit_id, heartbeat_interval=15)
    with session_scope(pg_url) as session:
        edit = session.get(Edit, edit_id)
        assert (calls, edit.attempts, edit.status) == ([], 1, "running")  # left to the live run
        edit.status = "succeeded"

    def fails(*_args, **_kwargs):
        raise RuntimeError("a duplicate's late failure")

    with session_scope(pg_url) as session:  # a duplicate that had claimed it earlier fails late
        session.execute(update(Edit).where(Edit.id == edit_id).values(heartbeat_at=utcnow() - timedelta(hours=1)))
    from services.pipeline import _request_failures

    try:
        with _request_failures(pg_url, Edit, edit_id):
            fails()
    except RuntimeError as exc:  # re-raised for the worker's log, as any unexpected error
        assert "late failure" in str(exc)
    else:
        raise AssertionError("the failure was swallowed")
    with session_scope(pg_url) as session:
        assert (session.get(Edit, edit_id).status, session.get(Edit, edit_id).error) == ("succeeded", None)
