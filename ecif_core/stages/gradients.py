"""Gradients stage, one task per shard: projected per-pair g_pos, g_neg and C_n, and the pair's
terms and reference-model scores."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ecif_core.data.batching import hash_seed, rebatch_within
from ecif_core.data.images import batch_tensors, load_batch_images
from ecif_core.data.sources import Pair
from ecif_core.influence.partners import batch_gradients
from ecif_core.models.features import projection_inputs
from ecif_core.influence.curvature import fisher_sum
from ecif_core.data.manifest import Manifest
from ecif_core.influence.memory import parse_bytes
from ecif_core.models.factory import LoadedModel
from ecif_core.influence.projection import Projector
from ecif_core.models.runtime import flush_denormals
from ecif_core.models.reference import (averaged_negclip, negclip_batchings, reference_embeddings,
                                        reference_temperature)
from ecif_core.progress import Progress



from ecif_core.models.cache import ModelCache, ReferenceCache
from ecif_core.stages import curvature as curvature_stage
from ecif_core.stages.plan import Plan, manifest_of, roots_of, fetch_dir, load_plan, load_slots, open_store


def _batches_of_shard(plan: Plan, slots: list[tuple[int, Pair]], shard: int) -> Iterator[list[tuple[int, Pair]]]:
    batch_of = {}
    for slot, pair in slots:
        batch_of.setdefault(slot // plan.batch_size, []).append((slot, pair))
    for b in plan.shard_batch_range(shard):
        if b in batch_of:
            yield batch_of[b]


def shard_gradients(audit_dir: str | Path, shard: int, models: ModelCache | None = None,
                    references: ReferenceCache | None = None, *, progress: Progress | None = None) -> bool:
    """Per-pair projected g_pos, g_neg, C_n and the pair's terms (with its reference-model scores)
    for one shard; False when the shard was already done. `progress`: ("pair", pairs of the shard
    done, its pairs) after each batch (with several partitions, each pass counts its share)."""
    plan, store = load_plan(audit_dir), open_store(audit_dir)
    if store.is_done("gradients", shard):
        return False
    manifest = manifest_of(plan)
    batches = list(_batches_of_shard(plan, load_slots(audit_dir, shard), shard))
    if progress is not None:
        progress("pair", 0, sum(len(b) for b in batches))  # before the model loads: its time is the stage's
    loaded, params, projector = (models or ModelCache()).get(manifest, roots_of(plan))
    reference = None if manifest.reference is None else (references or ReferenceCache()).get(
        manifest.reference, roots_of(plan))
    rows, start = plan.shard_rows, shard * plan.shard_rows
    out = {name: np.zeros((rows, plan.dim), np.float32) for name in store.gradient_fields()}  # no clip: old store
    terms = {name: np.zeros(rows, np.float32) for name in store.term_fields()}
    for name in ("reference_clip_score", "reference_negclip", "dropped_partner_mass"):
        if name in terms:
            terms[name][:] = np.nan  # no reference, exact path: empty in ranked.csv
    widths = store.feature_widths()
    features = None if widths is None else tuple(np.zeros((rows, width), np.float32) for width in widths)
    with flush_denormals():
        _accumulate_shard(manifest, loaded, params, projector, start, shard, batches, out, terms, fetch_dir(audit_dir),
                          roots_of(plan), reference, progress, features)
    store.write_gradients(start, out)
    store.write_terms(start, terms)
    if features is not None:
        store.write_features(start, *features)
    if store.has_fisher_partials() and curvature_stage.partial_sums_pay(plan):
        store.write_fisher_partial(shard, fisher_sum([torch.from_numpy(out["pos"])], plan.dim).numpy())
    store.mark_done("gradients", shard)  # last: the completion marker
    return True


def _accumulate_shard(manifest: Manifest, loaded: LoadedModel, params: list, projector: Projector, start: int,
                      shard: int, batches: list[list[tuple[int, Pair]]], out: dict, terms: dict,
                      fetched: Path | None = None, roots: list[Path] | None = None,
                      reference: LoadedModel | None = None, progress: Progress | None = None,
                      features: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Fill the shard's rows, averaging over the audit's partitions (r = 0 is the training one), and the
    towers' (image, text) `features` of its pairs when the store keeps them."""
    o = manifest.options
    shard_pairs = [slot_pair for batch in batches for slot_pair in batch]
    passed = 0  # pairs through the model, over every partition
    embedded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # local row -> the reference's (caption, image)
    for r in range(o.partitions):
        # Extra partitions re-batch the shard's own pairs (see README: "partitions").
        groups = batches if r == 0 else rebatch_within(shard_pairs, o.batch_size, seed=hash_seed(o.seed, r, shard))
        for batch in groups:  # every batch holds >= 2 pairs (prepare and rebatch_within ensure it)
            pairs = [p for _, p in batch]
            decoded = load_batch_images(pairs, fetched, roots)
            images, tokens = batch_tensors(pairs, decoded, loaded.preprocess, loaded.tokenizer)
            result = batch_gradients(loaded.model, params, projector, images, tokens, o.neg_term, o.chunk,
                                     memory_limit=parse_bytes(o.memory_limit), partners=o.partners)
            local = np.array([slot - start for slot, _ in batch])
            for name, values in (("pos", result.pos), ("neg", result.neg), ("clip", result.clip)):
                if name in out:
                    out[name][local] += values.numpy() / o.partitions
            if r == 0 and features is not None:
                image, text = result.features or projection_inputs(loaded.model, images, tokens)  # (top-m: not recorded)
                features[0][local], features[1][local] = image.cpu().numpy(), text.cpu().numpy()
            if r == 0:
                terms["pos_terms"][local] = result.pos_terms.numpy()
                terms["neg_terms"][local] = result.neg_terms.numpy()
                terms["clip_score"][local] = result.clip_score.numpy()
                if result.dropped_mass is not None and "dropped_partner_mass" in terms:
                    terms["dropped_partner_mass"][local] = result.dropped_mass.numpy()
                if reference is not None and "reference_clip_score" in terms:
                    text, image = reference_embeddings(reference.model, *batch_tensors(
                        pairs, decoded, reference.preprocess, reference.tokenizer))
                    terms["reference_clip_score"][local] = (text * image).sum(-1).numpy()
                    embedded.update({int(row): (text[i], image[i]) for i, row in enumerate(local)})
            passed += len(batch)
            if progress is not None:
                progress("pair", passed // o.partitions, len(shard_pairs))
    if embedded and "reference_negclip" in terms:
        _reference_negclip(embedded, terms, reference_temperature(reference.model), o.batch_size, o.seed, shard)


def _reference_negclip(embedded: dict[int, tuple[torch.Tensor, torch.Tensor]], terms: dict, tau: float,
                       batch_size: int, seed: int, shard: int) -> None:
    """reference_negclip of the shard's pairs: negCLIPLoss averaged over seeded random batchings of the shard
    (models/reference.py)."""
    rows = sorted(embedded)
    text = torch.stack([embedded[r][0] for r in rows])
    image = torch.stack([embedded[r][1] for r in rows])
    batchings = negclip_batchings(len(rows), batch_size, seed, shard)
    terms["reference_negclip"][np.array(rows)] = averaged_negclip(text, image, tau, batchings).numpy()
