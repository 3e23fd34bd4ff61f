"""One audit as database-tracked stages over the ecif_core stage functions.

The same code runs in the embedded mode (an in-process dispatcher, SQLite) and in the
service (Celery tasks, Postgres). The database is the source of truth: a stage records
its shards as done after ecif_core has made the result durable, and the task that
finishes the last shard of a stage moves the audit on with a compare-and-set on
`audits.stage`, so the stage moves exactly once even when tasks are delivered twice. A
redelivered task that finds its stage passed sends the next stage's unfinished tasks again:
its first delivery may have died between that commit and the dispatch.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import logging
import math
import os
import socket
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Protocol

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, StatementError
from sqlalchemy.orm import Session

from ecif_core.data.folder import AuditFolder
from ecif_core import stages as core
from ecif_core.errors import EcifError, NonFiniteResult, NotReady
from ecif_core.data.manifest import Manifest
from ecif_core.ranked import VALUE_COLUMNS
from ecif_core.values import finite_or_null

from ecif_core.stages.table import DONE, FIRST, next_stage, position

from .db.models import FINISHED, SHARDED, Audit, PairRow, Score, Shard, as_utc, utcnow
from .db.session import session_scope
from .liveness import MAX_ATTEMPTS, REQUEST_TABLES, Heartbeat, RequestHeartbeat, gave_up, mark_dispatched

log = logging.getLogger("ecif.pipeline")

BULK_ROWS = 5000
TRANSIENT = (OperationalError, InterfaceError)  # database unreachable: retry the task, keep the audit


class Dispatcher(Protocol):
    """Who runs the next task: Celery in the service, a local queue in the embedded mode."""

    def send(self, stage: str, audit_id: str, shard: int | None = None) -> None: ...


class LocalDispatcher:
    """Runs tasks in this process, in submission order (the embedded mode)."""

    def __init__(self) -> None:
        self.queue: deque[tuple[str, str, int | None]] = deque()
        self.stage_seconds: dict[str, float] = {}  # wall time of each stage's tasks run here (timing.json)

    def send(self, stage: str, audit_id: str, shard: int | None = None) -> None:
        self.queue.append((stage, audit_id, shard))

    def drain(self, pipeline: "Pipeline", after_each: Callable[[str, str, int | None], None] | None = None) -> None:
        while self.queue:
            stage, audit_id, shard = self.queue.popleft()
            started = time.perf_counter()
            pipeline.run(stage, audit_id, shard)
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - started
            if after_each:
                after_each(stage, audit_id, shard)


class Pipeline:
    """Runs one stage (or shard) of an audit and records it; `models` is reused across calls."""

    def __init__(self, database_url: str, dispatcher: Dispatcher, models: core.ModelCache | None = None,
                 image_roots: list[Path] | None = None, heartbeat_interval: float = 0,
                 remote_image_hosts: list[str] | None = None,
                 task_progress: Callable[[str, int | None, str, int, int | None], None] | None = None) -> None:
        self.database_url = database_url
        self.dispatcher = dispatcher
        self.models = models or core.ModelCache()
        self.references = core.ReferenceCache()
        self.image_roots = image_roots
        # The operator's ECIF_REMOTE_IMAGE_HOSTS (None: the embedded mode, no operator): read by the
        # worker itself, so only the operator's host:port entries open non-public addresses.
        self.remote_image_hosts = remote_image_hosts
        self.heartbeat_interval = heartbeat_interval  # seconds between a running task's beats (0: none)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.last_failure: Exception | None = None  # the error of the last task that failed here (in-process callers)
        # (stage, shard, unit, done, total) within a running task: the in-process bars (services.stage_progress)
        self.task_progress = task_progress

    # ------------------------------------------------------------ entry points

    def start(self, audit_id: str) -> None:
        with session_scope(self.database_url) as session:
            mark_dispatched(session, FIRST, audit_id)
        self.dispatcher.send(FIRST, audit_id)

    def run(self, stage: str, audit_id: str, shard: int | None = None) -> None:
        """Run one task. Finished shards, stages already passed and finished or cancelled
        audits are skipped; a skipped duplicate still repairs a lost dispatch (`_advance`)."""
        claimed = self._claim(stage, audit_id, shard)
        if claimed is None:
            return
        audit_dir, skip = claimed
        if not skip:
            started = time.perf_counter()
            try:
                with Heartbeat(self.database_url, audit_id, stage, shard, self.heartbeat_interval):
                    self._execute(stage, audit_id, audit_dir, shard)
            except TRANSIENT:
                raise  # database or broker unreachable: the task is retried, the audit is not failed
            except NotReady:
                raise  # an earlier stage has not finished (a task out of order): retried, the audit is not failed
            except Exception as exc:
                self._fail(audit_id, stage, shard, exc)
                if isinstance(exc, EcifError):
                    return
                raise
            if stage in SHARDED:
                self._shard_finished(audit_id, stage, shard, time.perf_counter() - started)
        self._advance(audit_id, stage)

    def _claim(self, stage: str, audit_id: str, shard: int | None) -> tuple[str, bool] | None:
        """(audit folder, skip the work?) or None when there is nothing to do at all.

        Status changes are conditional updates, so a cancel committed meanwhile is never
        overwritten by queued -> running.
        """
        with session_scope(self.database_url) as session:
            audit = session.get(Audit, audit_id)
            if audit is None or audit.status in FINISHED:
                return None  # deleted, cancelled or failed meanwhile
            if stage not in SHARDED:
                if audit.stage != stage:
                    # A redelivery of a stage already passed (or not reached): no work, no reset.
                    return (audit.audit_dir, True) if _index(audit.stage) > _index(stage) else None
            elif self._shard_done(session, audit_id, stage, shard):
                return audit.audit_dir, True
            session.execute(update(Audit).where(Audit.id == audit_id, Audit.status == "queued")
                            .values(status="running", started_at=utcnow()))
            if stage in SHARDED:
                session.execute(update(Shard).where(Shard.audit_id == audit_id, Shard.stage == stage,
                                                    Shard.shard == shard)
                                .values(status="running", attempts=Shard.attempts + 1, worker=self.worker,
                                        started_at=utcnow(), heartbeat_at=utcnow()))
            else:
                session.execute(update(Audit).where(Audit.id == audit_id).values(heartbeat_at=utcnow()))
            return audit.audit_dir, False

    # ------------------------------------------------------------ stages

    def _execute(self, stage: str, audit_id: str, audit_dir: str, shard: int | None) -> None:
        """The stage's ecif_core function (stages.py), then what the service records of it."""
        manifest = None
        if stage == FIRST:
            with session_scope(self.database_url) as session:
                manifest = Manifest.from_json(session.get(Audit, audit_id).manifest)
        progress = None if self.task_progress is None else functools.partial(self.task_progress, stage, shard)
        result = core.run_stage(stage, audit_dir, shard, manifest=manifest, image_roots=self.image_roots,
                                models=self.models, references=self.references,
                                operator_hosts=self.remote_image_hosts, progress=progress)
        if stage == FIRST:
            self._prepare(audit_id, audit_dir, result)
        elif stage == "scores":
            self._write_shard_scores(audit_id, audit_dir, shard)
        elif stage == "finalize":
            self._finalize(audit_id, result)

    def _prepare(self, audit_id: str, audit_dir: str, plan: core.Plan) -> None:
        with session_scope(self.database_url) as session:
            session.execute(delete(PairRow).where(PairRow.audit_id == audit_id))
            _bulk_insert(session, PairRow, _pair_rows(audit_id, audit_dir))
            known = set(session.execute(select(Shard.stage, Shard.shard).where(Shard.audit_id == audit_id)).all())
            missing = [{"audit_id": audit_id, "stage": stage, "shard": s, "status": "pending"}
                       for stage in SHARDED for s in range(plan.shards) if (stage, s) not in known]
            if missing:  # a second prepare never resets shards (done ones stay done)
                session.execute(insert(Shard), missing)
            session.execute(update(Audit).where(Audit.id == audit_id).values(
                shards_total=plan.shards, pairs_total=plan.pairs_total, pairs_rejected=plan.pairs_rejected))

    def _write_shard_scores(self, audit_id: str, audit_dir: str, shard: int) -> None:
        """One bulk insert per shard; a re-run replaces the shard's rows in the same transaction."""
        slots, pairs, cols = core.shard_score_columns(audit_dir, shard)
        shift = float(core.open_store(audit_dir).curvature_shifts()[shard])
        rows = [{"audit_id": audit_id, "slot": int(slot), "shard": shard, "pair_id": pair.id,
                 **{name: _nullable(cols[name][i]) for name in SCORE_COLUMNS}}
                for i, (slot, pair) in enumerate(zip(slots, pairs))]
        try:
            with session_scope(self.database_url) as session:
                session.execute(delete(Score).where(Score.audit_id == audit_id, Score.shard == shard))
                _bulk_insert(session, Score, rows)
                session.execute(update(Audit).where(Audit.id == audit_id).values(curvature_shift=shift))
        except IntegrityError:
            # A concurrent delivery of this shard committed the same rows first (same store,
            # same numbers); anything else is a real error.
            with session_scope(self.database_url) as session:
                written = session.scalar(select(func.count()).select_from(Score).where(
                    Score.audit_id == audit_id, Score.shard == shard))
            if written != len(rows):
                raise

    def _finalize(self, audit_id: str, result: core.Ranking) -> None:
        """Record the finalize stage's ranking (rank, flag, suspicion, misaligned_probability) and the
        calibration summary: ranked.csv, results.csv and summary.json are read from them."""
        rank_of = {int(result.slots[i]): rank for rank, i in enumerate(result.order, start=1)}
        suspected = {int(slot): bool(flag) for slot, flag in zip(result.slots, result.suspected)}
        finalized = {name: {int(slot): _nullable(value) for slot, value in zip(result.slots, result.columns[name])}
                     for name in FINALIZED_COLUMNS}
        with session_scope(self.database_url) as session:
            ids = session.execute(select(Score.id, Score.slot).where(Score.audit_id == audit_id)).all()
            if len(ids) != len(rank_of):
                raise RuntimeError(f"{len(ids)} score rows in the database for {len(rank_of)} scored pairs")
            updates = [{"id": pk, "rank": rank_of[slot], "suspected": suspected[slot],
                        **{name: values[slot] for name, values in finalized.items()}} for pk, slot in ids]
            for start in range(0, len(updates), BULK_ROWS):
                session.execute(update(Score), updates[start:start + BULK_ROWS])
            session.execute(update(Audit).where(Audit.id == audit_id).values(summary=result.calibration.summary()))

    # ------------------------------------------------------------ bookkeeping

    @staticmethod
    def _shard_done(session: Session, audit_id: str, stage: str, shard: int) -> bool:
        status = session.scalar(select(Shard.status).where(Shard.audit_id == audit_id, Shard.stage == stage,
                                                           Shard.shard == shard))
        return status == "done"

    def _shard_finished(self, audit_id: str, stage: str, shard: int, seconds: float) -> None:
        with session_scope(self.database_url) as session:
            session.execute(update(Shard).where(Shard.audit_id == audit_id, Shard.stage == stage, Shard.shard == shard)
                            .values(status="done", finished_at=utcnow(), seconds=seconds))

    def _advance(self, audit_id: str, stage: str) -> None:
        """Move the audit past `stage` once all its work is done; dispatch what comes next.

        Exactly one task wins the compare-and-set on `audits.stage`. A task that loses it
        because the stage had already moved on is a redelivery: its first delivery may have
        died between the commit and the dispatch, so it sends the next stage's unfinished
        tasks again (every task tolerates duplicates).
        """
        with session_scope(self.database_url) as session:
            audit = session.get(Audit, audit_id)
            if audit is None or audit.status in FINISHED:
                return
            if stage in SHARDED:
                done = session.scalar(select(func.count()).select_from(Shard).where(
                    Shard.audit_id == audit_id, Shard.stage == stage, Shard.status == "done"))
                if done < (audit.shards_total or 0):
                    return
            following = next_stage(stage)
            values = {"stage": following}
            if following == DONE:
                values.update(status="succeeded", finished_at=utcnow())
            moved = session.execute(update(Audit).where(Audit.id == audit_id, Audit.stage == stage,
                                                        Audit.status == "running").values(**values)).rowcount
            if moved != 1 and audit.stage != following:
                return  # the audit is further on: later tasks own the dispatch
            pending = [s for (s,) in session.execute(select(Shard.shard).where(
                Shard.audit_id == audit_id, Shard.stage == following, Shard.status != "done"))]
            if following != DONE:
                mark_dispatched(session, following, audit_id, pending)
        if following == DONE:
            return
        if following in SHARDED:
            for shard in sorted(pending):
                self.dispatcher.send(following, audit_id, shard)
        else:
            self.dispatcher.send(following, audit_id)

    def _fail(self, audit_id: str, stage: str, shard: int | None, exc: Exception) -> None:
        self.last_failure = exc
        where = stage if shard is None else f"{stage} shard {shard}"
        message = f"{where}: {error_text(exc)}"
        log.error("audit %s failed in %s", audit_id, message, exc_info=not isinstance(exc, EcifError))
        with session_scope(self.database_url) as session:
            session.execute(update(Audit).where(Audit.id == audit_id, Audit.status.not_in(FINISHED))
                            .values(status="failed", error=message, finished_at=utcnow()))


