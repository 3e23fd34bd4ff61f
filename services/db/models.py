"""SQLAlchemy 2 tables. The schema changes only through a migration under migrations/."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
from ecif_core.stages.table import SHARDED, STAGE_NAMES as STAGES  # noqa: E402,F401  (the one stage table)

STAGE_WIDTH = 16  # characters of a stored stage name (migration 0001): every name of the table must fit


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """A stored moment as an aware UTC datetime (SQLite returns naive datetimes, stored as UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)   # sha256 hex of the key
    prefix: Mapped[str] = mapped_column(String(16))                  # first characters, to tell keys apart
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Audit(Base):
    __tablename__ = "audits"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    # a name of the stage table, stored as text: a new stage needs no migration
    stage: Mapped[str] = mapped_column(String(STAGE_WIDTH), default=STAGES[0])
    manifest: Mapped[dict] = mapped_column(JSON)                     # resolved, validated manifest
    audit_dir: Mapped[str] = mapped_column(Text)
    shards_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pairs_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pairs_rejected: Mapped[int | None] = mapped_column(Integer, nullable=True)
    curvature_shift: Mapped[float | None] = mapped_column(Float, nullable=True)   # delta + lambda the scores used
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)   # calibration summary (summary.json), by finalize
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Liveness of the current unsharded stage (a stage of the table that is not sharded): when
    # its task was last sent, and the last beat of the task running it (services.liveness).
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class PairRow(Base):
    """Every row of the training file: usable ones with their slot, rejected ones with a reason."""

    __tablename__ = "pairs"
    __table_args__ = (Index("ix_pairs_audit_slot", "audit_id", "slot"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    audit_id: Mapped[str] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"))
    pair_id: Mapped[str] = mapped_column(Text)
    row: Mapped[int | None] = mapped_column(Integer, nullable=True)       # line in the source file (rejected)
    slot: Mapped[int | None] = mapped_column(BigInteger, nullable=True)   # row of the gradient store
    image: Mapped[str | None] = mapped_column(Text, nullable=True)
    caption: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)       # why it was rejected


class Shard(Base):
    """One unit of work of a fanned-out stage; `done` is the durable record a retry checks."""

    __tablename__ = "shards"
    __table_args__ = (UniqueConstraint("audit_id", "stage", "shard"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    audit_id: Mapped[str] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(STAGE_WIDTH))  # a sharded stage of the table
    shard: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")   # pending | running | done
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)   # last beat while running
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # last time its task was sent


class Score(Base):
    """Scores of one usable pair; rank and suspected are set by finalize."""

    __tablename__ = "scores"
    __table_args__ = (Index("ix_scores_audit_rank", "audit_id", "rank"),
                      UniqueConstraint("audit_id", "slot"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    audit_id: Mapped[str] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"))
    slot: Mapped[int] = mapped_column(BigInteger)
    shard: Mapped[int] = mapped_column(Integer)
    pair_id: Mapped[str] = mapped_column(Text)
    influence: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    influence_pos: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    influence_neg: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    self_influence: Mapped[float] = mapped_column(Float(53))
    leave_own_out: Mapped[float] = mapped_column(Float(53))
    clip_score: Mapped[float] = mapped_column(Float(53))
    # NULL when the audit has no validation set / reference model (or for rows of older audits)
    suspicion: Mapped[float | None] = mapped_column(Float(53), nullable=True)   # set by finalize, as rank
    influence_per_example: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    self_influence_clip: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    clip_score_loo: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    reference_clip_score: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    reference_negclip: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    # set by finalize; NULL when nothing could be estimated (no validation set) and for older audits
    misaligned_probability: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    # the softmax mass a top-m partners audit dropped (ecif_core/influence/partners.py); NULL when exact
    dropped_partner_mass: Mapped[float | None] = mapped_column(Float(53), nullable=True)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    suspected: Mapped[bool | None] = mapped_column(Boolean, nullable=True)


class RequestLiveness:
    """Liveness of a trace's or an edit's one task (services.liveness): when it was last sent, its
    last beat while running, and how many times a worker started it (a task that keeps killing its
    worker is failed after MAX_ATTEMPTS instead of being sent again forever)."""

    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Trace(RequestLiveness, Base):
    """A trace-back request: test examples of one audit, answered with top-k training pairs."""

    __tablename__ = "traces"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    audit_id: Mapped[str] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="queued")   # queued | running | succeeded | failed
    request: Mapped[dict] = mapped_column(JSON)                         # {"tests": [...], "k": int}
    test_losses: Mapped[list | None] = mapped_column(JSON, nullable=True)
    predictions: Mapped[list | None] = mapped_column(JSON, nullable=True)  # per example; NULL before 0007
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class TracePair(Base):
    """One of the top-k training pairs of one test example of a trace."""

    __tablename__ = "trace_pairs"
    __table_args__ = (Index("ix_trace_pairs_trace_test_rank", "trace_id", "test", "rank"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    trace_id: Mapped[str] = mapped_column(ForeignKey("traces.id", ondelete="CASCADE"))
    test: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    slot: Mapped[int] = mapped_column(BigInteger)
    pair_id: Mapped[str] = mapped_column(Text)
    relative_is: Mapped[float] = mapped_column(Float(53))
    influence: Mapped[float] = mapped_column(Float(53))
    influence_pos: Mapped[float] = mapped_column(Float(53))
    influence_neg: Mapped[float] = mapped_column(Float(53))


class Edit(RequestLiveness, Base):
    """A model edit of a finished audit: the model without a set of pairs, written to `edit_dir`."""

    __tablename__ = "edits"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    audit_id: Mapped[str] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="queued")   # queued | running | succeeded | failed
    request: Mapped[dict] = mapped_column(JSON)                         # {"remove": spec, settings, "theta"}
    edit_dir: Mapped[str] = mapped_column(Text)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)    # the edit record (edit.json)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
