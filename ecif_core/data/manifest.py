"""The audit manifest: what to audit and how, resolved and validated in one place.

{"model": {"config": "cfg.json" | "arch": "ViT-B-32", "checkpoint": "model.pt"},
 "train": "train.jsonl", "validation": "val.jsonl" (optional), "options": {...}}
Relative paths resolve against the manifest's folder; options left out come from the
checkpoint's sidecar (written by ecif_core.train), then from the defaults below.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from ecif_core.data.shards import MAX_SHARDS, shard_paths
from ecif_core.data.formats import source_of
from ecif_core.data.storage import read_json_file
from ecif_core.errors import ConfigError
from ecif_core.values import check_json_values
from ecif_core.data.storage import absolute, location, resolve_against
from ecif_core.data.remote import remote_images_of
from ecif_core.influence.losses import NEG_TERMS
from ecif_core.influence.memory import parse_bytes
from ecif_core.influence.projection import ProjectionSpec
from ecif_core.ranking import DEFAULT_FLAG_PRECISION, DEFAULT_RANK_BY, RANK_BY, REFERENCE, VALIDATION, needs_of

SIDECAR_SUFFIX = ".json"
# Fields holding paths: a source object keeps its path under "path" (for webdataset, a list of shards).
PATH_KEYS = (("train",), ("train", "path"), ("validation",), ("validation", "path"), ("model", "checkpoint"),
             ("model", "config"), ("model", "adapter"), ("reference", "checkpoint"), ("reference", "config"),
             ("reference", "adapter"))
CURVATURE_KINDS = ("full", "blocks")
# Upper bounds (README, options table): each bounds the memory or time one request can ask for.
BOUNDS: dict[str, tuple[float, float]] = {
    "batch_size": (2, 65536), "seed": (0, 2**63 - 1), "partitions": (1, 64), "shard_batches": (1, 100_000),
    "chunk": (1, 65536), "damping": (0, 1e12), "damping_per_mean_eigenvalue": (0, 1e12), "weight_decay": (0, 1e12),
    "flag_precision": (0.5, 0.999), "partners": (1, 65535)}
# Options renamed (CHANGELOG.md): old spelling -> name. A manifest may still give the old one (deprecated,
# with a warning); plans and database rows written before the rename are read with it.
RENAMED_OPTIONS = {"damping_factor": "damping_per_mean_eigenvalue"}
MAX_PROJECTION_K = 1024
MAX_THETA_PATTERNS, MAX_PATTERN_CHARS = 256, 512


@dataclass
class AuditOptions:
    batch_size: int = 32
    seed: int = 0
    neg_term: str = "exact"
    damping: float | None = None          # lambda; None = damping_per_mean_eigenvalue x mean eigenvalue
    damping_per_mean_eigenvalue: float = 0.1  # (the edit's lambda is per its own curvature: edit.settings)
    weight_decay: float = 0.0             # delta of the training objective
    projection: dict[str, Any] | None = field(default_factory=lambda: {"k_in": 8, "k_out": 8, "seed": 0})
    theta: list[str] | None = None        # fnmatch patterns; None = default_theta_patterns
    curvature: str = "full"
    rank_by: str = DEFAULT_RANK_BY
    flag_precision: float = DEFAULT_FLAG_PRECISION  # `suspected`: estimated precision >= this (calibration.py)
    partitions: int = 1
    shard_batches: int = 8
    chunk: int = 64                       # cotangents per batched backward (memory bound)
    memory_limit: int | str | None = None  # bytes or "8GB": picks chunk and items per backward (memory.py)
    partners: int | None = None           # top-m in-batch partners per pair (an approximation); None = exact

    def projection_spec(self) -> ProjectionSpec:
        if self.projection is None:
            return ProjectionSpec(None, None, 0)
        return ProjectionSpec(self.projection.get("k_in"), self.projection.get("k_out"),
                              int(self.projection.get("seed", 0)))


@dataclass
class Manifest:
    train: str | dict                     # a pair file path, or a source object (data.Source)
    validation: str | dict | None
    model_arch: str | None
    model_config: str | dict | None
    checkpoint: str
    options: AuditOptions
    excluded: list[str] = field(default_factory=list)   # ids the model was trained without (sidecar)
    ids_digest: str | None = None                        # digest of the training id set (sidecar)
    remote_images: dict | None = None                    # the http(s) opt-in (remote.RemoteImages), or None
    adapter: str | None = None                           # a peft LoRA folder on top of the checkpoint
    reference: dict | None = None                        # {arch, config, checkpoint, adapter}: the reference model

    def to_json(self) -> dict[str, Any]:
        data = {"train": self.train, "validation": self.validation,
                "model": {"arch": self.model_arch, "config": self.model_config, "checkpoint": self.checkpoint},
                "options": asdict(self.options), "excluded": self.excluded, "ids_digest": self.ids_digest}
        if self.remote_images is not None:  # absent otherwise: plans written before the opt-in existed still match
            data["remote_images"] = self.remote_images
        if self.adapter is not None:
            data["model"]["adapter"] = self.adapter
        if self.reference is not None:  # absent otherwise: plans written before references existed still match
            data["reference"] = self.reference
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        """Inverse of to_json for a manifest that was already resolved and validated."""
        return cls(train=data["train"], validation=data["validation"], model_arch=data["model"]["arch"],
                   model_config=data["model"]["config"], checkpoint=data["model"]["checkpoint"],
                   options=AuditOptions(**renamed_options(data["options"])), excluded=list(data.get("excluded", [])),
                   ids_digest=data.get("ids_digest"), remote_images=data.get("remote_images"),
                   adapter=data["model"].get("adapter"), reference=data.get("reference"))


def manifest_paths(raw: Any) -> Iterator[tuple[str, str]]:
    """(field, path) for every path in a raw manifest, in PATH_KEYS order: each pair file,
    each shard of a webdataset list (named by the list's field), checkpoint, config, adapter.
    Values that are not non-empty strings are left to the manifest's own checks."""
    for name, holder, key in _path_slots(raw):
        yield name, holder[key]


def with_paths(raw: Any, change: Callable[[str, str], str]) -> dict:
    """A copy of a raw manifest with every path replaced by change(field, path)."""
    raw = copy.deepcopy(raw)
    for name, holder, key in _path_slots(raw):
        holder[key] = change(name, holder[key])
    return raw


def _path_slots(raw: Any) -> Iterator[tuple[str, dict | list, str | int]]:
    """(field, container, key) of every path string: the one walk over PATH_KEYS."""
    for keys in PATH_KEYS:
        holder = raw
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if not isinstance(holder, dict):
            continue
        value = holder.get(keys[-1])
        slots = ([(value, i, item) for i, item in enumerate(value)] if isinstance(value, list)
                 else [(holder, keys[-1], value)])
        for container, key, item in slots:
            if isinstance(item, str) and item:
                yield ".".join(keys), container, key


_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "batch_size": (int,), "seed": (int,), "neg_term": (str,), "damping": (int, float, type(None)),
    "damping_per_mean_eigenvalue": (int, float), "weight_decay": (int, float), "projection": (dict, type(None)),
    "theta": (list, type(None)), "curvature": (str,), "rank_by": (str,), "flag_precision": (int, float), "partitions": (int,),
    "shard_batches": (int,), "chunk": (int,), "memory_limit": (int, str, type(None)), "partners": (int, type(None)),
}


