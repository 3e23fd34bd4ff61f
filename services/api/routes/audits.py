"""/audits: submit, list, poll, download, cancel, retry, delete. Thin: parse, authorise, call, return."""
from __future__ import annotations

import json
import uuid
from itertools import chain, islice
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from sqlalchemy.orm import Session

from ecif_core.errors import ConfigError
from ecif_core.values import map_leaves

from ... import repository
from ...db.models import Audit, utcnow
from ...manifests import confined_manifest
from ...report import SERVED_LINKS, audit_report_html
from ...resume import DispatchFailed, NotResumable
from ..deps import OwnerDep, SessionDep, SettingsDep
from ..schemas import AuditCreated, AuditPage, AuditStatus, errors
from ..unavailable import RETRY_AFTER_S, Unavailable
from ..openapi import MANIFEST_BODY, audit_links

router = APIRouter(prefix="/audits", tags=["audits"], responses=errors(401, 503))
MAX_OFFSET = 1_000_000_000     # beyond any owner's audits; a larger one overflowed Postgres' bigint
MAX_ROWS = 2**31 - 1           # results.csv?limit= (a row count; the table's ranks are int4)


@router.post("", status_code=202, response_model=AuditCreated,
             responses={202: {"links": audit_links("$response.body#/id")},
                        200: {"description": "dry_run=true: the audit's cost estimate (expected wall time per "
                              "stage and in total, store size, what was measured); no audit is created"},
                        **errors(413, 422, 503)},
             openapi_extra={"requestBody": MANIFEST_BODY})
async def submit(request: Request, owner: OwnerDep, session: SessionDep, settings: SettingsDep,
                 dry_run: bool = False) -> AuditCreated | JSONResponse:
    """Body: the manifest as JSON, or multipart/form-data with the manifest file in `manifest`.
    `dry_run=true`: the same checks, then a few real batches are timed (on a gpu worker when the
    service has a broker) and the expected wall time and store size come back (200); nothing is
    created or queued for the audit itself."""
    raw = await _manifest_body(request, settings.max_manifest_bytes)
    if dry_run:
        return JSONResponse(await run_in_threadpool(_estimate, request, raw, settings))
    # Reading files and talking to the database and the broker block: off the event loop.
    audit_id = await run_in_threadpool(_create_and_queue, request, raw, owner, session, settings)
    return AuditCreated(id=audit_id, status_url=str(request.url_for("audit_status", audit_id=audit_id)))


def _estimate(request: Request, raw: object, settings) -> dict:
    """The submit's checks, then the starter's estimate (services.estimates); no audit row."""
    from ...estimates import EstimateUnavailable

    manifest = confined_manifest(raw, settings.resolved_roots(), settings.remote_image_hosts, settings.max_shards)
    try:
        return request.app.state.dispatcher.estimate(manifest)
    except EstimateUnavailable as exc:
        raise Unavailable(str(exc)) from None


def _create_and_queue(request: Request, raw: object, owner: str, session: Session, settings) -> str:
    manifest = confined_manifest(raw, settings.resolved_roots(), settings.remote_image_hosts, settings.max_shards)
    audit = repository.create_audit(session, owner, manifest, settings.store_url)
    session.commit()  # durable before any worker can pick the audit up
    try:
        request.app.state.dispatcher.start(audit.id)
    except Exception as exc:  # the broker refused: say so now rather than leave it queued forever
        repository.fail_audit(session, audit, f"could not queue the audit: {type(exc).__name__}: {exc}")
        session.commit()
        raise Unavailable("the task broker is unavailable; the audit was not queued (it is recorded as failed): "
                          f"retry the submission in {RETRY_AFTER_S} seconds") from exc
    return audit.id


@router.get("", response_model=AuditPage,  # items/0: the newest audit on the page
            responses={200: {"links": audit_links("$response.body#/items/0/id", changes=False)}, **errors(422)})
