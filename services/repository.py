"""Data access for audits, results and API keys: every query the API and the CLI make."""
from __future__ import annotations

import csv
import hashlib
import io
import secrets
import uuid
from pathlib import Path
from typing import Iterator

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from ecif_core.data.folder import AuditFolder
from ecif_core.data.storage import absolute, location, remove_tree
from ecif_core.stages.table import FIRST, position
from ecif_core.ranked import RANKED_COLUMNS, VALUE_COLUMNS, csv_row
from ecif_core.data.manifest import Manifest

from .db.models import FINISHED, SHARDED, ApiKey, Audit, Edit, PairRow, Score, Shard, Trace, TracePair, as_utc, utcnow
from .db.session import session_scope

KEY_PREFIX = "ecif_"
PAGE_ROWS = 2000
REJECTED_COLUMNS = ("row", "id", "reason")


# ------------------------------------------------------------------ keys

def hash_key(key: str) -> str:
    """Keys are 256-bit random tokens, so one SHA-256 is enough (no dictionary to guess from)."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, owner: str) -> str:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(owner=owner, key_hash=hash_key(key), prefix=key[:12]))
    return key


def list_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    return list(session.scalars(query if owner is None else query.where(ApiKey.owner == owner)))


def revoke_key(session: Session, key_or_id: str) -> ApiKey | None:
    """Mark a key revoked, found by its id or by the key itself; None when there is none."""
    key = session.get(ApiKey, int(key_or_id)) if key_or_id.isdigit() else None
    if key is None:
        key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key_or_id)))
    if key is not None:
        key.revoked = True
    return key


def owner_of_key(session: Session, key: str) -> str | None:
    return session.scalar(select(ApiKey.owner).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked.is_(False)))


# ------------------------------------------------------------------ audits

def create_audit(session: Session, owner: str, manifest: Manifest, store_root: str | Path,
                 audit_dir: str | Path | None = None) -> Audit:
    audit_id = str(uuid.uuid4())
    folder = location(audit_dir, "out") if audit_dir is not None else location(store_root, "store_url") / audit_id
    audit = Audit(id=audit_id, owner=owner, status="queued", stage=FIRST,
                  manifest=manifest.to_json(), audit_dir=absolute(folder))
    session.add(audit)
    return audit


def get_audit(session: Session, owner: str, audit_id: str) -> Audit | None:
    """The audit if it belongs to `owner`; another owner's audit is indistinguishable from none."""
    return session.scalar(select(Audit).where(Audit.id == audit_id, Audit.owner == owner))


def list_audits(session: Session, owner: str, limit: int, offset: int) -> tuple[list[Audit], int]:
    query = select(Audit).where(Audit.owner == owner)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(query.order_by(Audit.created_at.desc(), Audit.id).limit(limit).offset(offset)).all()
    return list(rows), total


def progress(session: Session, audit: Audit, stall_after: float | None = None) -> dict:
    """Shards done in the current sharded stage (or the last one passed), and an ETA: the shards
    left in each sharded stage of the table times that stage's mean shard time so far (none until
    the first sharded stage has a finished shard). One aggregate query: status is polled often.
    With `stall_after`, why the audit is stalled (no task beating or sent for that long), which replaces the ETA."""
    rows = session.execute(select(Shard.stage, func.count(), func.avg(Shard.seconds))
                           .where(Shard.audit_id == audit.id, Shard.status == "done").group_by(Shard.stage)).all()
    done = dict.fromkeys(SHARDED, 0) | {stage: count for stage, count, _ in rows}
    mean = {stage: seconds for stage, _, seconds in rows}
    total = audit.shards_total or 0
    shown = _shown_sharded_stage(audit.stage)
    shards_done = done[shown] if shown is not None else 0
    eta = None
    if audit.status == "running" and SHARDED and mean.get(SHARDED[0]) is not None:
        eta = sum((total - done[stage]) * (mean.get(stage) or 0.0) for stage in SHARDED)
    reason = None
    if stall_after is not None and audit.status in ("queued", "running"):
        idle = _idle_seconds(session, audit)
        if idle > stall_after:
            reason = (f"no task of this audit has run, finished or been sent for {idle:.0f} s (stage {audit.stage}): "
                      "no worker is taking its tasks, or they were lost; workers send lost tasks again by themselves")
    return {"shards_done": shards_done, "shards_total": total, "eta_seconds": None if reason else eta,
            "stall_reason": reason}