def error_text(exc: BaseException, limit: int = 4000) -> str:
    """What a user may read of a failure: our own errors as they are; a database error as its
    driver's first line only (SQLAlchemy's text carries the statement and the row data, which
    stay in the worker log); never a NUL or a lone surrogate (Postgres refuses both)."""
    if isinstance(exc, StatementError) and exc.orig is not None:
        first = (str(exc.orig).strip().splitlines() or [""])[0]
        text = f"database error {type(exc.orig).__name__}: {first} (details in the worker log)"
    elif isinstance(exc, EcifError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text[:limit]


def _index(stage: str) -> int:
    return position(stage)


# Every number column of ranked.csv is a column of the scores table; a shard writes all but the
# suspicion and the misaligned_probability, which need every shard (robust z, a mixture over all
# pairs) and are set by finalize with the rank.
FINALIZED_COLUMNS = ("suspicion", "misaligned_probability")
SCORE_COLUMNS = tuple(name for name in VALUE_COLUMNS if name not in FINALIZED_COLUMNS)


def _nullable(value: float) -> float | None:
    value = float(value)
    return None if value != value else value  # NaN (no validation set) -> NULL


def _bulk_insert(session: Session, table: type, rows) -> None:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) >= BULK_ROWS:
            session.execute(insert(table), batch)
            batch = []
    if batch:
        session.execute(insert(table), batch)


