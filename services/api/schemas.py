"""Response bodies of the API (OpenAPI at /docs)."""
from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class AuditCreated(BaseModel):
    id: str
    status_url: str


class AuditStatus(BaseModel):
    id: str
    status: str                 # queued | running | succeeded | failed | cancelled
    stage: str                  # prepare | gradients | curvature | validation | scores | finalize | done
    shards_done: int            # shards finished in the current sharded stage (gradients, then scores)
    shards_total: int
    pairs_total: int | None
    pairs_rejected: int | None
    damping: float | None       # delta + lambda the scores were computed with
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    eta_seconds: float | None
    error: str | None
    results_url: str
    rejected_url: str


class AuditPage(BaseModel):
    items: list[AuditStatus]
    total: int
    limit: int
    offset: int
