"""Prepare stage: validate rows, fix the training partition, lay out slots and shards, and
preallocate the store."""
from __future__ import annotations

import csv
import json
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ecif_core import __version__
from ecif_core.data.batching import ids_digest, training_batches
from ecif_core.data.images import ImageAccess
from ecif_core.data.sources import Pair, RejectedRow, check_batchable, iter_pairs, leaving_ids, partition_id
from ecif_core.data.formats import read_pair_rows, source_of
from ecif_core.errors import ConfigError
from ecif_core.progress import Progress, throttled
from ecif_core.data.folder import AuditFolder
from ecif_core.models.lora import inject_adapter
from ecif_core.data.manifest import Manifest, renamed_options
from ecif_core.models.factory import select_theta
from ecif_core.models.features import kept_feature_dims
from ecif_core.influence.projection import Projector
from ecif_core.data.remote import private_opt_ins, remote_images_of
from ecif_core.data import storage



from ecif_core.models.cache import model_files
from ecif_core.stages.plan import Plan, fetch_dir, load_plan, open_store


def _first_difference(new: object, old: object, prefix: str = "") -> str | None:
    """Dotted path of the first differing key between two JSON values."""
    if isinstance(new, dict) and isinstance(old, dict):
        for key in sorted(set(new) | set(old)):
            found = _first_difference(new.get(key), old.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if new == old else prefix.rstrip(".")


def prepare(manifest: Manifest, audit_dir: str | Path, image_roots: list[Path] | None = None,
            operator_hosts: Sequence[str] | None = None, *, progress: Progress | None = None) -> Plan:
    """Validate rows, fix the partition, lay out slots and shards, preallocate the store.

    `image_roots`: when given, images whose real path is outside them are rejected rows.
    `operator_hosts`: the service's ECIF_REMOTE_IMAGE_HOSTS; only its host:port entries open
    non-public addresses to http(s) images. None (the embedded mode: no operator, the user
    runs the audit on their own machine): the manifest's own host:port entries do.
    `progress`: ("row", rows read, rows in the file) as the rows are checked (their images decoded).
    """
    folder = AuditFolder(audit_dir)
    storage.make_folder(folder.path)
    if folder.plan.exists():
        plan = load_plan(audit_dir)
        stored = {**plan.manifest, "options": renamed_options(plan.manifest.get("options") or {})}  # old names
        changed = _first_difference(json.loads(json.dumps(manifest.to_json())), stored)
        if changed:
            raise ConfigError(changed, f"differs from the audit already in {folder.path}; use a new --out folder")
        return plan
    o = manifest.options
    remote = remote_images_of(manifest.remote_images)
    opened = private_opt_ins(remote.allowed_hosts if remote else ())  # the manifest's host:port entries...
    if operator_hosts is not None:
        opened &= private_opt_ins(operator_hosts)  # ...that the operator lists too
    access = ImageAccess(image_roots, remote, fetch_dir(audit_dir), opened)
    with _PairIndex() as index:
        rows = iter_pairs(manifest.train, access=access)
        rejected, all_ids = index.fill(rows if progress is None else _counted(rows, manifest, image_roots, progress))
        # every data row of the source, readable or not: pairs_total - pairs_rejected = pairs scored
        pairs_total = index.readable + sum(1 for r in rejected if partition_id(r) is None)
        if pairs_total == 0:
            check_batchable("train", 0, 0, [])  # an empty file, said before anything else
        if manifest.ids_digest and ids_digest(all_ids) != manifest.ids_digest:
            raise ConfigError("train", "its ids differ from the ones the model was trained on (training sidecar); "
                              "the audit could not reproduce the training batches")
        excluded = set(manifest.excluded) & set(all_ids)
        rejected += [RejectedRow(0, i, "excluded from training (ecif train --exclude)") for i in sorted(excluded)]
        # Rejected and excluded rows leave their batches, exactly as in training and in the
        # leave-out objective; every other batch stays as it was (batching.training_batches).
        batches, alone = training_batches(all_ids, o.batch_size, o.seed, drop=leaving_ids(rejected))
        del all_ids[:]  # only their count is needed from here on
        if not batches:
            check_batchable("train", pairs_total, len(alone), [r.reason for r in rejected], batched=False)
        rejected += [RejectedRow(0, i, "alone in its batch after removals: no in-batch negatives, not trained on")
                     for i in alone]
        shard_offsets = []
        with storage.open_for_write(folder.pairs, "wb") as handle:
            for b, batch in enumerate(batches):
                if b % o.shard_batches == 0:
                    shard_offsets.append(handle.tell())
                for position, p in enumerate(index.lookup(batch)):
                    handle.write(json.dumps({"slot": b * o.batch_size + position, "batch": b, "id": p.id,
                                             "image": p.image, "caption": p.caption}).encode() + b"\n")
    with storage.open_for_write(folder.rejected, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "id", "reason"])
        writer.writerows([(r.row, r.id, r.reason) for r in rejected])
    projector, feature_dims = model_shape(manifest, image_roots)
    shards = -(-len(batches) // o.shard_batches)
    plan = Plan(manifest=json.loads(json.dumps(manifest.to_json())), batch_size=o.batch_size,
                n_batches=len(batches), shard_batches=o.shard_batches, shards=shards, dim=projector.dim,
                pairs_total=pairs_total, pairs_rejected=len(rejected), blocks=[b.__dict__ for b in projector.blocks],
                shard_offsets=shard_offsets,
                image_roots=None if image_roots is None else [str(r) for r in image_roots],
                allow_hard_links=bool(getattr(image_roots, "allow_hard_links", False)),
                pairs_usable=sum(len(b) for b in batches), private_image_hosts=sorted(opened))
    open_store(audit_dir).create(rows=shards * plan.shard_rows, dim=plan.dim, shard_rows=plan.shard_rows,
                                 shards=shards, attrs={"versions": _library_versions(), "manifest": plan.manifest},
                                 feature_dims=feature_dims)
    storage.write_text(folder.plan, json.dumps(plan.__dict__, indent=1))  # last: prepare is done
    return plan


def _counted(items: Iterator["Pair | RejectedRow"], manifest: Manifest, roots: list[Path] | None,
             progress: Progress) -> Iterator["Pair | RejectedRow"]:
    """`items` (one per row of the source), reporting rows read of the source's rows. The total is a
    first pass over the file's rows without their images (cheap next to decoding every image);
    None for webdataset shards, whose rows are read only with their images."""
    source = source_of(manifest.train, "train")
    total = None if source.format == "webdataset" else sum(1 for _ in read_pair_rows(source, "train", roots))
    report = throttled(progress)
    report("row", 0, total)
    done = 0
    for item in items:
        yield item
        done += 1
        report("row", done, total)
    progress("row", done, done)  # the last count, also when the throttle held it back


class _PairIndex:
    """Usable pairs of the training source on this machine's disk (SQLite, a temporary file, also
    when the audit folder is in a bucket), so prepare can write them in slot order without
    holding the dataset in memory; removed when prepare ends."""

    def __init__(self) -> None:
        handle, name = tempfile.mkstemp(prefix="ecif-prepare-", suffix=".sqlite")
        os.close(handle)
        self.path, self.readable = Path(name), 0
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE pairs (id TEXT PRIMARY KEY, image TEXT, caption TEXT)")

    def __enter__(self) -> "_PairIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)

    def fill(self, items: Iterator["Pair | RejectedRow"]) -> tuple[list[RejectedRow], list[str]]:
        """Store usable pairs; return the rejected rows and the ids of every readable row."""
        rejected, ids, chunk = [], [], []
        for item in items:
            if isinstance(item, Pair):
                chunk.append((item.id, item.image, item.caption))
                if len(chunk) >= 10_000:
                    self.db.executemany("INSERT INTO pairs VALUES (?, ?, ?)", chunk)
                    chunk = []
            else:
                rejected.append(item)
            if (pair_id := partition_id(item)) is not None:
                ids.append(pair_id)
        self.db.executemany("INSERT INTO pairs VALUES (?, ?, ?)", chunk)
        self.readable = len(ids)
        return rejected, ids

    def lookup(self, ids: list[str]) -> list[Pair]:
        """The pairs of `ids`, in that order."""
        marks = ",".join("?" * len(ids))
        found = {r[0]: Pair(*r) for r in self.db.execute(f"SELECT id, image, caption FROM pairs WHERE id IN ({marks})", ids)}
        return [found[i] for i in ids]


def _library_versions() -> dict[str, str]:
    import open_clip
    import zarr

    return {"ecif_core": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__}


def model_shape(manifest: Manifest, roots: Sequence[Path] | None = None) -> tuple[Projector, tuple[int, int] | None]:
    """The projector's layout, and the widths of the towers' features the store keeps (None unless theta
    lies within the projections, and never for a LoRA audit: models.features.kept_feature_dims), from parameter shapes alone (meta
    device: no weights loaded); the config and adapter files are confined to `roots` when read."""
    from ecif_core.models.factory import build_model, resolve_model_config

    files = model_files(manifest, roots)
    with torch.device("meta"):
        model = build_model(resolve_model_config(manifest.model_arch, files.config))
        if files.adapter is not None:
            model = inject_adapter(model, files.adapter)
    theta = select_theta(model, manifest.options.theta)
    widths = kept_feature_dims(model, manifest.options.theta, files.adapter is not None)
    return Projector.for_theta(theta, manifest.options.projection_spec()), widths