def _pair_rows(audit_id: str, audit_dir: str):
    """Usable pairs (slot order) from prepare's pairs.jsonl, then rejected rows from rejected.csv."""
    for slot, pair in core.load_slots(audit_dir):
        yield {"audit_id": audit_id, "pair_id": pair.id, "slot": slot, "image": pair.image, "caption": pair.caption}
    with AuditFolder(audit_dir).rejected.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            yield {"audit_id": audit_id, "pair_id": row["id"], "row": int(row["row"]), "reason": row["reason"]}


class _Failed:
    def __init__(self) -> None:
        self.value = False

    def __bool__(self) -> bool:
        return self.value


@contextlib.contextmanager
def _request_failures(database_url: str, table, row_id: str) -> Iterator[_Failed]:
    """A trace or edit that fails is recorded as failed, with its reason; our own errors (bad input,
    a non-finite result) end there, anything else is re-raised for the worker's log; database
    outages are retried, not recorded."""
    failed = _Failed()
    try:
        yield failed
    except TRANSIENT:
        raise
    except Exception as exc:
        _fail_open(database_url, table, row_id, error_text(exc))
        failed.value = True
        if not isinstance(exc, EcifError):
            raise


def fail_open_request(database_url: str, kind: str, row_id: str, exc: BaseException) -> None:
    """Record a queued or running trace or edit as failed with the reason (never a finished one)."""
    _fail_open(database_url, REQUEST_TABLES[kind], row_id, f"stopped: {error_text(exc)}")


