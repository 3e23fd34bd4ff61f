"""/audits/{id}/traces: which training pairs made the model get a test example wrong."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from ecif_core.errors import ConfigError
from ecif_core.trace.query import examples_from_json
from ecif_core.values import check_json_values

from ... import repository
from ...manifests import check_confined
from ...report import trace_report_html
from ..deps import OwnerDep, SessionDep, SettingsDep
from ..openapi import trace_links
from ..schemas import TraceCreated, TraceRequest, TraceStatus, errors
from .audits import _csv, _owned, _owned_child, _redacted, dispatch_or_fail

router = APIRouter(prefix="/audits/{audit_id}/traces", tags=["traces"], responses=errors(401, 404, 503))
MAX_TESTS, MAX_K = 64, 1000


@router.post("", status_code=202, response_model=TraceCreated,
             responses={202: {"links": trace_links("$response.body#/trace_id")}, **errors(409, 422)})
def create(request: Request, audit_id: str, body: TraceRequest, owner: OwnerDep, session: SessionDep,
           settings: SettingsDep) -> TraceCreated:
    audit = _owned(session, owner, audit_id)
    if audit.status != "succeeded":
        raise HTTPException(409, f"audit is {audit.status}; traces need a finished audit")
    if not 1 <= body.k <= MAX_K:
        raise ConfigError("k", f"must be between 1 and {MAX_K}")
    if len(body.tests) > MAX_TESTS:
        raise ConfigError("tests", f"at most {MAX_TESTS} test examples per trace")
    check_json_values(body.tests, "tests")  # NUL, lone surrogates, non-finite numbers
    examples_from_json(body.tests)  # field-by-field validation before anything is queued
    roots = settings.resolved_roots()
    if not roots:
        raise ConfigError("tests", "the server has no data roots configured (ECIF_DATA_ROOTS)")
    tests = [{**t, "image": str(check_confined(t["image"], roots, f"tests[{i}].image"))}
             for i, t in enumerate(body.tests)]
    for i, t in enumerate(tests):
        if not Path(t["image"]).is_file():
            raise ConfigError(f"tests[{i}].image", "file not found")
    trace = repository.create_trace(session, audit, tests, body.k)
    session.commit()
    dispatch_or_fail(session, trace, request.app.state.dispatcher.start_trace, "trace")
    return TraceCreated(trace_id=trace.id, status_url=str(request.url_for("trace_status", audit_id=audit_id,
                                                                          trace_id=trace.id)))


@router.get("/{trace_id}.csv", name="trace_csv", responses={200: {"content": {"text/csv": {}}}, **errors(409)})
def trace_csv(audit_id: str, trace_id: str, owner: OwnerDep, session: SessionDep) -> StreamingResponse:
    trace = _owned_trace(session, owner, audit_id, trace_id)
    if trace.status != "succeeded":
        raise HTTPException(409, f"trace is {trace.status}")
    return _csv(repository.trace_csv(repository.trace_results(session, trace)), f"trace-{trace_id}.csv")


@router.get("/{trace_id}/report", response_class=HTMLResponse, name="trace_report", responses=errors(409))
def trace_report(audit_id: str, trace_id: str, owner: OwnerDep, session: SessionDep,
                 settings: SettingsDep) -> HTMLResponse:
    """The test examples beside their top-k training pairs."""
    trace = _owned_trace(session, owner, audit_id, trace_id)
    if trace.status != "succeeded":
        raise HTTPException(409, f"trace is {trace.status}")
    return HTMLResponse(trace_report_html(settings.database_url, trace.id, settings.resolved_roots()))


@router.get("/{trace_id}", response_model=TraceStatus, name="trace_status",
            responses={200: {"links": trace_links("$response.body#/id", status=False)}})
def status(request: Request, audit_id: str, trace_id: str, owner: OwnerDep, session: SessionDep) -> TraceStatus:
    trace = _owned_trace(session, owner, audit_id, trace_id)
    return TraceStatus(id=trace.id, audit_id=audit_id, status=trace.status, created_at=trace.created_at,
                       finished_at=trace.finished_at, error=_redacted(request, trace.error), k=trace.request["k"],
                       results=repository.trace_results(session, trace) if trace.status == "succeeded" else [],
                       csv_url=str(request.url_for("trace_csv", audit_id=audit_id, trace_id=trace.id)))


def _owned_trace(session, owner: str, audit_id: str, trace_id: str):
    return _owned_child(session, owner, audit_id, trace_id, repository.get_trace, "trace")
