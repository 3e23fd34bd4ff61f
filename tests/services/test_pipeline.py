"""The database-tracked pipeline: same numbers as ecif_core, idempotent tasks, one advance per
stage, cancellation and failures recorded, on the real Postgres server."""
from __future__ import annotations

import csv
import functools
import io
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from sqlalchemy import delete, func, select

from ecif_core.ranked import RANKED_COLUMNS, csv_row
from ecif_core.stages import final_ranking
from ecif_core.data.manifest import load_manifest
from services import repository
from services.db.models import Audit, PairRow, Score, Shard
from services.db.session import session_scope
from services.pipeline import LocalDispatcher, Pipeline
from tests.services.conftest import assert_same_ranking, read_csv_rows, write_manifest


class RecordingDispatcher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int | None]] = []

    def send(self, stage: str, audit_id: str, shard: int | None = None) -> None:
        self.sent.append((stage, audit_id, shard))


def _new_audit(url: str, manifest_path, tmp_path) -> str:
    with session_scope(url) as session:
        return repository.create_audit(session, "alice", load_manifest(manifest_path), tmp_path / "store").id


def _run_to_the_end(url: str, audit_id: str) -> Pipeline:
    """Every task in this process, in dispatch order (the embedded mode's dispatcher)."""
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(url, dispatcher)
    pipeline.start(audit_id)
    dispatcher.drain(pipeline)
    return pipeline


def _csv(url: str, audit_id: str) -> list[dict]:
    return read_csv_rows("".join(repository.results_csv(url, audit_id)))


def _finalize_csv(audit_dir) -> bytes:
    """ranked.csv as ecif_core's finalize stage ranks the audit's store (csv_row per pair, rank order)."""
    ranking = final_ranking(audit_dir)
    expected = io.StringIO()
    writer = csv.writer(expected)
    writer.writerow(RANKED_COLUMNS)
    for rank, i in enumerate(ranking.order, start=1):
        pair = ranking.pairs[i]
        values = {name: column[i] for name, column in ranking.columns.items()}
        writer.writerow(csv_row(rank, pair.id, pair.image, pair.caption, values, bool(ranking.suspected[i])))
    return expected.getvalue().encode()


def test_embedded_ranked_csv_is_the_finalize_stages_ranking_byte_for_byte(embedded_csv):
    """ranked.csv is written from the database the pipeline recorded: it must be exactly the ranking
    ecif_core computes from the audit's store (no value, rank or flag lost or moved on the way)."""
    assert embedded_csv.read_bytes() == _finalize_csv(embedded_csv.parent)
    rejected = (embedded_csv.parent / "rejected.csv").read_text().splitlines()
    assert rejected[0] == "row,id,reason"


def test_postgres_pipeline_matches_the_embedded_csv(pg_url, data_root, embedded_csv, tmp_path):
    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    _run_to_the_end(pg_url, audit_id)
    with session_scope(pg_url) as session:
        audit = session.get(Audit, audit_id)
        assert (audit.status, audit.stage, audit.error) == ("succeeded", "done", None)
        assert audit.pairs_total == 96 and audit.shards_total == 6 and audit.curvature_shift > 0
        assert audit.started_at <= audit.finished_at
    with session_scope(pg_url) as session:
        audit_dir = session.get(Audit, audit_id).audit_dir
    assert "".join(repository.results_csv(pg_url, audit_id)).encode() == _finalize_csv(audit_dir)  # results.csv
    # the embedded run's numbers (another process state: torch's thread count may differ, so to 1e-6)
    assert_same_ranking(_csv(pg_url, audit_id), read_csv_rows(embedded_csv))
    limited = _csv(pg_url, audit_id)[:5]
    assert read_csv_rows("".join(repository.results_csv(pg_url, audit_id, limit=5))) == limited
    flagged = read_csv_rows("".join(repository.results_csv(pg_url, audit_id, suspected_only=True)))
    assert flagged == [r for r in _csv(pg_url, audit_id) if r["suspected"] == "true"]


