"""Find lost tasks and send them again: the broker is not the source of truth.

A task is lost when its worker was killed (it stops beating) or the broker forgot it (a Redis
restart without persistence): it is then neither beating nor waiting in a queue. After
`stale_after` seconds like that (ECIF_STALL_AFTER, at least 4 heartbeat intervals), every
worker's reconciler sends it again; the dispatch time is set with a compare-and-set, so two
reconcilers never both send it, and a task waiting in a queue is never sent twice. Every
task tolerates duplicates, so a task wrongly thought lost costs a skipped duplicate only.
A trace's or an edit's task is found and sent again the same way, up to MAX_ATTEMPTS starts:
one that keeps losing its worker (killed, out of memory) is then failed with that reason.

Failed and cancelled audits are left alone: their tasks are not lost, they were stopped. A
failed audit resumes only when a person asks (services.resume: `ecif retry`, POST .../retry).

Imports only the database layer (no torch): it runs in a prefork worker's parent process.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import or_, select, update

from ecif_core.stages.table import DONE

from .db.models import SHARDED, Audit, Shard, as_utc
from .db.session import session_scope
from .liveness import MAX_ATTEMPTS, REQUEST_TABLES, Task, gave_up, now as utc_now

Send = Callable[[str, str, "int | None"], None]


@dataclass
class Stall:
    audit_id: str
    stage: str
    shards: list[int | None]     # shards to send again (None: the stage's one task)
    idle_seconds: float
    reason: str


def find_stalls(database_url: str, stale_after: float, queued: set[Task] | None = None,
                now: datetime | None = None) -> list[Stall]:
    """Lost work of every queued or running audit (`queued`: tasks waiting in the broker;
    None: not known, nothing counts as waiting)."""
    now = now or utc_now()
    with session_scope(database_url) as session:
        audits = session.scalars(select(Audit).where(Audit.status.in_(("queued", "running")))).all()
        shards = session.scalars(select(Shard).where(Shard.audit_id.in_([a.id for a in audits]))).all()
        by_audit: dict[str, list[Shard]] = {}
        for shard in shards:
            by_audit.setdefault(shard.audit_id, []).append(shard)
        found = [audit_stall(a, by_audit.get(a.id, []), stale_after, queued, now) for a in audits]
    return [s for s in found if s is not None]


def audit_stall(audit: Audit, shards: list[Shard], stale_after: float, queued: set[Task] | None,
                now: datetime) -> Stall | None:
    """The audit's lost work, or None (also used by the status endpoint, without `queued`)."""
    stage = audit.stage
    if stage == DONE:
        return None
    waiting = queued or set()
    base = [audit.created_at, audit.started_at, audit.dispatched_at, audit.heartbeat_at]
    if stage in SHARDED:
        current = [s for s in shards if s.stage == stage]
        todo = [s for s in current if s.status != "done"]
        if not todo and current:  # every shard done, the stage never moved: its last task died between
            idle = _idle(now, base + [s.finished_at for s in current])
            if idle > stale_after and (stage, audit.id, current[0].shard) not in waiting:
                return Stall(audit.id, stage, [current[0].shard], idle,
                             f"every {stage} shard is done but the stage did not move on for {idle:.0f} s")
            return None
        lost, idle_max = [], 0.0
        for shard in todo:
            if (stage, audit.id, shard.shard) in waiting:
                continue
            idle = _idle(now, base[:2] + [shard.started_at, shard.heartbeat_at, shard.dispatched_at])
            if idle > stale_after:
                lost.append(shard.shard)
                idle_max = max(idle_max, idle)
        if lost:
            return Stall(audit.id, stage, sorted(lost), idle_max,
                         f"{len(lost)} {stage} shard(s) neither beating nor queued for "
                         f"{idle_max:.0f} s")
        return None
    if (stage, audit.id, None) in waiting:
        return None
    previous = [s.finished_at for s in shards]  # the stage began when the last shard finished
    idle = _idle(now, base + previous)
    if idle > stale_after:
        return Stall(audit.id, stage, [None], idle,
                     f"the {stage} task is neither beating nor queued for {idle:.0f} s")
    return None


@dataclass
class LostRequest:
    """A trace's or an edit's task that is neither beating nor queued."""

    kind: str                    # trace | edit (liveness.REQUEST_TASKS)
    row_id: str
    attempts: int                # times a worker started it
    idle_seconds: float


def find_lost_requests(database_url: str, stale_after: float, queued: set[Task] | None = None,
                       now: datetime | None = None) -> list[LostRequest]:
    """Queued or running traces and edits whose task is neither beating nor waiting in the broker
    (`queued` as in find_stalls) for `stale_after` seconds."""
    now, waiting, found = now or utc_now(), queued or set(), []
    with session_scope(database_url) as session:
        for kind, table in REQUEST_TABLES.items():
            rows = session.execute(select(table.id, table.attempts, table.created_at, table.dispatched_at,
                                          table.heartbeat_at).where(table.status.in_(("queued", "running")))).all()
            for row_id, attempts, *moments in rows:
                idle = _idle(now, moments)
                if idle > stale_after and (kind, row_id, None) not in waiting:
                    found.append(LostRequest(kind, row_id, attempts, idle))
    return found