def read_sidecar(checkpoint: str | Path | None, adapter: str | Path | None = None) -> dict[str, Any]:
    """The training sidecar next to a checkpoint (inside the adapter folder for a LoRA
    fine-tune: that training is the one audited), or {} when there is none."""
    if adapter is not None:
        from ecif_core.models.lora import TRAINING_SIDECAR

        path = location(adapter) / TRAINING_SIDECAR
        return read_json_file(path, "model.adapter", "training sidecar") if path.is_file() else {}
    if checkpoint is None:
        return {}
    path = location(str(checkpoint) + SIDECAR_SUFFIX)
    return read_json_file(path, "model.checkpoint", "training sidecar") if path.is_file() else {}


def load_manifest(source: str | Path | dict, base_dir: str | Path | None = None,
                  max_shards: int = MAX_SHARDS) -> Manifest:
    """Parse, resolve paths, fill defaults from the sidecar, validate every option by name;
    a webdataset pattern may name at most `max_shards` shards (counted before expansion)."""
    if isinstance(source, (str, Path)):
        raw = read_json_file(source, "manifest")
        base = base_dir if base_dir else location(absolute(source)).parent
    else:
        raw, base = dict(source), base_dir or Path(".").resolve()
    if not isinstance(raw, dict):
        raise ConfigError("manifest", "must be a JSON object")
    check_json_values(raw, "")  # NUL, lone surrogates, Infinity / NaN anywhere: named, before use
    unknown = set(raw) - {"model", "train", "validation", "options", "remote_images", "reference"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown manifest field")
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError("model", "must be an object")
    unknown = set(model) - {"arch", "config", "checkpoint", "adapter"}
    if unknown:
        raise ConfigError(f"model.{sorted(unknown)[0]}", "unknown model field")

    raw = with_paths(raw, lambda _, path: resolve_against(base, path))
    model = raw.get("model") or {}

    def checked(value: Any, name: str, required: bool) -> str | None:
        """A path field's value (already made absolute by with_paths), checked for its type."""
        if value is None:
            if required:
                raise ConfigError(name, "is required")
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(name, "must be a path string")
        return value

    def checked_source(value: Any, name: str, required: bool) -> str | dict | None:
        """A path stays a path; a source object gets its path (each shard of a list) and its fields checked."""
        if not isinstance(value, dict):
            return checked(value, name, required)
        path = value.get("path")
        for item in path if isinstance(path, list) and path else [path]:
            checked(item, f"{name}.path", True)
        return source_of(value, name).to_json()

    checkpoint = checked(model.get("checkpoint"), "model.checkpoint", True)
    if not location(checkpoint, "model.checkpoint").is_file():
        raise ConfigError("model.checkpoint", f"file not found: {checkpoint}")
    adapter = checked(model.get("adapter"), "model.adapter", False)
    if adapter is not None:
        from ecif_core.models.lora import check_adapter_folder

        check_adapter_folder(adapter)
    sidecar = read_sidecar(checkpoint, adapter)
    if model.get("arch") is not None and model.get("config") is not None:
        raise ConfigError("model", "give model.arch or model.config, not both")
    if model.get("arch") is not None and not isinstance(model["arch"], str):
        raise ConfigError("model.arch", "must be a string")
    config = model.get("config")
    config = checked(config, "model.config", False) if isinstance(config, str) else config
    if isinstance(config, str) and not location(config, "model.config").is_file():
        raise ConfigError("model.config", f"file not found: {config}")
    if model.get("arch") is None and config is None:
        config = sidecar.get("model_config")
        if config is None:
            raise ConfigError("model", "give model.arch or model.config (no training sidecar found)")
    options = _parse_options({} if raw.get("options") is None else raw["options"], sidecar)
    train = checked_source(raw.get("train"), "train", True)
    validation = checked_source(raw.get("validation"), "validation", False)
    if VALIDATION in needs_of(options.rank_by) and validation is None:
        raise ConfigError("options.rank_by", f"{options.rank_by!r} needs a validation set")
    for name, source in (("train", train), ("validation", validation)):
        if source is None:
            continue
        parsed = source_of(source, name)
        if parsed.format == "webdataset":
            shard_paths(parsed.path, name, max_shards)  # every shard of the pattern must exist
        elif not location(parsed.path, name).is_file():
            raise ConfigError(name, f"file not found: {parsed.path}")
    remote = remote_images_of(raw.get("remote_images"))
    sidecar_dir = location(adapter) if adapter is not None else location(checkpoint).parent
    reference = _reference(raw, sidecar, sidecar_dir, config, model.get("arch"), checked)
    if REFERENCE in needs_of(options.rank_by) and reference is None:
        raise ConfigError("options.rank_by", f"{options.rank_by!r} needs a reference model (manifest field "
                          "reference, or a checkpoint fine-tuned with ecif train --init)")
    return Manifest(train=train, validation=validation,
                    model_arch=model.get("arch"), model_config=config, checkpoint=checkpoint, options=options,
                    excluded=list(sidecar.get("excluded", [])), ids_digest=sidecar.get("ids_digest"),
                    remote_images=remote.to_json() if remote else None, adapter=adapter, reference=reference)


def _reference(raw: dict[str, Any], sidecar: dict[str, Any], sidecar_dir: Path, config: Any, arch: str | None,
               resolve: Any) -> dict[str, Any] | None:
    """The reference model whose CLIP scores go next to the audit's (the model before fine-tuning).

    `"reference": {...}` has the shape of `model` (its architecture may differ from the audited
    one); left out, it is the checkpoint the audited model was fine-tuned from (the training
    sidecar's base_checkpoint) with the audited model's architecture, when that file still exists;
    `"reference": null` turns it off."""
    if "reference" in raw:
        given = raw["reference"]
        if given is None:
            return None
        if not isinstance(given, dict):
            raise ConfigError("reference", "must be an object like model, or null")
        unknown = set(given) - {"arch", "config", "checkpoint", "adapter"}
        if unknown:
            raise ConfigError(f"reference.{sorted(unknown)[0]}", "unknown reference field")
        if (given.get("arch") is None) == (given.get("config") is None):
            raise ConfigError("reference", "give reference.arch or reference.config (one of them)")
        if given.get("arch") is not None and not isinstance(given["arch"], str):
            raise ConfigError("reference.arch", "must be a string")
        checkpoint = resolve(given.get("checkpoint"), "reference.checkpoint", True)
        if not Path(checkpoint).is_file():
            raise ConfigError("reference.checkpoint", f"file not found: {checkpoint}")
        ref_config = given.get("config")
        if isinstance(ref_config, str):
            ref_config = resolve(ref_config, "reference.config", True)
            if not Path(ref_config).is_file():
                raise ConfigError("reference.config", f"file not found: {ref_config}")
        adapter = resolve(given.get("adapter"), "reference.adapter", False)
        if adapter is not None:
            from ecif_core.models.lora import check_adapter_folder

            check_adapter_folder(adapter)
        return {"arch": given.get("arch"), "config": ref_config, "checkpoint": checkpoint, "adapter": adapter}
    base = sidecar.get("base_checkpoint")
    if not isinstance(base, str) or not (sidecar_dir / base).is_file():  # relative to the sidecar (or absolute)
        return None
    return {"arch": arch, "config": config, "checkpoint": str((sidecar_dir / base).resolve()), "adapter": None}


def renamed_options(raw: dict[str, Any], deprecated: bool = False) -> dict[str, Any]:
    """`raw` with each old option name (RENAMED_OPTIONS) read as its new name; giving both is refused.
    `deprecated`: warn (a manifest a person wrote), not for stored plans and rows."""
    out = dict(raw)
    for old, new in RENAMED_OPTIONS.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"options.{old}", f"is the deprecated name of options.{new}; give only {new}")
        if deprecated:
            warnings.warn(f"options.{old} is deprecated and will be removed: write options.{new} (same value "
                          "and meaning)", FutureWarning, stacklevel=4)
        out[new] = out.pop(old)
    return out


