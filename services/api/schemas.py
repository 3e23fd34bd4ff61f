"""Response bodies of the API (OpenAPI at /docs)."""
from __future__ import annotations

from datetime import datetime

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ecif_core.edit.settings import EDIT_SETTINGS, METHODS, SettingSpec
from ecif_core.data.manifest import MAX_PATTERN_CHARS
from ecif_core.stages.table import SHARDED, STAGE_NAMES

from .openapi import REMOVAL_SPEC

ERROR_DESCRIPTIONS = {
    401: "missing or invalid API key (`Authorization: Bearer <key>`)",
    404: "no such audit or trace (another owner's is answered the same)",
    409: "not finished yet (results, reports and traces exist once the audit has succeeded)",
    413: "manifest larger than ECIF_MAX_MANIFEST_BYTES",
    422: "invalid manifest, request or query; `field` names the offending field",
    503: "the database or the task broker is unavailable; retry after `Retry-After` seconds "
         "(a submission was not queued)",
}


# Every error answer: `detail` (a message, or FastAPI's list of {loc, msg, type}) and, for an
# invalid manifest or request, `field` naming the offending field.
_ERROR_SCHEMA = {"type": "object", "required": ["detail"], "title": "ErrorResponse",
                 "properties": {"detail": {"description": "a message, or a list of {loc, msg, type}"},
                                "field": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def errors(*codes: int, described: dict[int, str] | None = None) -> dict[int, dict]:
    """OpenAPI `responses` entries for these error codes: always JSON (a `model` would be
    documented in the route's own media type, text/html for the report pages); `described`
    replaces the common description of a code where a route means something narrower."""
    text = ERROR_DESCRIPTIONS | (described or {})
    return {code: {"description": text[code], "content": {"application/json": {"schema": _ERROR_SCHEMA}},
                   **({"headers": _RETRY_AFTER} if code == 503 else {})}
            for code in codes}


class AuditCreated(BaseModel):
    id: str
    status_url: str


class AuditStatus(BaseModel):
    id: str
    status: str                 # queued | running | stalled | succeeded | failed | cancelled
    stage: Annotated[str, Field(json_schema_extra={"enum": list(STAGE_NAMES)},
                                description="the stage the audit is at, in the stage table's order")]
    shards_done: Annotated[int, Field(description="shards finished in the current sharded stage, or the last one "
                                                  f"passed ({', then '.join(SHARDED)})")]
    shards_total: int
    pairs_total: int | None
    pairs_rejected: int | None
    curvature_shift: float | None  # delta + lambda (weight decay + damping) the scores were computed with
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    eta_seconds: float | None   # null while stalled
    stall_reason: str | None = None  # why the audit is stalled (no task beating or queued for ECIF_STALL_AFTER s)
    error: str | None
    results_url: str
    rejected_url: str
    summary: Annotated[dict | None, Field(description=(
        "how many pairs are misaligned and how far to trust the flag (the audit folder's summary.json): "
        "estimable, reason, method, estimated_misaligned_fraction, interval, flag_target_precision, flagged, "
        "estimated_flag_precision, estimated_flag_recall; null until the audit finished"))] = None


class AuditPage(BaseModel):
    items: list[AuditStatus]
    total: int
    limit: int
    offset: int


class TraceRequest(BaseModel):
    """Test examples: {"image": path, "caption": text} or {"image": path, "prompts": [...], "label": i}."""

    model_config = ConfigDict(extra="forbid")

    tests: list[dict]
    k: int = Field(20, strict=True)


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
    results: list[dict]         # per test example: example, test_loss, prediction (index, text, probability,
                                # correct; null for traces stored before migration 0007), top (rank: harmful first; id,
                                # image, caption, relative_is, influence, influence_pos, influence_neg,
                                # signed_relative_is, suspected)
    csv_url: str


class _EditRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    remove: Annotated[str, Field(max_length=200, json_schema_extra=REMOVAL_SPEC)] | None = None  # the grammar: REMOVAL_SPEC
    demote: Annotated[str, Field(max_length=200, json_schema_extra=REMOVAL_SPEC)] | None = None  # same grammar
    ids: list[Annotated[str, Field(max_length=4096)]] | None = None  # or the pairs' ids
    action: Annotated[Literal["remove", "demote"] | None, Field(
        description="what to do with `ids` (default remove); with `remove` or `demote` it may only repeat that "
                    "field's name")] = None
    method: Annotated[Literal[METHODS] | None, Field(
        description="how the edit is found: replay (the default; the difference of two short runs of the training "
                    "recipe from the model, with and without the set) or newton (one damped Newton step)")] = None
    keep: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        None, description="ids reviewed and kept: taken out of the set whatever selects it (the result's "
                          "`kept_back` counts them)")
    theta: list[Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS)]] | None = None  # fnmatch
    # patterns on the audited model's parameter names, checked at submit
    zero_shot: list[dict] | None = None  # [{"image": path, "prompts": [...], "label": i}]: accuracy before / after


def _bounds(spec: SettingSpec) -> dict:
    """Pydantic's bounds of one setting (and no NaN or infinity for a float)."""
    bounds = {"gt" if spec.low_open else "ge": spec.low, "lt" if spec.high_open else "le": spec.high}
    return {**bounds, **({"allow_inf_nan": False} if spec.kind is float else {})}


def setting_field(spec: SettingSpec) -> tuple[object, object]:
    """(annotation, Field) of one edit setting from its row of EDIT_SETTINGS: default, bounds and
    meaning documented in OpenAPI; strict (no "3" or true for a number), finite."""
    annotation = spec.kind | None if spec.nullable else spec.kind
    return annotation, Field(spec.default, description=spec.meaning, strict=True, **_bounds(spec))


def old_setting_field(spec: SettingSpec) -> tuple[object, object]:
    """The field of a setting's old name (SettingSpec.old_name): its bounds, no default, deprecated in OpenAPI."""
    return spec.kind | None, Field(None, description=f"deprecated: the old name of {spec.name}", deprecated=True,
                                   strict=True, **_bounds(spec))


# Which pairs to remove (a spec, or the ids themselves) and how to solve for the edit (EDIT_SETTINGS).
EditRequest = create_model("EditRequest", __base__=_EditRequestBase,
                           __doc__="Which pairs to remove (`remove`, a spec, or `ids`) or demote (`demote`, or `ids` with "
                                   "`action` demote), which to keep, and how to solve for the edit.",
                           **{spec.name: setting_field(spec) for spec in EDIT_SETTINGS},
                           **{spec.old_name: old_setting_field(spec) for spec in EDIT_SETTINGS if spec.old_name})


class EditCreated(BaseModel):
    edit_id: str
    status_url: str


class EditStatus(BaseModel):
    id: str
    audit_id: str
    status: str                 # queued | running | succeeded | failed
    request: dict
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    result: dict | None         # the edit record: removal set, method, CG result, validation loss before/after
    checkpoint_url: str
