"""The audit as stages: prepare -> gradients (per shard) -> curvature -> validation ->
scores (per shard) -> finalize. Each stage reads and writes the audit folder only, is
idempotent, and skips finished work, so the same functions run in-process (`run_audit`)
or as Celery tasks, in any process, after any crash.
"""
from __future__ import annotations

import csv
import json
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from . import __version__
from .confine import confined
from .batching import hash_seed, ids_digest, partition, rebatch_within, training_batches
from .images import ImageAccess, batch_tensors, load_batch, load_batch_images
from .sources import Pair, RejectedRow, check_batchable, iter_pairs, leaving_ids, partition_id, read_pairs
from .errors import ConfigError, InconsistentAudit, NotReady
from .folder import AuditFolder
from .evidence import CORRUPTIONS, corrupted_captions, separation
from .gradients import per_pair_gradients
from .hessian import DampedInverse, default_damping, eigendecompose, fisher_sum
from .lora import ADAPTER_WEIGHTS, inject_adapter
from .manifest import Manifest, load_manifest
from .memory import parse_bytes
from .models import LoadedModel, load_model, restrict_grad_to, select_theta
from .projection import Block, Projector
from .remote import private_opt_ins, remote_images_of
from .runtime import exact_float32, flush_denormals
from .ranked import RANKED_COLUMNS, csv_row
from .reference import reference_scores
from .scores import RANK_BY, SUSPECT_Z, misalignment_score, pair_scores, ranking
from .stages import BY_NAME, STAGES
from . import storage
from .confine import data_roots
from .store import GRADIENT_FIELDS, SCORE_FIELDS, TERM_FIELDS, AuditStore



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


class ModelCache:
    """One loaded model (with theta and projector) per checkpoint, reused across shards."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: tuple[LoadedModel, list, Projector] | None = None

    def get(self, manifest: Manifest, roots: list[Path] | None = None) -> tuple[LoadedModel, list, Projector]:
        """The model of `manifest`; with `roots`, its files are confined now (by real path),
        also when the cached copy is reused (a swapped file is refused, not served)."""
        files = model_files(manifest, roots)
        adapter_weights = None if files.adapter is None else os.path.join(files.adapter, ADAPTER_WEIGHTS)
        key = (manifest.model_arch, json.dumps(manifest.model_config, sort_keys=True), files.checkpoint,
               _file_identity(files.checkpoint), files.adapter, _file_identity(adapter_weights),
               json.dumps(manifest.options.theta), json.dumps(manifest.options.projection, sort_keys=True))
        if key != self._key:
            loaded = load_model(manifest.model_arch, files.config, files.checkpoint, adapter=files.adapter)
            exact_float32()
            loaded.model.to("cuda" if torch.cuda.is_available() else "cpu")
            theta = select_theta(loaded.model, manifest.options.theta)
            restrict_grad_to(loaded.model, theta)
            projector = Projector.for_theta(theta, manifest.options.projection_spec())
            self._key, self._value = key, (loaded, [p for _, p in theta], projector)
        return self._value


class ReferenceCache:
    """The audit's reference model (no theta: forward passes only), reused across shards."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: LoadedModel | None = None

    def get(self, reference: dict, roots: list[Path] | None = None) -> LoadedModel:
        """The reference model; its files are confined to `roots` now, as the audited model's are."""
        files = confined_files(reference["checkpoint"], reference.get("config"), reference.get("adapter"), roots,
                               "reference")
        checkpoint, config, adapter = files.checkpoint, files.config, files.adapter
        adapter_weights = None if adapter is None else os.path.join(adapter, ADAPTER_WEIGHTS)
        key = (reference.get("arch"), json.dumps(config, sort_keys=True), checkpoint, _file_identity(checkpoint),
               adapter, _file_identity(adapter_weights))
        if key != self._key:
            loaded = load_model(reference.get("arch"), config, checkpoint, adapter=adapter)
            exact_float32()
            loaded.model.to("cuda" if torch.cuda.is_available() else "cpu")
            for parameter in loaded.model.parameters():
                parameter.requires_grad_(False)
            self._key, self._value = key, loaded
        return self._value


@dataclass(frozen=True)
class ModelFiles:
    """The real paths of a manifest's model files, checked against the data roots."""

    checkpoint: str
    config: str | dict | None
    adapter: str | None