def _shown_sharded_stage(stage: str) -> str | None:
    """The sharded stage whose shards the status counts: the current one, else the last one passed
    (stage table order); None before the first."""
    passed = [s for s in SHARDED if position(s) <= position(stage)]
    return passed[-1] if passed else None


def _idle_seconds(session: Session, audit: Audit) -> float:
    """Seconds since anything happened to the audit: a task sent, beating, started or finished."""
    latest = session.execute(select(func.max(Shard.heartbeat_at), func.max(Shard.dispatched_at),
                                    func.max(Shard.started_at), func.max(Shard.finished_at))
                             .where(Shard.audit_id == audit.id)).one()
    moments = [m for m in (audit.created_at, audit.started_at, audit.dispatched_at, audit.heartbeat_at, *latest)
               if m is not None]
    newest = max(as_utc(m) for m in moments)
    return (utcnow() - newest).total_seconds()


def cancel_audit(session: Session, audit: Audit) -> None:
    """Stops new shards: every task checks the status before it starts."""
    if audit.status not in FINISHED:
        session.execute(update(Audit).where(Audit.id == audit.id, Audit.status.not_in(FINISHED))
                        .values(status="cancelled", finished_at=utcnow()))


def fail_audit(session: Session, audit: Audit, message: str) -> None:
    session.execute(update(Audit).where(Audit.id == audit.id, Audit.status.not_in(FINISHED))
                    .values(status="failed", error=message[:4000], finished_at=utcnow()))


def delete_audit(session: Session, audit: Audit, store_root: str | Path | None) -> None:
    """Removes the rows and commits, then the audit's folder if it is one of the store's own
    (`<store>/<audit id>`): never a folder the store does not own, never the store itself."""
    audit_dir = location(audit.audit_dir)
    traces = select(Trace.id).where(Trace.audit_id == audit.id)
    session.execute(delete(TracePair).where(TracePair.trace_id.in_(traces)))
    for table in (Edit, Trace, Score, PairRow, Shard):
        session.execute(delete(table).where(table.audit_id == audit.id))
    session.execute(delete(Audit).where(Audit.id == audit.id))
    session.commit()
    if store_root is not None and audit_dir.name == audit.id and absolute(audit_dir.parent) == absolute(store_root):
        remove_tree(audit_dir)


# ------------------------------------------------------------------ CSV streams

def results_csv(database_url: str, audit_id: str, limit: int | None = None,
                suspected_only: bool = False) -> Iterator[str]:
    """ranked.csv from the database, page by page in rank order (keyset on rank)."""
    yield _csv_line(RANKED_COLUMNS)
    last, sent = 0, 0
    while limit is None or sent < limit:
        page = PAGE_ROWS if limit is None else min(PAGE_ROWS, limit - sent)
        query = (select(Score.rank, Score.pair_id, PairRow.image, PairRow.caption, Score.suspected,
                        *(getattr(Score, name) for name in VALUE_COLUMNS))
                 .join(PairRow, (PairRow.audit_id == Score.audit_id) & (PairRow.slot == Score.slot))
                 .where(Score.audit_id == audit_id, Score.rank > last))
        if suspected_only:
            query = query.where(Score.suspected.is_(True))
        with session_scope(database_url) as session:
            rows = session.execute(query.order_by(Score.rank).limit(page)).all()
        if not rows:
            return
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for row in rows:
            writer.writerow(csv_row(row[0], row[1], row[2], row[3], dict(zip(VALUE_COLUMNS, row[5:])), bool(row[4])))
        yield buffer.getvalue()
        last, sent = rows[-1][0], sent + len(rows)


