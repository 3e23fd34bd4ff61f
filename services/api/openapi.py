"""OpenAPI text the routes cannot derive themselves: the manifest body of POST /audits.

The route reads its body by hand (JSON or a multipart upload, counted against the size limit
as it arrives), so FastAPI sees no body model; this schema documents it (README, "Auditing
your own model", is the reference; the server validates every field and answers 422).
"""
from __future__ import annotations

from ecif_core.scores import RANK_BY

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
        "damping_factor": {"type": "number", "minimum": 0, "maximum": 1e12},
        "weight_decay": {"type": "number", "minimum": 0, "maximum": 1e12},
        "projection": {"type": ["object", "null"], "additionalProperties": False, "properties": {
            "k_in": {"type": ["integer", "null"], "minimum": 1, "maximum": 1024},
            "k_out": {"type": ["integer", "null"], "minimum": 1, "maximum": 1024},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}}},
        "theta": {"type": ["array", "null"], "items": {"type": "string", "minLength": 1, "maxLength": 512},
                  "minItems": 1, "maxItems": 256},
        "curvature": {"enum": ["full", "blocks"]},
        "rank_by": {"enum": list(RANK_BY)},
        "partitions": {"type": "integer", "minimum": 1, "maximum": 64},
        "shard_batches": {"type": "integer", "minimum": 1, "maximum": 100000},
        "chunk": {"type": "integer", "minimum": 1, "maximum": 65536}}}
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