def model_files(manifest: Manifest, roots: list[Path] | None) -> ModelFiles:
    """The audited model's files (see confined_files)."""
    return confined_files(manifest.checkpoint, manifest.model_config, manifest.adapter, roots, "model")


def confined_files(checkpoint: str, config: str | dict | None, adapter: str | None, roots: list[Path] | None,
                   field: str) -> ModelFiles:
    """Checkpoint, config file and adapter folder (and its two files) by real path, each
    confined to `roots` at this moment (None: no roots, as in the embedded mode); errors name
    `field` ("model" or "reference")."""
    checkpoint = str(confined(checkpoint, roots, f"{field}.checkpoint"))
    if isinstance(config, str):
        config = str(confined(config, roots, f"{field}.config"))
    if adapter is not None:
        from .lora import ADAPTER_CONFIG

        adapter = str(confined(adapter, roots, f"{field}.adapter"))
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            confined(os.path.join(adapter, name), roots, f"{field}.adapter")
    return ModelFiles(checkpoint, config, adapter)


def _roots_of(plan: "Plan") -> list[Path] | None:
    return None if plan.image_roots is None else data_roots(plan.image_roots, plan.allow_hard_links)


def _file_identity(path: str | None) -> tuple | None:
    """(mtime_ns, size), in a bucket (ETag, size): a checkpoint retrained in place must not be
    served from the cache."""
    if path is None:
        return None
    target = storage.location(path)
    return storage.identity(target) if target.exists() else None


# ---------------------------------------------------------------- folder helpers

def fetch_dir(audit_dir: str | Path) -> Path:
    """The audit's copies of its http(s) images (fetched once, by prepare)."""
    return AuditFolder(audit_dir).fetched