def rejected_csv(database_url: str, audit_id: str) -> Iterator[str]:
    yield _csv_line(REJECTED_COLUMNS)
    last = 0
    while True:
        with session_scope(database_url) as session:
            rows = session.execute(select(PairRow.id, PairRow.row, PairRow.pair_id, PairRow.reason)
                                   .where(PairRow.audit_id == audit_id, PairRow.reason.is_not(None), PairRow.id > last)
                                   .order_by(PairRow.id).limit(PAGE_ROWS)).all()
        if not rows:
            return
        buffer = io.StringIO()
        csv.writer(buffer).writerows([(r.row, r.pair_id, r.reason) for r in rows])
        yield buffer.getvalue()
        last = rows[-1][0]


def _csv_line(values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()


# ------------------------------------------------------------------ traces

def create_trace(session: Session, audit: Audit, tests: list[dict], k: int) -> Trace:
    trace = Trace(id=str(uuid.uuid4()), audit_id=audit.id, owner=audit.owner, status="queued",
                  request={"tests": tests, "k": k}, dispatched_at=utcnow())  # its task is sent after the commit
    session.add(trace)
    return trace


def get_trace(session: Session, audit: Audit, trace_id: str) -> Trace | None:
    return session.scalar(select(Trace).where(Trace.id == trace_id, Trace.audit_id == audit.id))


def trace_results(session: Session, trace: Trace) -> list[dict]:
    """Per test example: the request, its test loss, the model's prediction (None for a trace
    made before it was stored) and its top pairs (rank order: harmful first) with image,
    caption, sign(influence) x relative-IS and the audit's `suspected` flag."""
    from ecif_core.trace.query import signed_relative_is

    rows = session.execute(select(TracePair, PairRow.image, PairRow.caption, Score.suspected)
                           .join(PairRow, (PairRow.audit_id == trace.audit_id) & (PairRow.slot == TracePair.slot))
                           .outerjoin(Score, (Score.audit_id == trace.audit_id) & (Score.slot == TracePair.slot))
                           .where(TracePair.trace_id == trace.id).order_by(TracePair.test, TracePair.rank)).all()
    losses, predictions = trace.test_losses or [], trace.predictions or []
    out = [{"example": example, "test_loss": losses[i] if i < len(losses) else None,
            "prediction": predictions[i] if i < len(predictions) else None, "top": []}
           for i, example in enumerate(trace.request["tests"])]
    for pair, image, caption, suspected in rows:
        out[pair.test]["top"].append({"rank": pair.rank, "id": pair.pair_id, "image": image, "caption": caption,
                                      "relative_is": pair.relative_is, "influence": pair.influence,
                                      "influence_pos": pair.influence_pos, "influence_neg": pair.influence_neg,
                                      "signed_relative_is": signed_relative_is(pair.relative_is, pair.influence),
                                      "suspected": bool(suspected)})
    return out


def trace_csv(results: list[dict]) -> Iterator[str]:
    from ecif_core.trace.query import TRACE_COLUMNS, trace_row

    yield _csv_line(TRACE_COLUMNS)
    for test, result in enumerate(results):
        buffer = io.StringIO()
        csv.writer(buffer).writerows([trace_row(test, p["rank"], p) for p in result["top"]])
        yield buffer.getvalue()


# ------------------------------------------------------------------ edits

def create_edit(session: Session, audit: Audit, request: dict) -> Edit:
    """An edit's folder lives in its audit's folder (`edits/<id>`): deleted with the audit, never
    mixed with the audit's own files."""
    edit_id = str(uuid.uuid4())
    edit = Edit(id=edit_id, audit_id=audit.id, owner=audit.owner, status="queued", request=request,
                edit_dir=str(AuditFolder(audit.audit_dir).edit(edit_id)), dispatched_at=utcnow())  # sent after the commit
    session.add(edit)
    return edit


def get_edit(session: Session, audit: Audit, edit_id: str) -> Edit | None:
    return session.scalar(select(Edit).where(Edit.id == edit_id, Edit.audit_id == audit.id))
