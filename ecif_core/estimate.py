"""A cost estimate before a long audit: time a few real batches of the gradients stage (the
dominant cost) on the manifest's own model, theta, batch size and images, plus the other stages'
work on one shard's worth of those gradients, and extrapolate to every pair of the manifest.

What is measured (`measure`, seconds on this machine, its device and torch threads):
- loading the model (and the reference model): a fixed overhead, once per worker process;
- `batches` + 1 training batches through the gradients stage's own per-batch work (images read
  and decoded, per-pair gradients over every partition, reference scores); the first is the
  warm-up (first-call overheads): it is left out of the per-pair rate and its excess over the
  steady batches counted once, as a fixed overhead;
- reading and checking the rows those batches came from (prepare's work per row);
- one validation batch (gradients and the evidence cosines) when there is a validation set;
- on one shard of those gradients (tiled to shard_rows): its k x k Fisher sum, the
  eigendecomposition of the k x k Fisher (the curvature stage), and the shard's scores with
  this audit's validation examples (the scores stage);
- a temporary store of one shard, created, written and read as each stage does (store I/O per shard).
Finalize's per-pair work is modelled (FINALIZE_PAIR_S); the store's bytes are exact arithmetic
(store.written_bytes).
`extrapolate` turns the measurements into per-stage seconds; it is pure arithmetic (tested with
fake timings)."""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ecif_core.data.batching import batch_count
from ecif_core.data.formats import read_pair_rows, source_of
from ecif_core.data.images import ImageAccess, batch_tensors, load_batch_images
from ecif_core.data.manifest import Manifest
from ecif_core.data.pairs import Pair
from ecif_core.data.remote import private_opt_ins, remote_images_of
from ecif_core.data.sources import check_batchable, iter_pairs
from ecif_core.data.store import GRADIENT_FIELDS, TERM_FIELDS, AuditStore, written_bytes
from ecif_core.evidence import corrupted_captions
from ecif_core.influence.curvature import DampedInverse, default_damping, eigendecompose, fisher_sum
from ecif_core.influence.partners import batch_gradients
from ecif_core.influence.memory import parse_bytes
from ecif_core.influence.projection import Block
from ecif_core.influence.scores import pair_scores
from ecif_core.models.cache import ModelCache, ReferenceCache
from ecif_core.models.factory import default_device
from ecif_core.models.features import kept_feature_dims
from ecif_core.models.runtime import flush_denormals
from ecif_core.stages import gradients as gradients_stage
from ecif_core.stages import validation as validation_stage
from ecif_core.stages.curvature import sums_pay
from ecif_core.stages.table import STAGES

DEFAULT_BATCHES = 3  # steady batches timed after the warm-up batch
# Finalize is one pass over every pair's scored columns: 0.30 s for 10,240 pairs in bench.scale
# (bench/RESULTS.md, "Scale"), about 30 us per pair; small against every other stage, so modelled.
FINALIZE_PAIR_S = 3e-5


@dataclass
class Measured:
    """Seconds measured on this machine (module docstring)."""

    batch_size: int             # pairs per timed batch
    load_s: float               # the model (and the reference model) loaded
    warmup_s: float             # the first batch's time above a steady batch's (first-call overheads), once
    batch_s: list[float]        # each steady batch of `batch_size` pairs through the gradients stage
    prepare_row_s: float        # one row read and checked (its image opened, a URL fetched)
    fisher_shard_s: float       # the k x k Fisher sum of one shard's rows
    eigh_s: float               # the eigendecomposition of the k x k Fisher
    score_shard_s: float        # the scores of one shard (with this audit's validation examples)
    validation_pair_s: float | None = None  # one validation pair's gradient and cosines; None: no validation set
    startup_s: float = 0.0      # a fresh process's import of the engine's libraries (0: a long-lived worker)
    create_s: float = 0.0       # the store's arrays laid out (prepare)
    finalize_s: float = 0.0     # the score and term columns opened and read once (finalize; a shard's worth)
    io_shard_s: dict[str, float] = field(default_factory=dict)  # per stage: one shard's reads and writes of the store

    @property
    def pair_s(self) -> float:
        """Seconds per pair of the gradients stage in the steady state."""
        return sum(self.batch_s) / (len(self.batch_s) * self.batch_size)