def _parse_options(raw: dict[str, Any], sidecar: dict[str, Any]) -> AuditOptions:
    if not isinstance(raw, dict):
        raise ConfigError("options", "must be an object")
    raw = renamed_options(raw, deprecated=True)
    known = {f.name for f in fields(AuditOptions)}
    for name in raw:
        if name not in known:
            raise ConfigError(f"options.{name}", "unknown option")
    values = {k: sidecar[k] for k in ("batch_size", "seed", "weight_decay") if k in sidecar}
    for name in ("batch_size", "seed"):  # the audit must see the training partition
        if name in raw and name in sidecar and raw[name] != sidecar[name]:
            raise ConfigError(f"options.{name}", f"{raw[name]!r} differs from the training sidecar's "
                              f"{sidecar[name]!r}; the audit must use the partition the model was trained on")
    values.update(raw)
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, _OPTION_TYPES[name]):
            raise ConfigError(f"options.{name}", f"wrong type {type(value).__name__}")
    options = AuditOptions(**values)
    _check_option_values(options)
    return options


def _check_option_values(o: AuditOptions) -> None:
    for name, (low, high) in BOUNDS.items():
        value = getattr(o, name)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"options.{name}", f"must be between {low:g} and {high:g}")
    checks = [
        ("neg_term", o.neg_term in NEG_TERMS, f"must be one of {NEG_TERMS}"),
        ("curvature", o.curvature in CURVATURE_KINDS, f"must be one of {CURVATURE_KINDS}"),
        ("rank_by", o.rank_by in RANK_BY, f"must be one of {RANK_BY}"),
    ]
    for name, ok, message in checks:
        if not ok:
            raise ConfigError(f"options.{name}", message)
    if o.memory_limit is not None and (parse_bytes(o.memory_limit) or 0) <= 0:
        raise ConfigError("options.memory_limit", "must be a positive size")
    if o.theta is not None:
        if not o.theta or len(o.theta) > MAX_THETA_PATTERNS:
            raise ConfigError("options.theta", f"must be null or a list of 1 to {MAX_THETA_PATTERNS} patterns")
        for i, pattern in enumerate(o.theta):
            if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
                raise ConfigError(f"options.theta[{i}]", f"must be a pattern of 1 to {MAX_PATTERN_CHARS} characters")
    if o.projection is not None:
        unknown = set(o.projection) - {"k_in", "k_out", "seed"}
        if unknown:
            raise ConfigError(f"options.projection.{sorted(unknown)[0]}", "unknown projection option")
        for key in ("k_in", "k_out"):
            value = o.projection.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 1 <= value <= MAX_PROJECTION_K):
                raise ConfigError(f"options.projection.{key}", f"must be an integer from 1 to {MAX_PROJECTION_K}, or null")
        seed = o.projection.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2**63 - 1:
            raise ConfigError("options.projection.seed", "must be an integer from 0 to 2^63-1")
