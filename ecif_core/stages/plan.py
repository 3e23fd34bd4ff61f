"""What prepare decided (the Plan) and the audit folder's readers every later stage shares."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


from ecif_core.data.images import ImageAccess
from ecif_core.data.sources import Pair
from ecif_core.data.folder import AuditFolder
from ecif_core.data.manifest import Manifest
from ecif_core.data.remote import remote_images_of
from ecif_core.data import storage
from ecif_core.data.confine import data_roots
from ecif_core.data.store import AuditStore





@dataclass
class Plan:
    """What prepare decided; everything later stages need besides the arrays."""

    manifest: dict
    batch_size: int
    n_batches: int
    shard_batches: int
    shards: int
    dim: int
    pairs_total: int
    pairs_rejected: int
    blocks: list[dict] = field(default_factory=list)
    shard_offsets: list[int] = field(default_factory=list)  # byte offset of each shard's first line in pairs.jsonl
    image_roots: list[str] | None = None  # images must lie under these (the service's data roots)
    allow_hard_links: bool = False  # the roots' policy (confine.Roots): files with several names may be read
    pairs_usable: int | None = None  # pairs that are in a training batch (scored); None in plans made before it
    # host:port keys whose http(s) images may be on non-public addresses (remote.private_opt_ins);
    # every stage that fetches reads them here. Plans made before it: none.
    private_image_hosts: list[str] = field(default_factory=list)

    @property
    def shard_rows(self) -> int:
        return self.shard_batches * self.batch_size

    def shard_batch_range(self, shard: int) -> range:
        return range(shard * self.shard_batches, min(self.n_batches, (shard + 1) * self.shard_batches))


def roots_of(plan: "Plan") -> list[Path] | None:
    return None if plan.image_roots is None else data_roots(plan.image_roots, plan.allow_hard_links)


def fetch_dir(audit_dir: str | Path) -> Path:
    """The audit's copies of its http(s) images (fetched once, by prepare)."""
    return AuditFolder(audit_dir).fetched


def image_access(plan: Plan, audit_dir: str | Path) -> ImageAccess:
    """Data roots and remote-image policy of this audit, for every stage that reads rows."""
    return ImageAccess(roots_of(plan), remote_images_of(plan.manifest.get("remote_images")), fetch_dir(audit_dir),
                       frozenset(plan.private_image_hosts))


def _plan_path(audit_dir: str | Path) -> Path:
    return AuditFolder(audit_dir).plan


def load_plan(audit_dir: str | Path) -> Plan:
    return Plan(**json.loads(storage.read_text(_plan_path(audit_dir))))


def open_store(audit_dir: str | Path) -> AuditStore:
    return AuditStore(AuditFolder(audit_dir).store)


def load_slots(audit_dir: str | Path, shard: int | None = None) -> list[tuple[int, Pair]]:
    """(row slot, pair) for every usable pair in slot order, or for one shard's pairs only
    (a seek to its recorded offset: a shard task never parses the whole list)."""
    plan = load_plan(audit_dir) if shard is not None else None
    out = []
    with AuditFolder(audit_dir).pairs.open("rb") as handle:
        if plan is not None:
            handle.seek(plan.shard_offsets[shard])
        for line in handle:
            row = json.loads(line)
            if plan is not None and row["slot"] >= (shard + 1) * plan.shard_rows:
                break
            out.append((row["slot"], Pair(row["id"], row["image"], row["caption"])))
    return out


def manifest_of(plan: Plan) -> Manifest:
    """The audit's manifest; a default theta (null) is written out as the parameters the audit was
    prepared with (plan.blocks), so an audit prepared before the default changed keeps its own theta."""
    manifest = Manifest.from_json(plan.manifest)
    if manifest.options.theta is None and plan.blocks:
        manifest.options.theta = [block["name"] for block in plan.blocks]
    return manifest