@dataclass
class Estimate:
    """Expected wall time of the whole audit per stage (table order), and its store's bytes."""

    pairs: int
    validation_pairs: int
    batch_size: int
    shards: int
    dim: int
    stages: dict[str, float]
    fixed_s: float              # library import, model load and warm-up: once, whatever the pairs
    store_bytes: int
    workers: int = 1
    device: str = "cpu"
    threads: int = 1
    measured: Measured | None = None

    @property
    def total_s(self) -> float:
        return sum(self.stages.values())

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(total_s=self.total_s, summary=self.summary(), assumes=self.assumes())
        if self.measured is not None:
            data["measured"]["pair_s"] = self.measured.pair_s
        return data

    def assumes(self) -> str:
        return (f"{self.workers} worker process{'es' if self.workers > 1 else ''} running the stages one after "
                f"another, {self.threads} torch thread{'s' if self.threads > 1 else ''} each, on {self.device} "
                "(this machine); more workers divide the gradients and scores stages, never the fixed overhead")

    def summary(self) -> str:
        """One line for a person, e.g. "Expected: about 4 min 10 s for 12,000 pairs (...)"."""
        parts = ", ".join(f"{name} {duration(s)}" for name, s in self.stages.items() if s >= 0.5)
        measured = "" if self.measured is None else \
            f"; measured on {len(self.measured.batch_s)} batch{'es' if len(self.measured.batch_s) > 1 else ''} " \
            f"of {self.measured.batch_size}"
        return (f"Expected: about {duration(self.total_s)} for {self.pairs:,} pairs ({parts}), store about "
                f"{size(self.store_bytes)}{measured} on {self.device}, {self.threads} thread"
                f"{'s' if self.threads > 1 else ''}")


def extrapolate(measured: Measured, pairs: int, validation_pairs: int, shard_batches: int, dim: int,
                workers: int = 1, device: str = "cpu", threads: int = 1, models: int = 1,
                feature_width: int = 0) -> Estimate:
    """Per-stage seconds for `pairs` training pairs (all usable) and `validation_pairs`:
    - prepare: startup_s + create_s + rows x prepare_row_s (a fresh process imports the libraries in prepare);
    - gradients: load + warm-up (once) + (pairs x pair_s + shards x fisher_shard_s when the shards
      store their partial sums) / W, W = min(workers, shards);
    - curvature: eigh_s, plus shards x fisher_shard_s when the sums are taken from the rows;
    - validation: validation pairs x (prepare_row_s + validation_pair_s) (the model is already loaded);
    - scores: shards x score_shard_s / W; finalize: finalize_s + pairs x FINALIZE_PAIR_S;
    plus, for each sharded stage and curvature, shards x its store reads and writes per shard
    (io_shard_s; / W when sharded). `feature_width`: the towers' feature widths the store keeps per pair
    (store.written_bytes)."""
    size_b = measured.batch_size
    batches = batch_count(pairs, size_b)
    shards = max(1, math.ceil(batches / shard_batches))
    shard_rows = shard_batches * size_b
    parallel = max(1, min(workers, shards))
    pays = sums_pay(shard_rows, dim)
    load = measured.load_s + measured.warmup_s
    in_batches = validation_in_batches(validation_pairs, size_b)
    per_pair_validation = measured.validation_pair_s or 0.0
    seconds = {
        "prepare": measured.startup_s + measured.create_s + pairs * measured.prepare_row_s,
        "gradients": load + (pairs * measured.pair_s + pays * shards * measured.fisher_shard_s) / parallel,
        "curvature": measured.eigh_s + (not pays) * shards * measured.fisher_shard_s,
        "validation": validation_pairs * measured.prepare_row_s + in_batches * per_pair_validation,
        "scores": shards * measured.score_shard_s / parallel,
        "finalize": measured.finalize_s + pairs * FINALIZE_PAIR_S,
    }
    assert tuple(seconds) == tuple(s.name for s in STAGES), "one figure per stage of the table"
    for stage in STAGES:
        seconds[stage.name] += shards * measured.io_shard_s.get(stage.name, 0.0) / (parallel if stage.sharded else 1)
    rows = shards * shard_rows
    return Estimate(pairs=pairs, validation_pairs=validation_pairs, batch_size=size_b, shards=shards, dim=dim,
                    stages=seconds, fixed_s=measured.startup_s + load,
                    store_bytes=written_bytes(rows, dim, shards, pays, in_batches, models, feature_width), workers=workers, device=device,
                    threads=threads, measured=measured)