def test_redelivered_tasks_change_nothing_and_advance_once(pg_url, data_root, tmp_path):
    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    dispatcher = RecordingDispatcher()
    pipeline = Pipeline(pg_url, dispatcher)
    pipeline.run("prepare", audit_id)
    gradient_tasks = [s for s in dispatcher.sent if s[0] == "gradients"]
    assert len(gradient_tasks) == 6
    for _, _, shard in gradient_tasks[:4]:
        pipeline.run("gradients", audit_id, shard)
    dispatcher.sent.clear()
    pipeline.run("prepare", audit_id)  # redelivered after shards finished: nothing is reset or redone
    with session_scope(pg_url) as session:
        assert session.scalar(select(func.count()).select_from(PairRow).where(PairRow.audit_id == audit_id)) == 96
        done = session.scalars(select(Shard.shard).where(Shard.audit_id == audit_id, Shard.stage == "gradients",
                                                         Shard.status == "done")).all()
    assert sorted(done) == [0, 1, 2, 3]
    # ...but it re-sends the unfinished shards, in case its first delivery died before dispatching
    assert dispatcher.sent == [("gradients", audit_id, 4), ("gradients", audit_id, 5)]
    dispatcher.sent.clear()
    for shard in (4, 5):
        pipeline.run("gradients", audit_id, shard)
    assert dispatcher.sent == [("curvature", audit_id, None)]
    pipeline.run("gradients", audit_id, 5)  # duplicate of the last shard while curvature is pending
    assert dispatcher.sent == [("curvature", audit_id, None)] * 2  # re-sent; the stage moved once
    pipeline.run("curvature", audit_id)
    dispatcher.sent.clear()
    pipeline.run("gradients", audit_id, 5)  # the audit is further on now: nothing to send
    pipeline.run("curvature", audit_id)  # a duplicate of a finished stage: the next one is re-sent
    assert dispatcher.sent == [("validation", audit_id, None)]
    pipeline.run("validation", audit_id)
    for shard in range(6):
        pipeline.run("scores", audit_id, shard)
    pipeline.run("scores", audit_id, 2)
    assert [s[0] for s in dispatcher.sent].count("finalize") == 2  # once by the last shard, once repaired
    pipeline.run("finalize", audit_id)
    pipeline.run("finalize", audit_id)
    with session_scope(pg_url) as session:
        attempts = session.execute(select(Shard.stage, Shard.shard, Shard.attempts)
                                   .where(Shard.audit_id == audit_id)).all()
        assert all(a == 1 for _, _, a in attempts)  # finished shards were not run again
        scores = session.scalar(select(func.count()).select_from(Score).where(Score.audit_id == audit_id))
        ranks = session.scalars(select(Score.rank).where(Score.audit_id == audit_id)).all()
        assert session.get(Audit, audit_id).status == "succeeded"
    assert scores == 96 and sorted(ranks) == list(range(1, 97))


def test_a_cancel_is_never_overwritten_by_the_first_task(pg_url, data_root, tmp_path):
    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    with session_scope(pg_url) as session:
        repository.cancel_audit(session, session.get(Audit, audit_id))
    dispatcher = RecordingDispatcher()
    Pipeline(pg_url, dispatcher).run("prepare", audit_id)
    with session_scope(pg_url) as session:
        assert session.get(Audit, audit_id).status == "cancelled"
    assert dispatcher.sent == []


