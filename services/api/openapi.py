"""OpenAPI text the routes cannot derive themselves: the manifest body of POST /audits.

The route reads its body by hand (JSON or a multipart upload, counted against the size limit
as it arrives), so FastAPI sees no body model; this schema documents it (README, "Auditing
your own model", is the reference; the server validates every field and answers 422).
"""
from __future__ import annotations

from ecif_core.ranking import RANK_BY, SUSPICION_SIGN

_PATH = {"type": "string", "minLength": 1, "description": "relative to the first data root, or absolute under a root"}
_SOURCE = {"oneOf": [_PATH, {
    "type": "object", "required": ["path"], "additionalProperties": False,
    "properties": {"path": {"oneOf": [_PATH, {"type": "array", "items": _PATH, "minItems": 1}]},
                   "format": {"enum": ["jsonl", "csv", "parquet", "webdataset"]},
                   "image_key": {"type": "string", "minLength": 1}, "caption_key": {"type": "string", "minLength": 1},
                   "id_key": {"type": "string", "minLength": 1}, "separator": {"type": "string", "minLength": 1}}}]}
_OPTIONS = {
    "type": "object", "additionalProperties": False,
    "description": "left out: the checkpoint's training sidecar, then the defaults (README, options table)",
    "properties": {
        "batch_size": {"type": "integer", "minimum": 2, "maximum": 65536},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "neg_term": {"enum": ["exact", "first_order", "paper"]},
        "damping": {"type": ["number", "null"], "minimum": 0, "maximum": 1e12},
        "damping_per_mean_eigenvalue": {"type": "number", "minimum": 0, "maximum": 1e12,
                                        "description": "lambda = this x the mean eigenvalue (when damping is null)"},
        "damping_factor": {"type": "number", "minimum": 0, "maximum": 1e12, "deprecated": True,
                           "description": "the old name of damping_per_mean_eigenvalue"},
        "weight_decay": {"type": "number", "minimum": 0, "maximum": 1e12},
        "projection": {"type": ["object", "null"], "additionalProperties": False, "properties": {
            "k_in": {"type": ["integer", "null"], "minimum": 1, "maximum": 1024},
            "k_out": {"type": ["integer", "null"], "minimum": 1, "maximum": 1024},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}}},
        "theta": {"type": ["array", "null"], "items": {"type": "string", "minLength": 1, "maxLength": 512},
                  "minItems": 1, "maxItems": 256,
                  "description": "fnmatch patterns on parameter names; \"blocks:N\" = the last N residual blocks of "
                                 "each tower plus the projections; null = the two final projections (a LoRA "
                                 "fine-tune: its adapters)"},
        "curvature": {"enum": ["full", "blocks"]},
        "rank_by": {"enum": list(RANK_BY)},
        "partitions": {"type": "integer", "minimum": 1, "maximum": 64},
        "shard_batches": {"type": "integer", "minimum": 1, "maximum": 100000},
        "chunk": {"type": "integer", "minimum": 1, "maximum": 65536},
        "flag_precision": {"type": "number", "minimum": 0.5, "maximum": 0.999,
                           "description": "`suspected` = the most likely misaligned pairs while their estimated "
                                          "precision stays at least this"},
        "memory_limit": {"type": ["integer", "string", "null"], "description": "bytes or a size such as \"8GB\""},
        "partners": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535,
                     "description": "keep each pair's top-m in-batch partners only (an approximation, off when "
                                    "null; ranked.csv's dropped_partner_mass says what it dropped)"}}}
MANIFEST_SCHEMA = {
    "type": "object", "required": ["model", "train"], "additionalProperties": False,
    "properties": {
        "model": {"type": "object", "required": ["checkpoint"], "additionalProperties": False, "properties": {
            "arch": {"type": "string", "description": "an open_clip architecture name (never a hub name)"},
            "config": {"oneOf": [_PATH, {"type": "object"}]}, "checkpoint": _PATH, "adapter": _PATH}},
        "reference": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["checkpoint"], "additionalProperties": False,
            "description": "the model before fine-tuning (default: the training sidecar's base checkpoint)",
            "properties": {"arch": {"type": "string"}, "config": {"oneOf": [_PATH, {"type": "object"}]},
                           "checkpoint": _PATH, "adapter": _PATH}}]},
        "train": _SOURCE, "validation": {"oneOf": [_SOURCE, {"type": "null"}]}, "options": {"oneOf": [_OPTIONS, {"type": "null"}]},
        "remote_images": {"type": "object", "properties": {
            "allowed_hosts": {"type": "array", "items": {"type": "string"}, "description":
                              "`host` (http on 80, https on 443 only) or `host:port`; each must be in the "
                              "server's ECIF_REMOTE_IMAGE_HOSTS"},
            "timeout_s": {"type": "number", "exclusiveMinimum": 0}, "max_bytes": {"type": "integer", "minimum": 1}}}},
}
MANIFEST_BODY = {
    "required": True,
    "description": "the manifest, as JSON or as a multipart upload in the field `manifest`",
    "content": {
        "application/json": {"schema": MANIFEST_SCHEMA},
        "multipart/form-data": {"schema": {"type": "object", "required": ["manifest"], "properties": {
            "manifest": {"type": "string", "format": "binary"}}}},
    },
}