def validation_in_batches(pairs: int, batch_size: int) -> int:
    """Validation pairs in a batch of two or more (the validation stage skips a last batch of one)."""
    return pairs - (pairs % batch_size == 1)


def estimate_audit(manifest: Manifest, roots: Sequence[Path] | None = None, operator_hosts: Sequence[str] | None = None,
                   *, batches: int = DEFAULT_BATCHES, pairs: int | None = None, validation_pairs: int | None = None,
                   workers: int = 1, startup_s: float = 0.0) -> Estimate:
    """Measure on this machine and extrapolate to the manifest's pairs (`pairs`, `validation_pairs`:
    counts already known, e.g. by `ecif validate`; None: the rows of the source, counted here without
    opening an image). `roots`, `operator_hosts`: as prepare takes them (the service's data roots and
    remote-image hosts). `startup_s`: the caller's measure of a fresh process's library import (the
    CLI's; a service worker imports once, not per audit)."""
    if pairs is None:
        pairs = count_rows(manifest.train, "train", roots)
    if validation_pairs is None:
        validation_pairs = 0 if manifest.validation is None else count_rows(manifest.validation, "validation", roots)
    measured, dim, feature_dims = measure(manifest, roots, operator_hosts, batches=batches,
                                          validation_pairs=validation_pairs)
    measured.startup_s = startup_s
    return extrapolate(measured, pairs, validation_pairs, manifest.options.shard_batches, dim, workers,
                       default_device(), torch.get_num_threads(), 1 + (manifest.reference is not None),
                       sum(feature_dims or ()))


def count_rows(value: str | dict, name: str, roots: Sequence[Path] | None = None) -> int:
    """Rows of a pair source (one streaming pass, no image opened)."""
    rows = read_pair_rows(source_of(value, name), name, roots)
    try:
        return sum(1 for _ in rows)
    finally:
        rows.close()


def measure(manifest: Manifest, roots: Sequence[Path] | None = None, operator_hosts: Sequence[str] | None = None,
            *, batches: int = DEFAULT_BATCHES, validation_pairs: int = 0
            ) -> tuple[Measured, int, tuple[int, int] | None]:
    """(what was timed, k, the feature widths the store keeps per pair) for the manifest on this machine;
    remote images are fetched into a temporary folder, removed at the end. `validation_pairs`: how many the
    scores stage will see."""
    o = manifest.options
    with tempfile.TemporaryDirectory(prefix="ecif-estimate-") as fetched:
        access = _access(manifest, roots, operator_hosts, Path(fetched))
        started = time.perf_counter()
        train, rows_read = _first_pairs(manifest.train, "train", access, (batches + 1) * o.batch_size)
        prepare_row_s = (time.perf_counter() - started) / rows_read
        started = time.perf_counter()
        loaded, params, projector = ModelCache().get(manifest, roots)
        reference = None if manifest.reference is None else ReferenceCache().get(manifest.reference, roots)
        load_s = time.perf_counter() - started
        widths = kept_feature_dims(loaded.model, o.theta, manifest.adapter is not None)
        groups = [g for g in (train[i:i + o.batch_size] for i in range(0, len(train), o.batch_size)) if len(g) >= 2]
        times, rows = [], []
        for group in groups:
            seconds, out = _time_batch(manifest, loaded, params, projector, group, access, reference, widths)
            times.append(seconds / len(group) * o.batch_size)  # as a full batch (a short last one scaled)
            rows.append(out)
        steady = times[1:] or times  # one batch only: no warm-up to set apart (an overestimate)
        warmup = max(0.0, times[0] - sum(steady) / len(steady)) if len(times) > 1 else 0.0
        validation_pair_s = None
        if manifest.validation is not None:
            pairs_v, _ = _first_pairs(manifest.validation, "validation", access, o.batch_size)
            validation_pair_s = _time_validation(manifest, loaded, params, projector, pairs_v, access, reference)
        dim = projector.dim
        blocks = projector.blocks if o.curvature == "blocks" else None
        work = _shard_work(manifest, rows[1:] or rows, dim, blocks, o.shard_batches * o.batch_size, validation_pairs)
        work.update(_store_work(work.pop("tiled"), work.pop("scores"), dim, o.shard_batches * o.batch_size, widths))
    return Measured(batch_size=o.batch_size, load_s=load_s, warmup_s=warmup, batch_s=steady,
                    prepare_row_s=prepare_row_s, validation_pair_s=validation_pair_s, **work), dim, widths


