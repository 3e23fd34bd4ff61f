"""Response bodies of the API (OpenAPI at /docs)."""
from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class AuditCreated(BaseModel):
    id: str
    status_url: str


class AuditStatus(BaseModel):
    id: str
    status: str                 # queued | running | stalled | succeeded | failed | cancelled
    stage: str                  # prepare | gradients | curvature | validation | scores | finalize | done
    shards_done: int            # shards finished in the current sharded stage (gradients, then scores)
    shards_total: int
    pairs_total: int | None
    pairs_rejected: int | None
    damping: float | None       # delta + lambda the scores were computed with
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    eta_seconds: float | None   # null while stalled
    stall_reason: str | None = None  # why the audit is stalled (no task beating or queued for ECIF_STALL_AFTER s)
    error: str | None
    results_url: str
    rejected_url: str


class AuditPage(BaseModel):
    items: list[AuditStatus]
    total: int
    limit: int
    offset: int


class TraceRequest(BaseModel):
    """Test examples: {"image": path, "caption": text} or {"image": path, "prompts": [...], "label": i}."""

    tests: list[dict]
    k: int = 20


class TraceCreated(BaseModel):
    trace_id: str
    status_url: str


class TraceStatus(BaseModel):
    id: str
    audit_id: str
    status: str                 # queued | running | succeeded | failed
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    k: int
    results: list[dict]         # per test example: example, test_loss, top (rank, id, image, caption,
                                # relative_is, influence, influence_pos, influence_neg)
    csv_url: str
