"""Liveness of tasks, recorded where the reconciler can see it.

A running task beats (`heartbeat_at`, every ECIF_HEARTBEAT_INTERVAL seconds, from a thread of
the process running it), a sent task records when it was sent (`dispatched_at`), and the
broker's queues say which tasks are still waiting. A task that is neither beating nor waiting
in a queue is lost (its worker was killed, or the broker forgot it) and is sent again. The
same holds for the one task of a trace or an edit (its own row's columns).

Imports only the database layer and redis (no torch): it runs in a prefork worker's parent.
"""
from __future__ import annotations

import ast
import json
import logging
import threading
from datetime import datetime, timezone
from typing import Callable, Iterable

from sqlalchemy import update

from ecif_core.stages.table import TASK_STAGES

from .db.models import SHARDED, Audit, Edit, Shard, Trace
from .db.session import session_scope

log = logging.getLogger("ecif.liveness")

QUEUES = ("gpu", "cpu")
Task = tuple[str, str, "int | None"]  # (stage, audit id, shard), or (kind, trace or edit id, None)
# Traces and edits are one task each, named here; a queued one reads as (kind, id, None).
REQUEST_TASKS = {"trace": "ecif.tasks.gpu.trace", "edit": "ecif.tasks.gpu.edit"}
REQUEST_TABLES = {"trace": Trace, "edit": Edit}
MAX_ATTEMPTS = 3  # starts of a trace's or edit's task before it is failed (each start whose worker died counts)
_REQUEST_KINDS = {task: kind for kind, task in REQUEST_TASKS.items()}


def now() -> datetime:
    return datetime.now(timezone.utc)


class Beating:
    """While a task runs, call `beat` every `interval` seconds from a thread (0: never)."""

    def __init__(self, beat: Callable[[], None], interval: float, what: str) -> None:
        self.beat, self.interval, self.what = beat, interval, what
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Beating":
        if self.interval > 0:
            self._thread = threading.Thread(target=self._run, daemon=True, name="ecif-heartbeat")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried; the task goes on
                log.warning("heartbeat of %s failed", self.what, exc_info=True)


class Heartbeat(Beating):
    """While an audit's task runs, set its row's heartbeat_at (the shard's, or the audit's for an unsharded stage)."""

    def __init__(self, database_url: str, audit_id: str, stage: str, shard: int | None, interval: float) -> None:
        super().__init__(lambda: beat(database_url, audit_id, stage, shard), interval, f"{audit_id} {stage} {shard}")


class RequestHeartbeat(Beating):
    """While a trace or an edit runs, set its row's heartbeat_at."""

    def __init__(self, database_url: str, kind: str, row_id: str, interval: float) -> None:
        super().__init__(lambda: beat_request(database_url, kind, row_id), interval, f"{kind} {row_id}")


def beat(database_url: str, audit_id: str, stage: str, shard: int | None) -> None:
    with session_scope(database_url) as session:
        if stage in SHARDED:
            session.execute(update(Shard).where(Shard.audit_id == audit_id, Shard.stage == stage,
                                                Shard.shard == shard).values(heartbeat_at=now()))
        else:
            session.execute(update(Audit).where(Audit.id == audit_id, Audit.stage == stage)
                            .values(heartbeat_at=now()))


def beat_request(database_url: str, kind: str, row_id: str) -> None:
    table = REQUEST_TABLES[kind]
    with session_scope(database_url) as session:
        session.execute(update(table).where(table.id == row_id, table.status == "running").values(heartbeat_at=now()))


def gave_up(kind: str, attempts: int) -> str:
    """The error of a trace or edit that is not sent again."""
    return (f"the {kind} was started {attempts} times and never finished (each time its worker was lost: "
            "killed, out of memory, or cut off from the database); it is not started again")


def mark_dispatched(session, stage: str, audit_id: str, shards: Iterable[int] | None = None) -> None:
    """Record that the stage's task(s) were sent now (in the caller's transaction)."""
    if stage in SHARDED:
        session.execute(update(Shard).where(Shard.audit_id == audit_id, Shard.stage == stage,
                                            Shard.shard.in_(list(shards or [])))
                        .values(dispatched_at=now()))
    else:
        session.execute(update(Audit).where(Audit.id == audit_id).values(dispatched_at=now()))


def queued_tasks(broker_url: str | None) -> set[Task] | None:
    """The ecif tasks waiting in the broker's queues, or None when that cannot be read.

    Reads the Redis lists Celery's Redis transport keeps per queue (and per priority), and
    each message's task name and argsrepr; nothing is taken off the queue.
    """
    if not broker_url or not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import redis

    try:
        client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
        found: set[Task] = set()
        for queue in QUEUES:
            for key in (queue, *(f"{queue}\x06\x16{p}" for p in range(1, 10))):
                for raw in client.lrange(key, 0, -1):
                    task = _task_of(raw)
                    if task is not None:
                        found.add(task)
        return found
    except Exception:  # noqa: BLE001 - broker down: nothing can be known about the queues
        log.warning("cannot read the broker's queues", exc_info=True)
        return None


def _task_of(raw: bytes) -> Task | None:
    try:
        headers = json.loads(raw)["headers"]
        stage = TASK_STAGES.get(headers["task"]) or _REQUEST_KINDS.get(headers["task"])
        args = ast.literal_eval(headers["argsrepr"])
    except (ValueError, KeyError, TypeError, SyntaxError):
        return None
    if stage is None or not isinstance(args, (list, tuple)) or not args:
        return None
    return stage, str(args[0]), int(args[1]) if len(args) > 1 else None