def _access(manifest: Manifest, roots: Sequence[Path] | None, operator_hosts: Sequence[str] | None,
            fetched: Path) -> ImageAccess:
    """Images opened as prepare opens them (prepare's remote-image rule)."""
    remote = remote_images_of(manifest.remote_images)
    opened = private_opt_ins(remote.allowed_hosts if remote else ())
    if operator_hosts is not None:
        opened &= private_opt_ins(operator_hosts)
    return ImageAccess(roots, remote, fetched, opened)


def _first_pairs(value: str | dict, name: str, access: ImageAccess, wanted: int) -> tuple[list[Pair], int]:
    """(the first `wanted` usable pairs, rows read to find them), each row checked as prepare checks it."""
    pairs, rows, reasons = [], 0, []
    for item in iter_pairs(value, field=name, access=access):
        rows += 1
        if isinstance(item, Pair):
            pairs.append(item)
            if len(pairs) >= wanted:
                break
        else:
            reasons.append(item.reason)
    check_batchable(name, rows, len(pairs), reasons)
    return pairs, rows


def _time_batch(manifest: Manifest, loaded, params: list, projector, batch: list[Pair], access: ImageAccess,
                reference, widths: tuple[int, int] | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds of the gradients stage's own work on one batch (every partition, the towers' features of
    `widths` when the store keeps them), and its gradients."""
    size = len(batch)
    out = {name: np.zeros((size, projector.dim), np.float32) for name in GRADIENT_FIELDS}
    terms = {name: np.full(size, np.nan, np.float32) for name in TERM_FIELDS}
    features = None if widths is None else tuple(np.zeros((size, width), np.float32) for width in widths)
    started = time.perf_counter()
    with flush_denormals():
        gradients_stage._accumulate_shard(manifest, loaded, params, projector, 0, 0, [list(enumerate(batch))], out,
                                          terms, access.fetch_dir, access.roots, reference, features=features)
    return time.perf_counter() - started, out


def _time_validation(manifest: Manifest, loaded, params: list, projector, batch: list[Pair], access: ImageAccess,
                     reference) -> float:
    """Seconds per pair of the validation stage's work on one batch: gradients and evidence cosines."""
    o = manifest.options
    started = time.perf_counter()
    decoded = load_batch_images(batch, access.fetch_dir, access.roots)
    images, tokens = batch_tensors(batch, decoded, loaded.preprocess, loaded.tokenizer)
    with flush_denormals():
        batch_gradients(loaded.model, params, projector, images, tokens, o.neg_term, o.chunk,
                        memory_limit=parse_bytes(o.memory_limit), partners=o.partners)
    corrupted = corrupted_captions([p.caption for p in batch], 0)
    validation_stage._collect_cosines({}, "clip_score", loaded, images, batch, corrupted)
    if reference is not None:
        ref_images, _ = batch_tensors(batch, decoded, reference.preprocess, reference.tokenizer)
        validation_stage._collect_cosines({}, "reference_clip_score", reference, ref_images, batch, corrupted)
    return (time.perf_counter() - started) / len(batch)