def _fail_open(database_url: str, table, row_id: str, error: str) -> None:
    """Only a row still open fails: a duplicate delivery failing never overwrites another's success."""
    with session_scope(database_url) as session:
        session.execute(update(table).where(table.id == row_id, table.status.in_(("queued", "running")))
                        .values(status="failed", error=error, finished_at=utcnow()))


def _claim_request(database_url: str, kind: str, row_id: str, heartbeat_interval: float = 0) -> dict | None:
    """Mark a trace or edit running (one more attempt) and return its request and audit folder;
    None when there is nothing to run: gone, finished, running elsewhere (it beat within four
    heartbeat intervals: a duplicate delivery must not write the same folder beside it), or started
    MAX_ATTEMPTS times already (then it is failed with that reason: each earlier start lost its worker)."""
    table = REQUEST_TABLES[kind]
    with session_scope(database_url) as session:
        row = session.get(table, row_id, with_for_update=True)
        if row is None or row.status in FINISHED:
            return None
        if row.status == "running" and heartbeat_interval > 0 and row.heartbeat_at is not None and \
                utcnow() - as_utc(row.heartbeat_at) < timedelta(seconds=4 * heartbeat_interval):
            return None
        if row.attempts >= MAX_ATTEMPTS:
            row.status, row.error, row.finished_at = "failed", gave_up(kind, row.attempts), utcnow()
            return None
        row.status, row.attempts, row.heartbeat_at = "running", row.attempts + 1, utcnow()
        claimed = {"request": row.request, "audit_dir": session.get(Audit, row.audit_id).audit_dir}
        if kind == "edit":
            claimed["edit_dir"] = row.edit_dir
        return claimed


