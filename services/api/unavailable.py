"""503 + Retry-After while the database or the task broker cannot be reached.

An outage is the client's cue to wait and retry, never a 500 with a traceback: every route
that touches the database (or the broker) answers the same documented error body. The
log line names the failure but never the connection string or its password.
"""
from __future__ import annotations

import logging
from urllib.parse import unquote, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, TimeoutError as PoolTimeoutError

from ..settings import Settings

log = logging.getLogger("ecif.api")

RETRY_AFTER_S = 5  # a restarting database or broker is usually back within seconds
RETRY_HEADERS = {"Retry-After": str(RETRY_AFTER_S)}
# SQLAlchemy wraps the DBAPI's errors (psycopg's, sqlite3's) in these; TimeoutError: no pooled connection free.
DATABASE_DOWN = (OperationalError, InterfaceError, PoolTimeoutError)
BROKER_DOWN = (KombuOperationalError, RedisConnectionError, RedisTimeoutError)
DATABASE_DETAIL = (f"the database is unavailable; retry in {RETRY_AFTER_S} seconds "
                   "(GET /readyz answers 200 once the service is ready again)")
BROKER_DETAIL = f"the task broker is unavailable; nothing was queued, retry in {RETRY_AFTER_S} seconds"


class Unavailable(Exception):
    """Raised where a route knows what is down (the broker refused a submission); its message is the detail."""


def unavailable(detail: str) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": detail, "field": None}, headers=RETRY_HEADERS)


def install(app: FastAPI, settings: Settings) -> None:
    """Register the 503 handlers; `settings` names the secrets the log must not repeat."""
    secrets = _secrets(settings.database_url, settings.broker_url)

    async def database_down(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", _reason(exc, secrets))
        return unavailable(DATABASE_DETAIL)

    async def broker_down(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("task broker unavailable: %s", _reason(exc, secrets))
        return unavailable(BROKER_DETAIL)

    async def known(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s (%s)", exc, _reason(exc.__cause__ or exc, secrets))
        return unavailable(str(exc))

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        """Other driver errors that still mean "the database is away for now": a dropped connection,
        a server shutting down (57P0x), a primary demoted to read-only during a failover (25006)."""
        if is_outage(exc):
            return await database_down(request, exc)
        raise exc  # a real bug: the server's 500, with its traceback in the log

    app.add_exception_handler(Unavailable, known)
    app.add_exception_handler(DBAPIError, database_error)
    for kind in DATABASE_DOWN:
        app.add_exception_handler(kind, database_down)
    for kind in BROKER_DOWN:
        app.add_exception_handler(kind, broker_down)


def is_outage(exc: BaseException) -> bool:
    """A driver error that a retry after a short wait can cure (SQLSTATE classes 08 and 57P0x, 25006)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    state = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    return state.startswith("08") or state in ("57P01", "57P02", "57P03", "25006")


def _secrets(*urls: str | None) -> list[str]:
    """The URLs and their passwords (as written and decoded), longest first."""
    found: set[str] = set()
    for url in filter(None, urls):
        found.add(url)
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            found.update({password, unquote(password)})
    return sorted(found, key=len, reverse=True)


def _reason(exc: Exception, secrets: list[str]) -> str:
    """The driver's own first line (SQLAlchemy's text adds the statement and its parameters)."""
    cause = getattr(exc, "orig", None) or exc
    first = (str(cause).strip().splitlines() or [""])[0]
    for secret in secrets:
        first = first.replace(secret, "***")
    return f"{type(cause).__name__}: {first}"[:300]
