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
