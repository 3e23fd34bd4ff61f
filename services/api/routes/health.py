"""/healthz (the process answers), /readyz (database, broker and store reachable), /metrics."""
from __future__ import annotations


import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from sqlalchemy import func, select, text

from ecif_core.data.storage import check_writable, location

from ...db.models import STATUSES, Audit, Shard
from ...db.session import schema_is_current, session_scope
from ...repository import owner_of_key
from ..deps import SettingsDep, _bearer
from ..schemas import errors

router = APIRouter(tags=["health"])
QUEUES = ("gpu", "cpu")


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "database (not at the newest migration), broker or store "
                                                    "unreachable; `checks` says which"}})
def readyz(settings: SettingsDep) -> JSONResponse:
    checks = {"database": _check(lambda: _ping_database(settings.database_url)),
              "broker": _check(lambda: _ping_broker(settings.broker_url)),
              "store": _check(lambda: _ping_store(settings.store_url))}
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}}, **errors(401, 503)})
def metrics(request: Request, settings: SettingsDep,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Response:
    """Prometheus text, read from the database and the broker at scrape time (every API replica
    agrees). `Authorization: Bearer <ECIF_METRICS_TOKEN>`: every owner's counts; an API key:
    that owner's audits only; nothing else: 401."""
    token = credentials.credentials if credentials else None
    owner = None
    if not (token and settings.metrics_token and hmac.compare_digest(token, settings.metrics_token)):
        with session_scope(settings.database_url) as session:
            owner = owner_of_key(session, token) if token else None
        if owner is None:
            raise HTTPException(401, "missing or invalid API key (or ECIF_METRICS_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})
    registry = CollectorRegistry()
    registry.register(_Collector(settings.database_url, settings.broker_url, owner))
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")


class _Collector:
    def __init__(self, database_url: str, broker_url: str | None, owner: str | None) -> None:
        self.database_url, self.broker_url, self.owner = database_url, broker_url, owner

    def collect(self):
        mine = (lambda query: query) if self.owner is None else (lambda query: query.where(Audit.owner == self.owner))
        with session_scope(self.database_url) as session:
            by_status = dict(session.execute(mine(select(Audit.status, func.count())).group_by(Audit.status)).all())
            durations = session.execute(mine(select(Shard.stage, func.count(), func.sum(Shard.seconds))
                                             .join(Audit, Audit.id == Shard.audit_id))
                                        .where(Shard.status == "done").group_by(Shard.stage)).all()
        audits = GaugeMetricFamily("ecif_audits", "Audits by status", labels=["status"])
        for status in STATUSES:
            audits.add_metric([status], by_status.get(status, 0))
        yield audits
        shards = SummaryMetricFamily("ecif_shard_seconds", "Wall time of finished shards", labels=["stage"])
        for stage, count, total in durations:
            shards.add_metric([stage], count_value=count, sum_value=total or 0.0)
        yield shards
        depth = GaugeMetricFamily("ecif_queue_depth", "Tasks waiting in a broker queue", labels=["queue"])
        if self.broker_url:
            for queue, length in _queue_depths(self.broker_url).items():
                depth.add_metric([queue], length)
        yield depth


def _check(probe) -> str:
    try:
        probe()
        return "ok"
    except Exception as exc:  # a readiness probe reports, it never raises
        return f"error: {type(exc).__name__}: {exc}"[:300]


def _ping_database(url: str) -> None:
    with session_scope(url) as session:
        session.execute(text("SELECT 1"))
    if not schema_is_current(url):
        raise RuntimeError("schema is not at the newest migration: run `ecif db upgrade`")


def _ping_broker(url: str | None) -> None:
    if url is None:
        return  # embedded mode: tasks run in the API process
    import redis

    redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()


def _ping_store(store_url: str) -> None:
    """Writes and removes one small object: a bucket that is gone or refuses us is not ready."""
    check_writable(location(store_url, "store_url"), "store_url")


def _queue_depths(url: str) -> dict[str, int]:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        return {queue: int(client.llen(queue)) for queue in QUEUES}
    except Exception:
        return {}