def _shard_work(manifest: Manifest, rows: list[dict[str, np.ndarray]], dim: int, blocks: Sequence[Block] | None,
                shard_rows: int, validation_pairs: int) -> dict[str, float]:
    """fisher_shard_s, eigh_s and score_shard_s on one shard of the measured gradients (tiled to
    `shard_rows`), with random validation gradients of the real count (their values do not change the work)."""
    tiled = {name: torch.from_numpy(np.resize(np.concatenate([r[name] for r in rows]), (shard_rows, dim)))
             for name in GRADIENT_FIELDS}
    started = time.perf_counter()
    fisher = fisher_sum([tiled["pos"]], dim)
    fisher_shard_s = time.perf_counter() - started
    fisher += torch.eye(dim, dtype=fisher.dtype) * max(float(fisher.diagonal().mean()), 1e-12)
    started = time.perf_counter()
    eigvals, eigvecs = eigendecompose(fisher, blocks)
    eigh_s = time.perf_counter() - started
    o = manifest.options
    generator = torch.Generator().manual_seed(0)
    validation = examples = None
    if validation_pairs:
        examples = torch.randn(validation_in_batches(validation_pairs, o.batch_size), dim, generator=generator)
        validation = examples.double().mean(0)
    started = time.perf_counter()
    lam = o.damping if o.damping is not None else default_damping(eigvals, o.damping_per_mean_eigenvalue)
    inverse = DampedInverse(eigvals, eigvecs, o.weight_decay + lam)
    scores = pair_scores(tiled["pos"], tiled["neg"], inverse, validation, blocks, g_clip=tiled["clip"],
                         validation_examples=examples, pairs=shard_rows)
    return {"fisher_shard_s": fisher_shard_s, "eigh_s": eigh_s, "score_shard_s": time.perf_counter() - started,
            "tiled": tiled, "scores": scores}


def _store_work(tiled: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], dim: int,
                shard_rows: int, widths: tuple[int, int] | None = None) -> dict:
    """create_s and io_shard_s: a temporary store of one shard, written and read as each stage does
    (the measured gradients and scores, so compression sees real values; the towers' features of
    `widths` when the audit keeps them; a local folder)."""
    io: dict[str, float] = {}
    pays = sums_pay(shard_rows, dim)
    with tempfile.TemporaryDirectory(prefix="ecif-estimate-store-") as folder:
        started = time.perf_counter()
        store = AuditStore(folder)
        store.create(rows=shard_rows, dim=dim, shard_rows=shard_rows, shards=1, attrs={}, feature_dims=widths)
        create_s = time.perf_counter() - started
        started = time.perf_counter()
        store = AuditStore(folder)  # each stage task opens the store afresh
        store.write_gradients(0, {name: tiled[name].numpy() for name in store.gradient_fields()})
        store.write_terms(0, {name: np.zeros(shard_rows, np.float32) for name in store.term_fields()})
        if widths is not None:
            store.write_features(0, *(np.ones((shard_rows, width), np.float32) for width in widths))
        if pays:
            store.write_fisher_partial(0, np.eye(dim))
        store.mark_done("gradients", 0)
        io["gradients"] = time.perf_counter() - started
        started = time.perf_counter()
        AuditStore(folder).fisher_partial(0) if pays else AuditStore(folder).pos_gradients(0, shard_rows)
        io["curvature"] = time.perf_counter() - started
        started = time.perf_counter()
        store = AuditStore(folder)
        store.pos_gradients(0, shard_rows), store.neg_gradients(0, shard_rows), store.clip_gradients(0, shard_rows)
        store.write_scores(0, {name: scores[name].numpy() for name in store.score_fields()})
        store.write_curvature_shift(0, 1.0)
        store.mark_done("scores", 0)
        io["scores"] = time.perf_counter() - started
        started = time.perf_counter()
        store = AuditStore(folder)
        for name in (*store.score_fields(), *store.term_fields()):
            store.score_column(name) if name in store.score_fields() else store.term_column(name)
        finalize_s = time.perf_counter() - started
    return {"create_s": create_s, "finalize_s": finalize_s, "io_shard_s": io}


def duration(seconds: float) -> str:
    """"45 s", "4 min 10 s", "3 h 20 min" (two units at most: it is an estimate)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s" if seconds % 60 else f"{seconds // 60} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def size(count: int) -> str:
    """Decimal units, two significant figures ("1.2 GB", "830 MB")."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{count} bytes"