def reconcile(database_url: str, send: Send, stale_after: float, queued: set[Task] | None = None,
              now: datetime | None = None) -> dict[str, int]:
    """Send every lost task again; {audit, trace or edit id: tasks sent}. A lost trace or edit
    that workers already started MAX_ATTEMPTS times is failed with the reason instead. Never a
    failed or cancelled audit's (those resume only on request: services.resume)."""
    now = now or utc_now()
    cutoff = now - timedelta(seconds=stale_after)
    sent: dict[str, int] = {}
    for stall in find_stalls(database_url, stale_after, queued, now):
        count = 0
        for shard in stall.shards:
            if _claim_dispatch(database_url, stall, shard, cutoff, now):
                send(stall.stage, stall.audit_id, shard)
                count += 1
        if count:
            sent[stall.audit_id] = count
    for lost in find_lost_requests(database_url, stale_after, queued, now):
        if lost.attempts >= MAX_ATTEMPTS:
            _give_up(database_url, lost, cutoff, now)
        elif _claim_request_dispatch(database_url, lost, cutoff, now):
            send(lost.kind, lost.row_id, None)
            sent[lost.row_id] = 1
    return sent


def _still_lost(table, row_id: str, cutoff: datetime) -> tuple:
    """The row is queued or running with no beat and no dispatch since `cutoff` (the compare of a compare-and-set)."""
    return (table.id == row_id, table.status.in_(("queued", "running")),
            or_(table.heartbeat_at.is_(None), table.heartbeat_at < cutoff),
            or_(table.dispatched_at.is_(None), table.dispatched_at < cutoff))


def _claim_request_dispatch(database_url: str, lost: LostRequest, cutoff: datetime, now: datetime) -> bool:
    table = REQUEST_TABLES[lost.kind]
    with session_scope(database_url) as session:
        return session.execute(update(table).where(*_still_lost(table, lost.row_id, cutoff))
                               .values(dispatched_at=now)).rowcount == 1


def _give_up(database_url: str, lost: LostRequest, cutoff: datetime, now: datetime) -> bool:
    table = REQUEST_TABLES[lost.kind]
    with session_scope(database_url) as session:
        return session.execute(update(table).where(*_still_lost(table, lost.row_id, cutoff)).values(
            status="failed", error=gave_up(lost.kind, lost.attempts), finished_at=now)).rowcount == 1


def _claim_dispatch(database_url: str, stall: Stall, shard: int | None, cutoff: datetime, now: datetime) -> bool:
    """Compare-and-set of the dispatch time: only one reconciler sends a lost task again."""
    with session_scope(database_url) as session:
        if stall.stage in SHARDED:
            where = (Shard.audit_id == stall.audit_id, Shard.stage == stall.stage, Shard.shard == shard)
            if shard is not None and session.scalar(select(Shard.status).where(*where)) == "done":
                # the advance repair: the audit's own dispatch time guards it
                return _claim_audit(session, stall, cutoff, now)
            return session.execute(update(Shard).where(*where, or_(Shard.dispatched_at.is_(None),
                                                                   Shard.dispatched_at < cutoff))
                                   .values(dispatched_at=now)).rowcount == 1
        return _claim_audit(session, stall, cutoff, now)


def _claim_audit(session, stall: Stall, cutoff: datetime, now: datetime) -> bool:
    return session.execute(update(Audit).where(Audit.id == stall.audit_id, Audit.stage == stall.stage,
                                               or_(Audit.dispatched_at.is_(None), Audit.dispatched_at < cutoff))
                           .values(dispatched_at=now)).rowcount == 1


def stalled_audits(database_url: str, stale_after: float) -> list[str]:
    """Ids of queued or running audits with lost work (nothing known to be queued)."""
    return [s.audit_id for s in find_stalls(database_url, stale_after)]


def resume(database_url: str, audit_id: str, send: Send) -> int:
    """Send the current stage's unfinished tasks of a queued or running audit again, whatever
    their state; returns how many. (A failed or cancelled audit: services.resume.resume_audit.)"""
    from .resume import stage_tasks

    with session_scope(database_url) as session:
        audit = session.get(Audit, audit_id)
        if audit is None or audit.status not in ("queued", "running"):
            return 0
        tasks = stage_tasks(session, audit_id, audit.stage)
    for task in tasks:
        send(*task)
    return len(tasks)


def _idle(now: datetime, moments: list[datetime | None]) -> float:
    known = [as_utc(m) for m in moments if m is not None]
    return (now - max(known)).total_seconds() if known else float("inf")