def test_a_concurrent_duplicate_of_a_scores_shard_is_not_a_failure(pg_url, data_root, tmp_path):
    """Two deliveries of one shard writing at once: the loser finds the same rows and goes on."""
    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    pipeline = _run_to_the_end(pg_url, audit_id)
    with session_scope(pg_url) as session:
        audit_dir = session.get(Audit, audit_id).audit_dir
        session.execute(delete(Score).where(Score.audit_id == audit_id, Score.shard == 0))
    from sqlalchemy import event

    from services.db.session import get_engine

    engine = get_engine(pg_url)
    fired = []

    def race(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("DELETE FROM SCORES") and not fired:
            fired.append(1)  # the other delivery commits its copy between our DELETE and INSERT
            pipeline._write_shard_scores(audit_id, audit_dir, 0)

    event.listen(engine, "after_cursor_execute", race)
    try:
        pipeline._write_shard_scores(audit_id, audit_dir, 0)
    finally:
        event.remove(engine, "after_cursor_execute", race)
    assert fired
    with session_scope(pg_url) as session:
        assert session.scalar(select(func.count()).select_from(Score).where(Score.audit_id == audit_id)) == 96


def test_cancel_stops_new_shards(pg_url, data_root, tmp_path):
    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(pg_url, dispatcher)
    pipeline.run("prepare", audit_id)
    pipeline.run("gradients", audit_id, 0)
    with session_scope(pg_url) as session:
        repository.cancel_audit(session, session.get(Audit, audit_id))
    dispatcher.drain(pipeline)  # the five queued shards see the cancellation and do nothing
    with session_scope(pg_url) as session:
        done = session.scalar(select(func.count()).select_from(Shard).where(
            Shard.audit_id == audit_id, Shard.status == "done"))
        audit = session.get(Audit, audit_id)
        assert (audit.status, audit.stage, done) == ("cancelled", "gradients", 1)


def test_a_failing_stage_marks_the_audit_failed_with_the_reason(pg_url, data_root, tmp_path):
    """A training file other than the one the model saw: prepare refuses, the audit records why."""
    (tmp_path / "other.jsonl").write_text("\n".join(json.dumps({"id": f"x{i}", "image": "missing.png",
                                                                "caption": "a digit"}) for i in range(8)))
    manifest = write_manifest(tmp_path / "other-manifest.json", {},
                              model={"config": str(data_root / "cfg.json"), "checkpoint": str(data_root / "model.pt")},
                              train=str(tmp_path / "other.jsonl"), validation=None)
    audit_id = _new_audit(pg_url, manifest, tmp_path)
    _run_to_the_end(pg_url, audit_id)
    with session_scope(pg_url) as session:
        audit = session.get(Audit, audit_id)
        assert audit.status == "failed" and audit.finished_at is not None
        assert audit.error.startswith("prepare: train: its ids differ from the ones the model was trained on")


def test_progress_counts_the_current_stage_and_estimates_the_rest(pg_url, data_root, tmp_path):
    audit_id = _new_audit(pg_url, data_root / "manifest.json", tmp_path)
    pipeline = Pipeline(pg_url, RecordingDispatcher())
    pipeline.run("prepare", audit_id)
    for shard in (0, 1):
        pipeline.run("gradients", audit_id, shard)
    with session_scope(pg_url) as session:
        audit = session.get(Audit, audit_id)
        seconds = session.scalars(select(Shard.seconds).where(Shard.audit_id == audit_id,
                                                              Shard.status == "done")).all()
        status = repository.progress(session, audit)
    assert status["shards_done"] == 2 and status["shards_total"] == 6
    assert abs(status["eta_seconds"] - 4 * sum(seconds) / 2) < 1e-9  # 4 gradient shards left, no score timing yet


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0

    def get_request(self):
        request = super().get_request()
        self.connections += 1
        return request


def test_only_the_operators_host_port_opens_a_local_image_server(pg_url, data_root, tmp_path):
    """In the service a manifest naming 127.0.0.1:PORT is not enough: the worker's own
    ECIF_REMOTE_IMAGE_HOSTS must list that host:port (a bare host never opens a loopback address)."""
    httpd = _CountingServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(data_root / "digits")))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        key = f"127.0.0.1:{httpd.server_address[1]}"
        rows = [json.loads(line) for line in (data_root / "digits" / "train.jsonl").read_text().splitlines()]
        (tmp_path / "urls.jsonl").write_text("".join(json.dumps({**r, "image": f"http://{key}/{r['image']}"}) + "\n"
                                                     for r in rows))
        manifest = write_manifest(tmp_path / "url-manifest.json", {},
                                  model={"config": str(data_root / "cfg.json"), "checkpoint": str(data_root / "model.pt")},
                                  train=str(tmp_path / "urls.jsonl"), validation=None,
                                  remote_images={"allowed_hosts": [key], "timeout_s": 5})
        outcomes = {}
        for name, operator in (("none", []), ("bare host", ["127.0.0.1"]), ("host:port", [key])):
            audit_id = _new_audit(pg_url, manifest, tmp_path / name)
            Pipeline(pg_url, RecordingDispatcher(), remote_image_hosts=operator).run("prepare", audit_id)
            with session_scope(pg_url) as session:
                audit = session.get(Audit, audit_id)
                outcomes[name] = (audit.status, audit.error or "", httpd.connections)
        for name in ("none", "bare host"):  # refused before any connection: every row rejected
            status, error, connections = outcomes[name]
            assert status == "failed" and "no usable rows (96 rejected" in error and connections == 0, outcomes
        status, error, connections = outcomes["host:port"]
        assert status == "running" and not error and connections == len(rows), outcomes
    finally:
        httpd.shutdown()
        httpd.server_close()