def image_access(plan: Plan, audit_dir: str | Path) -> ImageAccess:
    """Data roots and remote-image policy of this audit, for every stage that reads rows."""
    return ImageAccess(_roots_of(plan), remote_images_of(plan.manifest.get("remote_images")), fetch_dir(audit_dir),
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


def _manifest_of(plan: Plan) -> Manifest:
    return Manifest.from_json(plan.manifest)


def _first_difference(new: object, old: object, prefix: str = "") -> str | None:
    """Dotted path of the first differing key between two JSON values."""
    if isinstance(new, dict) and isinstance(old, dict):
        for key in sorted(set(new) | set(old)):
            found = _first_difference(new.get(key), old.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if new == old else prefix.rstrip(".")


# ---------------------------------------------------------------- stages

def prepare(manifest: Manifest, audit_dir: str | Path, image_roots: list[Path] | None = None,
            operator_hosts: Sequence[str] | None = None) -> Plan:
    """Validate rows, fix the partition, lay out slots and shards, preallocate the store.

    `image_roots`: when given, images whose real path is outside them are rejected rows.
    `operator_hosts`: the service's ECIF_REMOTE_IMAGE_HOSTS; only its host:port entries open
    non-public addresses to http(s) images. None (the embedded mode: no operator, the user
    runs the audit on their own machine): the manifest's own host:port entries do.
    """
    folder = AuditFolder(audit_dir)
    storage.make_folder(folder.path)
    if folder.plan.exists():
        plan = load_plan(audit_dir)
        changed = _first_difference(json.loads(json.dumps(manifest.to_json())), plan.manifest)
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
        rejected, all_ids = index.fill(iter_pairs(manifest.train, access=access))
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
    projector = _shape_projector(manifest, image_roots)
    shards = -(-len(batches) // o.shard_batches)
    plan = Plan(manifest=json.loads(json.dumps(manifest.to_json())), batch_size=o.batch_size,
                n_batches=len(batches), shard_batches=o.shard_batches, shards=shards, dim=projector.dim,
                pairs_total=pairs_total, pairs_rejected=len(rejected), blocks=[b.__dict__ for b in projector.blocks],
                shard_offsets=shard_offsets,
                image_roots=None if image_roots is None else [str(r) for r in image_roots],
                allow_hard_links=bool(getattr(image_roots, "allow_hard_links", False)),
                pairs_usable=sum(len(b) for b in batches), private_image_hosts=sorted(opened))
    open_store(audit_dir).create(rows=shards * plan.shard_rows, dim=plan.dim, shard_rows=plan.shard_rows,
                                 shards=shards, attrs={"versions": _library_versions(), "manifest": plan.manifest})
    storage.write_text(folder.plan, json.dumps(plan.__dict__, indent=1))  # last: prepare is done
    return plan


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


def _shape_projector(manifest: Manifest, roots: list[Path] | None = None) -> Projector:
    """The projector's layout from parameter shapes alone (meta device: no weights loaded);
    the config and adapter files are confined to `roots` when read."""
    from .models import build_model, resolve_model_config

    files = model_files(manifest, roots)
    with torch.device("meta"):
        model = build_model(resolve_model_config(manifest.model_arch, files.config))
        if files.adapter is not None:
            model = inject_adapter(model, files.adapter)
    return Projector.for_theta(select_theta(model, manifest.options.theta), manifest.options.projection_spec())


def _batches_of_shard(plan: Plan, slots: list[tuple[int, Pair]], shard: int) -> Iterator[list[tuple[int, Pair]]]:
    batch_of = {}
    for slot, pair in slots:
        batch_of.setdefault(slot // plan.batch_size, []).append((slot, pair))
    for b in plan.shard_batch_range(shard):
        if b in batch_of:
            yield batch_of[b]


def shard_gradients(audit_dir: str | Path, shard: int, models: ModelCache | None = None,
                    references: ReferenceCache | None = None) -> bool:
    """Per-pair projected g_pos, g_neg, C_n and the pair's terms (with its reference-model scores)
    for one shard; False when the shard was already done."""
    plan, store = load_plan(audit_dir), open_store(audit_dir)
    if store.is_done("gradients", shard):
        return False
    manifest = _manifest_of(plan)
    loaded, params, projector = (models or ModelCache()).get(manifest, _roots_of(plan))
    reference = None if manifest.reference is None else (references or ReferenceCache()).get(
        manifest.reference, _roots_of(plan))
    rows, start = plan.shard_rows, shard * plan.shard_rows
    grads = [name for name in GRADIENT_FIELDS if store.has(f"grads/{name}")]  # stores made before C_n lack grads/clip
    out = {name: np.zeros((rows, plan.dim), np.float32) for name in grads}
    terms = {name: np.zeros(rows, np.float32) for name in TERM_FIELDS if store.has(f"terms/{name}")}
    for name in ("reference_clip_score", "reference_negclip"):
        if name in terms:
            terms[name][:] = np.nan  # no reference: empty in ranked.csv
    batches = list(_batches_of_shard(plan, load_slots(audit_dir, shard), shard))
    with flush_denormals():
        _accumulate_shard(manifest, loaded, params, projector, start, shard, batches, out, terms, fetch_dir(audit_dir),
                          _roots_of(plan), reference)
    store.write_rows("grads", start, out)
    store.write_rows("terms", start, terms)
    if store.has("fisher/partial") and partial_sums_pay(plan):
        store.array("fisher/partial")[shard] = fisher_sum([torch.from_numpy(out["pos"])], plan.dim).numpy()
    store.mark_done("gradients", shard)  # last: the completion marker
    return True


def _accumulate_shard(manifest: Manifest, loaded: LoadedModel, params: list, projector: Projector, start: int,
                      shard: int, batches: list[list[tuple[int, Pair]]], out: dict, terms: dict,
                      fetched: Path | None = None, roots: list[Path] | None = None,
                      reference: LoadedModel | None = None) -> None:
    """Fill the shard's rows, averaging over the audit's partitions (r = 0 is the training one)."""
    o = manifest.options
    shard_pairs = [slot_pair for batch in batches for slot_pair in batch]
    for r in range(o.partitions):
        # Extra partitions re-batch the shard's own pairs (see README: "partitions").
        groups = batches if r == 0 else rebatch_within(shard_pairs, o.batch_size, seed=hash_seed(o.seed, r, shard))
        for batch in groups:  # every batch holds >= 2 pairs (prepare and rebatch_within ensure it)
            pairs = [p for _, p in batch]
            decoded = load_batch_images(pairs, fetched, roots)
            images, tokens = batch_tensors(pairs, decoded, loaded.preprocess, loaded.tokenizer)
            result = per_pair_gradients(loaded.model, params, projector, images, tokens, o.neg_term, o.chunk,
                                        memory_limit=parse_bytes(o.memory_limit))
            local = np.array([slot - start for slot, _ in batch])
            for name, values in (("pos", result.pos), ("neg", result.neg), ("clip", result.clip)):
                if name in out:
                    out[name][local] += values.numpy() / o.partitions
            if r == 0:
                terms["pos_terms"][local] = result.pos_terms.numpy()
                terms["neg_terms"][local] = result.neg_terms.numpy()
                terms["clip_score"][local] = result.clip_score.numpy()
                if reference is not None and "reference_clip_score" in terms:
                    cos, negclip = reference_scores(reference.model, *batch_tensors(
                        pairs, decoded, reference.preprocess, reference.tokenizer))
                    terms["reference_clip_score"][local] = cos.numpy()
                    terms["reference_negclip"][local] = negclip.numpy()


def curvature(audit_dir: str | Path) -> None:
    """Eigendecomposition of sum_n g_pos g_pos^T (full, or per-layer blocks).

    The sum is the total over shards of each shard's k x k partial sum, one shard in memory at a
    time, so this task's memory does not grow with N: the stored partial sum when it pays
    (`partial_sums_pay`), else the shard's own rows, which are then fewer bytes than the sum
    (also for stores made before the partial sums existed)."""
    plan, store = load_plan(audit_dir), open_store(audit_dir)
    if store.is_complete("curvature/eigvals"):
        return
    missing = [s for s in range(plan.shards) if not store.is_done("gradients", s)]
    if missing:
        raise NotReady(f"curvature needs every gradient shard; missing {missing[:10]}")
    fisher = fisher_from_partials(store, plan)
    manifest = _manifest_of(plan)
    blocks = [Block(**b) for b in plan.blocks] if manifest.options.curvature == "blocks" else None
    eigvals, eigvecs = eigendecompose(fisher, blocks)
    store.write_array("curvature/eigvecs", eigvecs.numpy())
    store.write_array("curvature/eigvals", eigvals.numpy(), {"kind": manifest.options.curvature,
                                                            "mean_eigenvalue": float(eigvals.mean())})
    store.mark_complete("curvature/eigvals")  # after both arrays: the stage's completion marker


def partial_sums_pay(plan: Plan) -> bool:
    """A shard's k x k partial sum (float64) is stored only when it is smaller than the shard's
    g_pos rows it sums (shard_rows x k float32): otherwise the curvature stage reads those rows,
    fewer bytes to write and read (the demo's shards of 256 rows at k = 1,152 wrote 44 KB of
    partial sums per pair, 62% of the audit folder). Both give the same numbers, bit for bit."""
    return plan.shard_rows * 4 >= plan.dim * 8


def fisher_from_partials(store: AuditStore, plan: Plan) -> torch.Tensor:
    """sum over shards of each shard's sum g_pos g_pos^T, one shard in memory at a time: its
    stored partial sum when there is one, else from its rows."""
    stored = store.has("fisher/partial") and partial_sums_pay(plan)
    total = None
    for s in range(plan.shards):
        if stored:
            part = torch.from_numpy(store.read_rows("fisher/partial", s, s + 1)[0])
        else:
            rows = store.read_rows("grads/pos", s * plan.shard_rows, (s + 1) * plan.shard_rows)
            part = fisher_sum([torch.from_numpy(rows)], plan.dim)
        total = part.clone() if total is None else total.add_(part)
    return total


def validation(audit_dir: str | Path, models: ModelCache | None = None,
               references: ReferenceCache | None = None) -> bool:
    """Projected gradient of the mean validation loss, one gradient per validation pair (its own
    loss Pos(i) in its validation batch: they sum to the batch loss), and the evidence of how well
    the CLIP scores separate validation pairs from corrupted copies (evidence.py); False when there
    is no validation set."""
    plan, store = load_plan(audit_dir), open_store(audit_dir)
    manifest = _manifest_of(plan)
    if manifest.validation is None:
        return False
    if store.is_complete("validation/grad"):
        return True
    o = manifest.options
    loaded, params, projector = (models or ModelCache()).get(manifest, _roots_of(plan))
    reference = None if manifest.reference is None else (references or ReferenceCache()).get(
        manifest.reference, _roots_of(plan))
    access = image_access(plan, audit_dir)
    pairs, rejected, all_ids = read_pairs(manifest.validation, field="validation", access=access)
    check_batchable("validation", len(pairs) + len(rejected), len(pairs), [r.reason for r in rejected])
    by_id = {p.id: p for p in pairs}
    examples, loss, count = [], 0.0, 0
    cosines: dict[str, dict[str, list[np.ndarray]]] = {}
    for number, batch_ids in enumerate(partition(by_id, o.batch_size, o.seed)):
        if len(batch_ids) < 2:
            continue
        batch = [by_id[i] for i in batch_ids]
        decoded = load_batch_images(batch, access.fetch_dir, access.roots)
        images, tokens = batch_tensors(batch, decoded, loaded.preprocess, loaded.tokenizer)
        with flush_denormals():
            result = per_pair_gradients(loaded.model, params, projector, images, tokens, o.neg_term, o.chunk,
                                        memory_limit=parse_bytes(o.memory_limit))
        examples.append(result.pos)
        loss += float(result.pos_terms.double().sum())
        count += len(batch)
        corrupted = corrupted_captions([p.caption for p in batch], hash_seed(o.seed, number))
        _collect_cosines(cosines, "clip_score", loaded, images, batch, corrupted)
        if reference is not None:
            ref_images, _ = batch_tensors(batch, decoded, reference.preprocess, reference.tokenizer)
            _collect_cosines(cosines, "reference_clip_score", reference, ref_images, batch, corrupted)
    if count == 0:
        raise ConfigError("validation", "no batch holds two usable pairs")
    per_example = torch.cat(examples)
    evidence = {name: separation(np.concatenate(parts["clean"]),
                                 {c: np.concatenate(parts[c]) for c in CORRUPTIONS})
                for name, parts in cosines.items()}
    store.write_array("validation/examples", per_example.numpy())
    store.write_array("validation/grad", (per_example.double().sum(0) / count).numpy(),
                      {"pairs": count, "loss": loss / count, "evidence": evidence})
    store.mark_complete("validation/grad")
    return True


@torch.no_grad()
def _collect_cosines(into: dict, name: str, loaded: LoadedModel, images: torch.Tensor, batch: list[Pair],
                     corrupted: dict[str, list[str]]) -> None:
    """Cosines of the clean validation pairs and of their corrupted copies under one model."""
    device = loaded.model.logit_scale.device
    with flush_denormals():
        image = torch.nn.functional.normalize(loaded.model.encode_image(images.to(device)).double(), dim=-1)
        for kind, captions in (("clean", [p.caption for p in batch]), *corrupted.items()):
            text = loaded.model.encode_text(loaded.tokenizer(captions).to(device))
            cos = (torch.nn.functional.normalize(text.double(), dim=-1) * image).sum(-1)
            into.setdefault(name, {}).setdefault(kind, []).append(cos.cpu().numpy())


def inverse_for(plan: Plan, store: AuditStore, damping: float | None = None) -> DampedInverse:
    """H^-1 with delta (weight decay) + lambda (damping) added now, not at curvature time."""
    o = _manifest_of(plan).options
    eigvals, eigvecs = _curvature(store)
    lam = damping if damping is not None else (o.damping if o.damping is not None
                                                else default_damping(eigvals, o.damping_factor))
    return DampedInverse(eigvals, eigvecs, o.weight_decay + lam)


def _curvature(store: AuditStore) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigvals, eigvecs) of the stored Fisher, once the curvature stage has finished."""
    if not store.is_complete("curvature/eigvals"):
        raise NotReady("scoring needs the curvature stage first")
    return (torch.from_numpy(store.read_rows("curvature/eigvals")),
            torch.from_numpy(store.read_rows("curvature/eigvecs")))


def shard_scores(audit_dir: str | Path, shard: int, damping: float | None = None) -> bool:
    """IS / IS_pos / IS_neg / self-IS / leverage / Gram entries for one shard, into the store.

    `damping` re-scores with another lambda from the stored gradients; the shift used is recorded
    per shard so finalize and traces never mix scores of different dampings.
    """
    plan, store = load_plan(audit_dir), open_store(audit_dir)
    if store.is_done("scores", shard) and damping is None:
        return False
    manifest = _manifest_of(plan)
    if manifest.validation is not None and not store.is_complete("validation/grad"):
        raise NotReady("scoring needs the validation stage first")
    inverse = inverse_for(plan, store, damping)
    start, stop = shard * plan.shard_rows, (shard + 1) * plan.shard_rows
    g_pos = torch.from_numpy(store.read_rows("grads/pos", start, stop))
    g_neg = torch.from_numpy(store.read_rows("grads/neg", start, stop))
    val = torch.from_numpy(store.read_rows("validation/grad")) if manifest.validation is not None else None
    examples = (torch.from_numpy(store.read_rows("validation/examples"))
                if manifest.validation is not None and store.has("validation/examples") else None)
    g_clip = torch.from_numpy(store.read_rows("grads/clip", start, stop)) if store.has("grads/clip") else None
    blocks = [Block(**b) for b in plan.blocks] if manifest.options.curvature == "blocks" else None
    scores = pair_scores(g_pos, g_neg, inverse, val, blocks, g_clip=g_clip, validation_examples=examples,
                         pairs=plan.pairs_usable)
    store.write_rows("scores", start, {name: scores[name].numpy() for name in SCORE_FIELDS
                                       if store.has(f"scores/{name}")})
    store.array("done/scores_shift")[shard] = inverse.shift
    store.mark_done("scores", shard)
    return True


def scored_shift(plan: Plan, store: AuditStore) -> float:
    """The delta + lambda every scored shard used; refuses missing or mixed shards."""
    done = store.done_count("scores")
    if done != plan.shards:
        raise NotReady(f"{plan.shards - done} of {plan.shards} shards are not scored yet")
    shifts = store.read_rows("done/scores_shift")
    if not np.allclose(shifts, shifts[0], rtol=1e-12, atol=0):
        raise InconsistentAudit(f"shards were scored with different dampings {sorted(set(shifts.tolist()))[:3]}; "
                           "re-score every shard")
    return float(shifts[0])


def collect_scores(audit_dir: str | Path) -> tuple[list[Pair], dict[str, np.ndarray]]:
    """Usable pairs in slot order with their score and term columns."""
    _, pairs, columns = _scored_columns(audit_dir)
    return pairs, columns


def shard_score_columns(audit_dir: str | Path, shard: int) -> tuple[np.ndarray, list[Pair], dict[str, np.ndarray]]:
    """(slots, pairs, score and term columns) of one scored shard, for bulk writes elsewhere."""
    return _scored_columns(audit_dir, shard)


def _scored_columns(audit_dir: str | Path, shard: int | None = None) -> tuple[np.ndarray, list[Pair], dict]:
    store = open_store(audit_dir)
    slots = load_slots(audit_dir, shard)
    index = np.array([slot for slot, _ in slots], dtype=np.int64)
    start, stop = (None, None) if shard is None else (int(index.min()), int(index.max()) + 1)
    local = index - (start or 0)
    columns = {}
    for group, names in (("scores", SCORE_FIELDS), ("terms", TERM_FIELDS)):
        for name in names:
            columns[name] = (store.read_rows(f"{group}/{name}", start, stop)[local] if store.has(f"{group}/{name}")
                             else np.full(len(index), np.nan))  # a store made before the column existed
    # ECIF_MATH, Algorithm 3: the pair's predicted cosine under the model trained without it
    columns["clip_score_loo"] = columns["clip_score"].astype(np.float64) - columns["self_influence_clip"]
    return index, [p for _, p in slots], columns


def suspected_flags(suspicion: np.ndarray, z: float = SUSPECT_Z) -> np.ndarray:
    """Pairs whose `suspicion` (the evidence-weighted robust z-score, the default ranking's score)
    is above z = 3: a threshold chosen on the benchmark's development seeds for a precision of at
    least 0.8 on shuffled captions (README gives the precision by corruption type). Flags are pairs
    to review, not verdicts; re-threshold the `suspicion` column for another trade-off."""
    return np.nan_to_num(suspicion, nan=-np.inf) > z


@dataclass
class Ranking:
    """The final order: pairs in slot order, their columns, rank order and flags."""

    slots: np.ndarray                  # row slot of each usable pair
    pairs: list[Pair]
    columns: dict[str, np.ndarray]
    order: np.ndarray                  # indices into pairs, most likely misaligned first
    suspected: np.ndarray              # bool per pair


def final_ranking(audit_dir: str | Path) -> Ranking:
    """Rank every usable pair once all shards are scored with one damping."""
    plan = load_plan(audit_dir)
    scored_shift(plan, open_store(audit_dir))  # every shard scored, all with one damping
    o = _manifest_of(plan).options
    slots, pairs, cols = _scored_columns(audit_dir)
    scores = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in cols.items()}
    evidence = audit_evidence(audit_dir)
    cols["suspicion"] = misalignment_score(scores, "evidence", evidence).numpy()
    score = cols["suspicion"] if o.rank_by == "evidence" else misalignment_score(scores, o.rank_by, evidence).numpy()
    order = ranking(torch.from_numpy(score)).numpy()
    return Ranking(slots, pairs, cols, order, suspected_flags(cols["suspicion"]))


def finalize(audit_dir: str | Path) -> Path:
    """Rank every usable pair and write ranked.csv (rank 1 = most likely misaligned)."""
    result = final_ranking(audit_dir)
    cols = result.columns
    path = AuditFolder(audit_dir).ranked
    with storage.open_for_write(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(RANKED_COLUMNS)
        for rank, i in enumerate(result.order, start=1):
            p = result.pairs[i]
            writer.writerow(csv_row(rank, p.id, p.image, p.caption, {name: values[i] for name, values in cols.items()},
                                    bool(result.suspected[i])))
    return path


def audit_evidence(audit_dir: str | Path) -> dict[str, dict[str, float]] | None:
    """How well each model's CLIP score separated clean from corrupted validation pairs (validation
    stage, evidence.py); None without a validation set."""
    store = open_store(audit_dir)
    if not store.is_complete("validation/grad"):
        return None
    return store.array("validation/grad").attrs.get("evidence")


def misalignment_columns(audit_dir: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Pair ids (slot order) and, for every ranking rule this audit can use, its score (higher =
    more likely misaligned): re-ranking a finished audit costs no gradient (benchmarks, what-ifs)."""
    _, pairs, cols = _scored_columns(audit_dir)
    scores = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in cols.items()}
    evidence = audit_evidence(audit_dir)
    out = {}
    for rule in RANK_BY:
        try:
            out[rule] = misalignment_score(scores, rule, evidence).numpy()
        except ValueError:  # needs a validation set or a reference this audit lacks
            continue
    return [p.id for p in pairs], out


# ---------------------------------------------------------------- in-process pipeline

Progress = Callable[[str, int, int], None]


def run_stage(stage: str, audit_dir: str | Path, shard: int | None = None, *, manifest: Manifest | None = None,
              image_roots: list[Path] | None = None, models: ModelCache | None = None,
              references: ReferenceCache | None = None, operator_hosts: Sequence[str] | None = None) -> object:
    """Run one stage (one shard of a sharded stage) of the table in stages.py, by name; the same
    call for the embedded loop and the service's workers. `manifest`, `image_roots` and
    `operator_hosts` are prepare's inputs; the model caches are reused by the stages that load the model."""
    spec = BY_NAME[stage]
    function = globals()[spec.function]
    if stage == "prepare":
        return function(manifest, audit_dir, image_roots, operator_hosts)
    args = (audit_dir, shard) if spec.sharded else (audit_dir,)
    kwargs = {"models": models, "references": references} if spec.queue == "gpu" else {}
    return function(*args, **kwargs)


def run_audit(manifest: Manifest | str | Path, audit_dir: str | Path, progress: Progress | None = None) -> Path:
    """All stages in order in this process (the embedded mode); returns ranked.csv.

    Writes timing.json with the wall time of each stage (for benchmarks and the report).
    """
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    report = progress or (lambda stage, done, total: None)
    models, references, timing = ModelCache(), ReferenceCache(), {}
    shards = 1
    for spec in STAGES:
        for shard in range(shards) if spec.sharded else [None]:
            started = time.perf_counter()
            result = run_stage(spec.name, audit_dir, shard, manifest=manifest, models=models, references=references)
            timing[spec.name] = timing.get(spec.name, 0.0) + time.perf_counter() - started
            if spec.name == "prepare":
                shards = result.shards
            report(spec.name, 1 if shard is None else shard + 1, 1 if shard is None else shards)
    timing["total"] = sum(timing.values())
    storage.write_text(AuditFolder(audit_dir).timing, json.dumps(timing, indent=1))
    return AuditFolder(audit_dir).ranked