def list_audits(request: Request, owner: OwnerDep, session: SessionDep,
                limit: Annotated[int, Query(ge=1, le=200)] = 20,
                offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> AuditPage:
    audits, total = repository.list_audits(session, owner, limit, offset)
    return AuditPage(items=[_status(request, session, a) for a in audits], total=total, limit=limit, offset=offset)


@router.get("/{audit_id}", response_model=AuditStatus, name="audit_status",
            responses={200: {"links": audit_links("$response.body#/id", changes=False, status=False)}, **errors(404)})
def status(request: Request, audit_id: str, owner: OwnerDep, session: SessionDep) -> AuditStatus:
    return _status(request, session, _owned(session, owner, audit_id))


@router.get("/{audit_id}/results.csv", name="audit_results",
            responses={200: {"content": {"text/csv": {}}}, **errors(404, 409, 422)})
def results(audit_id: str, owner: OwnerDep, session: SessionDep, settings: SettingsDep,
            limit: Annotated[int | None, Query(ge=1, le=MAX_ROWS)] = None,
            suspected_only: bool = False) -> StreamingResponse:
    """Every usable pair, rank 1 = most likely misaligned (columns: README, "ranked.csv")."""
    audit = _owned(session, owner, audit_id)
    if audit.status != "succeeded":
        raise HTTPException(409, f"audit is {audit.status}; results exist once it has succeeded")
    return _csv(repository.results_csv(settings.database_url, audit.id, limit, suspected_only), "ranked.csv")


@router.get("/{audit_id}/report", response_class=HTMLResponse, name="audit_report", responses=errors(404, 409))
def report(audit_id: str, owner: OwnerDep, session: SessionDep, settings: SettingsDep) -> HTMLResponse:
    """One self-contained HTML page for review: summary naming the data set and model, every flagged pair
    with its evidence, flagged-ids export, plots, removal preview, valuable pairs. Its CSV links are
    relative (this folder's results.csv and rejected.csv); `ecif report ID` saves them beside the page."""
    audit = _owned(session, owner, audit_id)
    if audit.status != "succeeded":
        raise HTTPException(409, f"audit is {audit.status}; the report exists once it has succeeded")
    page = audit_report_html(settings.database_url, audit.id, SERVED_LINKS, settings.resolved_roots())
    return HTMLResponse(page)


@router.get("/{audit_id}/rejected.csv", name="audit_rejected",
            responses={200: {"content": {"text/csv": {}}}, **errors(404)})
def rejected(audit_id: str, owner: OwnerDep, session: SessionDep, settings: SettingsDep) -> StreamingResponse:
    """Rows that could not be used, with the reason (complete once the prepare stage is done)."""
    audit = _owned(session, owner, audit_id)
    return _csv(repository.rejected_csv(settings.database_url, audit.id), "rejected.csv")


@router.post("/{audit_id}/cancel", response_model=AuditStatus, responses=errors(404))
def cancel(request: Request, audit_id: str, owner: OwnerDep, session: SessionDep) -> AuditStatus:
    audit = _owned(session, owner, audit_id)
    repository.cancel_audit(session, audit)
    session.commit()
    session.refresh(audit)
    return _status(request, session, audit)


@router.post("/{audit_id}/retry", status_code=202, response_model=AuditStatus, name="audit_retry",
             responses=errors(404, 409, 503, described={
                 409: "the audit is not failed or cancelled (queued, running or succeeded): nothing to resume",
                 503: "the task broker is unavailable; the audit was left as it was (failed or cancelled)"}))
def retry(request: Request, audit_id: str, owner: OwnerDep, session: SessionDep) -> AuditStatus:
    """Resume a failed or cancelled audit where it stopped (e.g. after a full disk was freed):
    every finished shard is kept, the stage's unfinished tasks are sent again. Answers the
    audit's status, queued or running again."""
    audit = _owned(session, owner, audit_id)
    session.commit()  # the resume writes in its own transaction; end this one's read first
    try:
        request.app.state.dispatcher.resume(audit.id)
    except NotResumable as exc:
        raise HTTPException(409, str(exc)) from None
    except DispatchFailed as exc:  # the broker refused: resume_audit put the audit back as it was
        raise Unavailable("the task broker is unavailable; the audit was not resumed: "
                          f"retry in {RETRY_AFTER_S} seconds") from exc
    session.refresh(audit)
    return _status(request, session, audit)


@router.delete("/{audit_id}", status_code=204, responses=errors(404))
def delete(audit_id: str, owner: OwnerDep, session: SessionDep, settings: SettingsDep) -> Response:
    """Removes the audit's rows and its folder (gradients, curvature, scores)."""
    audit = _owned(session, owner, audit_id)
    repository.cancel_audit(session, audit)
    repository.delete_audit(session, audit, settings.store_url)
    return Response(status_code=204)


# ------------------------------------------------------------------ helpers

async def _manifest_body(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"manifest larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():  # counted as it arrives: a missing length cannot bypass the limit
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(413, f"manifest larger than {limit} bytes")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await _form_from(request, bytes(body))
        except StarletteHTTPException as exc:  # malformed multipart: the manifest's fault, named as such
            raise ConfigError("manifest", f"multipart body cannot be parsed ({exc.detail})") from None
        upload = form.get("manifest")
        if upload is None or isinstance(upload, str):
            raise ConfigError("manifest", "multipart body needs a file field named 'manifest'")
        body = bytearray(await upload.read())
    try:
        return json.loads(bytes(body).decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError("manifest", f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError("manifest", "nested too deeply") from None


async def _form_from(request: Request, body: bytes):
    """Parse a multipart body already read (and size-checked) from the stream."""
    from starlette.requests import Request as StarletteRequest

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    return await StarletteRequest(request.scope, receive).form()


def is_id(value: str) -> bool:
    """Audit and trace ids are UUIDs; anything else (a NUL, which Postgres refuses, included)
    names no audit and never reaches the database."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _owned(session: Session, owner: str, audit_id: str) -> Audit:
    audit = repository.get_audit(session, owner, audit_id) if is_id(audit_id) else None
    if audit is None:
        raise HTTPException(404, "no such audit")
    return audit


def _owned_child(session: Session, owner: str, audit_id: str, child_id: str, get, what: str):
    """A trace or edit of an owned audit by id (`get(session, audit, id)`), else 404 naming `what`:
    another owner's, a missing one and a malformed id all look the same."""
    audit = _owned(session, owner, audit_id)
    child = get(session, audit, child_id) if is_id(child_id) else None
    if child is None:
        raise HTTPException(404, f"no such {what}")
    return child


def _status(request: Request, session: Session, audit: Audit) -> AuditStatus:
    progress = repository.progress(session, audit, request.app.state.settings.stall_threshold())
    status = "stalled" if progress["stall_reason"] else audit.status
    return AuditStatus(id=audit.id, status=status, stage=audit.stage, shards_done=progress["shards_done"],
                       shards_total=progress["shards_total"], pairs_total=audit.pairs_total,
                       pairs_rejected=audit.pairs_rejected, curvature_shift=audit.curvature_shift, created_at=audit.created_at,
                       started_at=audit.started_at, finished_at=audit.finished_at,
                       eta_seconds=progress["eta_seconds"], stall_reason=progress["stall_reason"], error=_redacted(request, audit.error),
                       results_url=str(request.url_for("audit_results", audit_id=audit.id)),
                       rejected_url=str(request.url_for("audit_rejected", audit_id=audit.id)),
                       summary=audit.summary)


def _redacted(request: Request, value):
    """A failure message or a stored record as a client may read it: no store or data-root paths
    in any string of it (services.api.redact)."""
    return map_leaves(value, str, request.app.state.redact)


def dispatch_or_fail(session: Session, row, send, what: str) -> None:
    """Send a new trace's or edit's task; when the broker refuses, the row is failed (so the
    reconciler never runs it behind the client's back) and the answer is 503 + Retry-After."""
    try:
        send(row.id)
    except Exception as exc:  # noqa: BLE001 - whatever the broker client raises, nothing was queued
        row.status, row.error, row.finished_at = "failed", "could not queue the task: the broker is unavailable", utcnow()
        session.commit()
        raise Unavailable(f"the task broker is unavailable; the {what} was not queued (it is recorded as failed): "
                          f"retry the request in {RETRY_AFTER_S} seconds") from exc


def _csv(lines, filename: str) -> StreamingResponse:
    """The header and the first page are read now, in the route: a database that is down is a 503
    before any byte is sent (later pages can only cut the stream short)."""
    lines = iter(lines)
    first = list(islice(lines, 2))
    return StreamingResponse(chain(first, lines), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})
