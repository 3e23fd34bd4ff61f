"""Re-send the work of audits that stopped moving: the broker is not the source of truth.

Tasks live in Redis only until a worker takes them; a Redis restart without persistence, or a
flushed queue, loses them, and nothing would run those shards again. The database still says
what is left, so an audit with no activity for longer than the longest shard may take is
resumed by sending its unfinished tasks again (every task tolerates duplicates).

Imports only the database layer (no torch): it runs in a prefork worker's parent process.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Callable

from sqlalchemy import func, select

from .db.models import SHARDED, Audit, Shard
from .db.session import session_scope

Send = Callable[[str, str, "int | None"], None]


def stalled_audits(database_url: str, stale_after: float) -> list[str]:
    """Queued or running audits whose last recorded activity is older than `stale_after` seconds."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=stale_after)
    with session_scope(database_url) as session:
        last_shard = (select(Shard.audit_id, func.max(func.coalesce(Shard.finished_at, Shard.started_at)).label("at"))
                      .group_by(Shard.audit_id).subquery())
        rows = session.execute(select(Audit.id, Audit.created_at, Audit.started_at, last_shard.c.at)
                               .outerjoin(last_shard, last_shard.c.audit_id == Audit.id)
                               .where(Audit.status.in_(("queued", "running")))).all()
    return [audit_id for audit_id, *times in rows
            if max(_aware(t) for t in times if t is not None) < cutoff]


def resume(database_url: str, audit_id: str, send: Send) -> int:
    """Send the current stage's unfinished tasks again; returns how many were sent."""
    with session_scope(database_url) as session:
        audit = session.get(Audit, audit_id)
        if audit is None or audit.status not in ("queued", "running") or audit.stage == "done":
            return 0
        stage = audit.stage
        pending = session.scalars(select(Shard.shard).where(Shard.audit_id == audit_id, Shard.stage == stage,
                                                            Shard.status != "done")).all()
    if stage in SHARDED:
        for shard in sorted(pending):
            send(stage, audit_id, shard)
        return len(pending)
    send(stage, audit_id, None)
    return 1


def reconcile(database_url: str, send: Send, stale_after: float) -> dict[str, int]:
    """Resume every stalled audit; {audit id: tasks sent}."""
    return {audit_id: resume(database_url, audit_id, send) for audit_id in stalled_audits(database_url, stale_after)}


def _aware(moment: datetime) -> datetime:
    """SQLite returns naive datetimes (stored as UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