def _succeeded(session: Session, table, row_id: str, **values) -> None:
    """Only a running row becomes succeeded (a failure recorded meanwhile stays)."""
    session.execute(update(table).where(table.id == row_id, table.status == "running").values(
        status="succeeded", finished_at=utcnow(), **values))


def run_trace(database_url: str, trace_id: str, models: core.ModelCache, heartbeat_interval: float = 0) -> None:
    """Answer one trace request: the test-loss gradients here, the ranking from stored numbers."""
    from ecif_core.trace.query import examples_from_json, trace

    from .db.models import Trace, TracePair

    claimed = _claim_request(database_url, "trace", trace_id, heartbeat_interval)
    if claimed is None:
        return
    request = claimed["request"]
    with _request_failures(database_url, Trace, trace_id), \
            RequestHeartbeat(database_url, "trace", trace_id, heartbeat_interval):
        traces = trace(claimed["audit_dir"], examples_from_json(request["tests"]), k=request["k"], models=models)
        rows = [{"trace_id": trace_id, "test": t, "rank": rank, "slot": p.slot, "pair_id": p.id,
                 "relative_is": p.relative_is, "influence": p.influence, "influence_pos": p.influence_pos,
                 "influence_neg": p.influence_neg}
                for t, result in enumerate(traces) for rank, p in enumerate(result.top, start=1)]
        _check_finite(rows, ("relative_is", "influence", "influence_pos", "influence_neg"))
        with session_scope(database_url) as session:
            session.execute(delete(TracePair).where(TracePair.trace_id == trace_id))  # a redelivery replaces
            _bulk_insert(session, TracePair, rows)
            _succeeded(session, Trace, trace_id, test_losses=finite_or_null([t.test_loss for t in traces]),
                       predictions=finite_or_null([t.prediction.to_json() for t in traces]))


def _check_finite(rows: list[dict], columns: tuple[str, ...]) -> None:
    for row in rows:
        bad = [name for name in columns if not math.isfinite(row[name])]
        if bad:
            raise NonFiniteResult(f"test example {row['test']}, rank {row['rank']}: {', '.join(bad)} not finite "
                                  "(NaN or infinity)")


def run_edit(database_url: str, edit_id: str, heartbeat_interval: float = 0) -> None:
    """Write one requested model edit (ecif_core.edit.from_audit) into the edit's folder; the audit is only read.
    Ends succeeded or failed with its reason; the record is stored without NaN or infinity (null)."""
    from ecif_core.edit.from_audit import edit_audit, zero_shot_examples
    from ecif_core.edit.settings import EditSettings

    from .db.models import Edit

    claimed = _claim_request(database_url, "edit", edit_id, heartbeat_interval)
    if claimed is None:
        return
    request, edit_dir = claimed["request"], claimed["edit_dir"]
    with _request_failures(database_url, Edit, edit_id), \
            RequestHeartbeat(database_url, "edit", edit_id, heartbeat_interval):
        settings = EditSettings.from_mapping(request, deprecated=False)  # rows queued before a rename: old names
        zero_shot = zero_shot_examples(request["zero_shot"]) if request.get("zero_shot") else None
        action = request.get("action", "remove")  # rows queued before demotion existed: removals
        record = edit_audit(claimed["audit_dir"], request[action], edit_dir, settings, theta=request.get("theta"),
                            base_dir=edit_dir, zero_shot=zero_shot, action=action, keep=request.get("keep"),
                            method=request.get("method", "newton"))  # rows queued before the replay: Newton
        with session_scope(database_url) as session:
            _succeeded(session, Edit, edit_id, result=finite_or_null(record))