# ------------------------------------------------------------------ removal specs

REMOVAL_SPEC_FORMAT = "removal-spec"   # a name, not a regex: the grammar is below, the server checks it
REMOVAL_SPEC = {
    "format": REMOVAL_SPEC_FORMAT,
    "description": "which pairs: `suspected` | `estimated` (as many top-ranked pairs as the audit estimates are "
                   "misaligned) | `top:Q:COLUMN` | `bottom:Q:COLUMN` | `random:Q[:SEED]`; "
                   "Q is a fraction in (0, 1] when it has a decimal point, else a count >= 1; COLUMN one of "
                   f"{', '.join(sorted(SUSPICION_SIGN))}; SEED an integer >= 0 (README, \"Removing pairs\"). "
                   "Anything else is a 422 naming the field (`remove` or `demote`).",
    "examples": ["suspected", "estimated", "top:0.05:self_influence", "bottom:100:influence", "random:0.05:7"],
}


# ------------------------------------------------------------------ links
# OpenAPI links: which response carries the id another operation takes, so a client (and
# schemathesis' stateful phase) can chain calls on real audits, traces and edits.

def _ref(path: str, method: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


_AUDIT = "/audits/{audit_id}"
_AUDIT_READS = {"GetAudit": (_AUDIT, "get"), "GetResults": (_AUDIT + "/results.csv", "get"),
                "GetReport": (_AUDIT + "/report", "get"), "GetRejected": (_AUDIT + "/rejected.csv", "get"),
                "PreviewRemoval": (_AUDIT + "/preview", "get"), "CreateEdit": (_AUDIT + "/edits", "post"),
                "CreateTrace": (_AUDIT + "/traces", "post")}
_AUDIT_CHANGES = {"CancelAudit": (_AUDIT + "/cancel", "post"), "RetryAudit": (_AUDIT + "/retry", "post"),
                  "DeleteAudit": (_AUDIT, "delete")}


def _links(targets: dict[str, tuple[str, str]], parameters: dict[str, str]) -> dict:
    return {name: {"operationRef": _ref(path, method),
                   "parameters": {k: v for k, v in parameters.items() if "{" + k + "}" in path}}
            for name, (path, method) in targets.items()}


def audit_links(expression: str, changes: bool = True, status: bool = True) -> dict:
    """Links from a response naming an audit (`expression`) to what takes its id. `changes=False`
    leaves out cancel, retry and delete: only the audit POST /audits has just created is the chain's to
    throw away (a listed or polled one is finished or running work); `status=False`, from the status itself."""
    reads = {name: target for name, target in _AUDIT_READS.items() if status or name != "GetAudit"}
    return _links({**reads, **(_AUDIT_CHANGES if changes else {})}, {"audit_id": expression})


def trace_links(expression: str, status: bool = True) -> dict:
    """Links from a response naming a trace of the request's audit; `status=False` from the status itself."""
    trace = _AUDIT + "/traces/{trace_id}"
    return _links({**({"GetTrace": (trace, "get")} if status else {}), "GetTraceCsv": (trace + ".csv", "get"),
                   "GetTraceReport": (trace + "/report", "get")},
                  {"audit_id": "$request.path.audit_id", "trace_id": expression})


def edit_links(expression: str, status: bool = True) -> dict:
    """Links from a response naming an edit of the request's audit; `status=False` from the status itself."""
    edit = _AUDIT + "/edits/{edit_id}"
    return _links({**({"GetEdit": (edit, "get")} if status else {}), "GetEditCheckpoint": (edit + "/checkpoint", "get")},
                  {"audit_id": "$request.path.audit_id", "edit_id": expression})
