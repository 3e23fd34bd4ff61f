"""Resume a failed or cancelled audit where it stopped; the one mechanism behind
`POST /audits/{id}/retry`, `ecif retry` and a rerun of `ecif audit` on the same folder.

A failure (a full disk, a worker's error) or a cancel stops an audit between tasks, and what
was finished stays valid: a shard is recorded `done` in `shards` only after ecif_core made its
data durable and set the store's completion marker, and an unsharded stage writes its
completion marker last. So a resumed audit starts again at its recorded stage and only that
stage's unfinished tasks are sent; a shard whose data reached the store but whose row was not
marked done (its worker died in between) is sent too, and its marker makes it a skip.

The reconciler (services.reconcile) never resumes a failed or cancelled audit: it sends lost
tasks of queued and running audits only. A failed audit resumes only when a person asks.

Imports only the database layer (no torch): the API process calls it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ecif_core.errors import EcifError
from ecif_core.stages.table import DONE

from .db.models import SHARDED, Audit, Shard
from .db.session import session_scope
from .liveness import mark_dispatched, now

RESUMABLE = ("failed", "cancelled")
Send = Callable[[str, str, "int | None"], None]
Task = tuple[str, str, "int | None"]  # (stage, audit id, shard)


class NotResumable(EcifError):
    """The audit is not failed or cancelled (or does not exist): nothing to resume."""

    def __init__(self, audit_id: str, status: str | None) -> None:
        self.status = status
        super().__init__(f"audit {audit_id} does not exist" if status is None else
                         f"audit {audit_id} is {status}; only a failed or cancelled audit can be resumed")


class DispatchFailed(EcifError):
    """The tasks could not be sent (the broker refused); the audit was put back as it was."""


@dataclass(frozen=True)
class Resumed:
    status: str   # queued (it had never started) or running
    stage: str    # where it starts again
    tasks: int    # tasks sent


def resume_audit(database_url: str, audit_id: str, send: Send) -> Resumed:
    """Reopen a failed or cancelled audit at the stage where it stopped and send that stage's
    unfinished tasks; every finished shard is kept.

    One transaction clears `error` and `finished_at`, sets the status back (running, or queued
    when it never started) with a compare-and-set, so two concurrent retries resume it once,
    and records the dispatch times as the pipeline does, so the reconciler does not send the
    tasks a second time. The tasks are sent after the commit; if sending fails (the broker
    refuses), the audit is put back as it was (status, error, finished_at) and DispatchFailed
    is raised. Raises NotResumable for any other status.
    """
    with session_scope(database_url) as session:
        audit = session.get(Audit, audit_id)
        if audit is None:
            raise NotResumable(audit_id, None)
        before = {"status": audit.status, "error": audit.error, "finished_at": audit.finished_at}
        status = "running" if audit.started_at is not None else "queued"
        reopened = session.execute(update(Audit).where(Audit.id == audit_id, Audit.status.in_(RESUMABLE))
                                   .values(status=status, error=None, finished_at=None)).rowcount
        if reopened != 1:
            raise NotResumable(audit_id, audit.status)
        stage = audit.stage
        # the shard that failed (or ran when the cancel came) was left `running`: it waits again
        session.execute(update(Shard).where(Shard.audit_id == audit_id, Shard.status == "running")
                        .values(status="pending"))
        tasks = stage_tasks(session, audit_id, stage)
    try:
        for task in tasks:
            send(*task)
    except Exception as exc:
        with session_scope(database_url) as session:
            session.execute(update(Audit).where(Audit.id == audit_id, Audit.status == status, Audit.stage == stage)
                            .values(**before))
        raise DispatchFailed(f"could not send the tasks of audit {audit_id}: {type(exc).__name__}: {exc}") from exc
    return Resumed(status, stage, len(tasks))


def stage_tasks(session: Session, audit_id: str, stage: str) -> list[Task]:
    """The tasks that move `stage` on, marked dispatched now (in the caller's transaction).

    A sharded stage: its shards not done, in order; when every shard is done (the stage's last
    task was stopped before it moved the audit on) one done shard, whose run is a skip that
    moves the stage on. An unsharded stage: its one task. The done stage: none.
    """
    if stage == DONE:
        return []
    if stage not in SHARDED:
        mark_dispatched(session, stage, audit_id)
        return [(stage, audit_id, None)]
    rows = session.execute(select(Shard.shard, Shard.status).where(Shard.audit_id == audit_id, Shard.stage == stage)
                           .order_by(Shard.shard)).all()
    pending = [shard for shard, status in rows if status != "done"]
    if pending:
        mark_dispatched(session, stage, audit_id, pending)
        return [(stage, audit_id, shard) for shard in pending]
    if not rows:
        return []
    session.execute(update(Audit).where(Audit.id == audit_id).values(dispatched_at=now()))
    return [(stage, audit_id, rows[0][0])]

