"""The FastAPI application: routers, the one place errors become 4xx/503 responses, task submission."""
from __future__ import annotations

import logging
import threading

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ecif_core.errors import ConfigError, EcifError
from ecif_core.values import finite_or_null

from ..resume import Resumed, resume_audit
from ..settings import Settings, get_settings
from . import unavailable
from .redact import Redactor
from .routes import audits, edits, health, traces

log = logging.getLogger("ecif.api")


class CeleryStarter:
    """Service mode: the prepare task (or a resumed audit's tasks) goes to the broker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def start(self, audit_id: str) -> None:
        from ecif_core.stages.table import FIRST
        from ..dispatch import CeleryDispatcher

        CeleryDispatcher().send(FIRST, audit_id)

    def resume(self, audit_id: str) -> Resumed:
        from ..dispatch import CeleryDispatcher

        return resume_audit(self.settings.database_url, audit_id, CeleryDispatcher().send)

    def start_trace(self, trace_id: str) -> None:
        from ..dispatch import CeleryDispatcher

        CeleryDispatcher().send("trace", trace_id)  # the task's name: liveness.REQUEST_TASKS

    def start_edit(self, edit_id: str) -> None:
        from ..dispatch import CeleryDispatcher

        CeleryDispatcher().send("edit", edit_id)

    def estimate(self, manifest) -> dict:
        """Timed on a gpu worker, whose device and threads are the audit's (services.estimates)."""
        from ..estimates import request_estimate

        return request_estimate(self.settings, manifest)


def close_request(database_url: str, kind: str, row_id: str, exc: BaseException) -> None:
    """In-process mode has no reconciler: a trace or edit whose run escaped (a database outage
    mid-run, say) is failed with the reason now, or it would stay `running` for good."""
    from ..pipeline import fail_open_request

    try:
        fail_open_request(database_url, kind, row_id, exc)
    except Exception:  # noqa: BLE001 - the database is still away: the log above has the reason
        log.warning("could not record %s %s as failed", kind, row_id)


class InProcessStarter:
    """Embedded mode (no broker): audits run one after another on a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()

    def start(self, audit_id: str) -> None:
        threading.Thread(target=self._run, args=(audit_id,), daemon=True, name=f"audit-{audit_id}").start()

    def start_trace(self, trace_id: str) -> None:
        threading.Thread(target=self._trace, args=(trace_id,), daemon=True, name=f"trace-{trace_id}").start()

    def start_edit(self, edit_id: str) -> None:
        threading.Thread(target=self._edit, args=(edit_id,), daemon=True, name=f"edit-{edit_id}").start()

    def estimate(self, manifest) -> dict:
        """Timed here, where the audits run, and only while none runs (it would slow the timed batches)."""
        from ..estimates import EstimateUnavailable, estimate_json

        if not self._lock.acquire(blocking=False):
            raise EstimateUnavailable("an audit, trace or edit is running on this server and would slow the timed "
                                      "batches; retry the estimate when it is done")
        try:
            return estimate_json(manifest, self.settings)
        finally:
            self._lock.release()

    def _edit(self, edit_id: str) -> None:
        from ..pipeline import run_edit

        with self._lock:
            try:
                run_edit(self.settings.database_url, edit_id)
            except Exception as exc:
                log.exception("edit %s stopped", edit_id)
                close_request(self.settings.database_url, "edit", edit_id, exc)

    def _trace(self, trace_id: str) -> None:
        from ecif_core.stages import ModelCache

        from ..pipeline import run_trace

        with self._lock:
            try:
                run_trace(self.settings.database_url, trace_id, ModelCache())
            except Exception as exc:
                log.exception("trace %s stopped", trace_id)
                close_request(self.settings.database_url, "trace", trace_id, exc)

    def resume(self, audit_id: str) -> Resumed:
        """Reopened here (a refusal is the caller's answer), run on a background thread."""
        from ..pipeline import LocalDispatcher

        dispatcher = LocalDispatcher()
        resumed = resume_audit(self.settings.database_url, audit_id, dispatcher.send)
        threading.Thread(target=self._run, args=(audit_id, dispatcher), daemon=True, name=f"audit-{audit_id}").start()
        return resumed

    def _run(self, audit_id: str, dispatcher=None) -> None:
        """Start the audit, or run the tasks already in `dispatcher` (a resumed audit's)."""
        from ..pipeline import LocalDispatcher, Pipeline

        with self._lock:
            start, dispatcher = dispatcher is None, dispatcher or LocalDispatcher()
            pipeline = Pipeline(self.settings.database_url, dispatcher, image_roots=self.settings.resolved_roots(),
                                heartbeat_interval=self.settings.heartbeat_interval,  # status tells running from stalled
                                remote_image_hosts=self.settings.remote_image_hosts)
            if start:
                pipeline.start(audit_id)
            try:
                dispatcher.drain(pipeline)
            except Exception:
                log.exception("audit %s stopped", audit_id)  # the pipeline recorded it as failed


def create_app(settings: Settings | None = None, starter: object | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="ECIF audit service", version="0.1.0",
                  description="Find misaligned image-text pairs in CLIP training data with ECIF.")
    app.state.settings = settings
    app.state.dispatcher = starter or (CeleryStarter(settings) if settings.broker_url else InProcessStarter(settings))
    app.include_router(health.router)
    app.include_router(audits.router)
    app.include_router(traces.router)
    app.include_router(edits.router)

    unavailable.install(app, settings)  # database or broker down: 503 + Retry-After, never a 500
    redact = Redactor(settings.store_url, [*settings.data_roots, *settings.resolved_roots()])
    app.state.redact = redact  # status bodies' `error` fields go through it too

    @app.exception_handler(ConfigError)
    async def config_error(_request: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": ["body", *exc.field.split(".")], "msg": redact(exc.message), "type": "value_error"}],
            "field": exc.field})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 plus `field` (the first error's location); a NaN the client sent is echoed as null."""
        detail = finite_or_null(jsonable_encoder(exc.errors()))
        loc = [str(part) for part in (detail[0]["loc"] if detail else [])]
        return JSONResponse(status_code=422, content={"detail": detail, "field": ".".join(loc[1:]) or None})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """A body the framework cannot parse (its 400) is an invalid request like any other: 422."""
        if exc.status_code == 400:
            return JSONResponse(status_code=422, content={"detail": [
                {"loc": ["body"], "msg": str(exc.detail), "type": "value_error"}], "field": "body"})
        return await http_exception_handler(request, exc)

    @app.exception_handler(EcifError)
    async def ecif_error(_request: Request, exc: EcifError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": redact(str(exc))})

    return app
