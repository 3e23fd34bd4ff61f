"""Validation stage: the projected validation-loss gradient and the evidence of how well each
model's CLIP score separates clean validation pairs from corrupted copies."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ecif_core.data.batching import hash_seed, partition
from ecif_core.data.images import batch_tensors, load_batch_images
from ecif_core.data.sources import Pair, check_batchable, read_pairs
from ecif_core.errors import ConfigError
from ecif_core.evidence import CORRUPTIONS, corrupted_captions, separation
from ecif_core.influence.gradients import per_pair_gradients
from ecif_core.influence.memory import parse_bytes
from ecif_core.models.factory import LoadedModel
from ecif_core.models.features import projection_inputs
from ecif_core.models.runtime import flush_denormals
from ecif_core.progress import Progress
from ecif_core.models.cache import ModelCache, ReferenceCache
from ecif_core.stages.plan import manifest_of, roots_of, image_access, load_plan, open_store


def validation(audit_dir: str | Path, models: ModelCache | None = None,
               references: ReferenceCache | None = None, *, progress: Progress | None = None) -> bool:
    """Projected gradient of the mean validation loss, one gradient per validation pair (its own
    loss Pos(i) in its validation batch: they sum to the batch loss), and the evidence of how well
    the CLIP scores separate validation pairs from corrupted copies (evidence.py); False when there
    is no validation set. `progress`: ("pair", validation pairs done, pairs in batches) per batch."""
    plan, store = load_plan(audit_dir), open_store(audit_dir)
    manifest = manifest_of(plan)
    if manifest.validation is None:
        return False
    if store.validation_complete():
        return True
    o = manifest.options
    if progress is not None:
        progress("pair", 0, None)  # counted once the pairs are read; the model loads first
    loaded, params, projector = (models or ModelCache()).get(manifest, roots_of(plan))
    reference = None if manifest.reference is None else (references or ReferenceCache()).get(
        manifest.reference, roots_of(plan))
    access = image_access(plan, audit_dir)
    pairs, rejected, all_ids = read_pairs(manifest.validation, field="validation", access=access)
    check_batchable("validation", len(pairs) + len(rejected), len(pairs), [r.reason for r in rejected])
    by_id = {p.id: p for p in pairs}
    examples, loss, count = [], 0.0, 0
    features: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if store.keeps_features() else None
    cosines: dict[str, dict[str, list[np.ndarray]]] = {}
    batches = list(partition(by_id, o.batch_size, o.seed))
    in_batches = sum(len(b) for b in batches if len(b) >= 2)
    if progress is not None:
        progress("pair", 0, in_batches)
    for number, batch_ids in enumerate(batches):
        if len(batch_ids) < 2:
            continue
        batch = [by_id[i] for i in batch_ids]
        decoded = load_batch_images(batch, access.fetch_dir, access.roots)
        images, tokens = batch_tensors(batch, decoded, loaded.preprocess, loaded.tokenizer)
        with flush_denormals():
            result = per_pair_gradients(loaded.model, params, projector, images, tokens, o.neg_term, o.chunk,
                                        memory_limit=parse_bytes(o.memory_limit))
        examples.append(result.pos)
        if features is not None:
            image, text = result.features or projection_inputs(loaded.model, images, tokens)
            features.append((image.cpu(), text.cpu()))
        loss += float(result.pos_terms.double().sum())
        count += len(batch)
        corrupted = corrupted_captions([p.caption for p in batch], hash_seed(o.seed, number))
        _collect_cosines(cosines, "clip_score", loaded, images, batch, corrupted)
        if reference is not None:
            ref_images, _ = batch_tensors(batch, decoded, reference.preprocess, reference.tokenizer)
            _collect_cosines(cosines, "reference_clip_score", reference, ref_images, batch, corrupted)
        if progress is not None:
            progress("pair", count, in_batches)
    if count == 0:
        raise ConfigError("validation", "no batch holds two usable pairs")
    per_example = torch.cat(examples)
    joined = {name: {kind: np.concatenate(values) for kind, values in parts.items()} for name, parts in cosines.items()}
    evidence = {name: separation(parts["clean"], {c: parts[c] for c in CORRUPTIONS}) for name, parts in joined.items()}
    kept = None if features is None else (torch.cat([f[0] for f in features]).numpy(),
                                          torch.cat([f[1] for f in features]).numpy(),
                                          [len(f[0]) for f in features])
    store.write_validation(per_example.numpy(), (per_example.double().sum(0) / count).numpy(),
                           {"pairs": count, "loss": loss / count, "evidence": evidence}, joined, kept)
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


def audit_evidence(audit_dir: str | Path) -> dict[str, dict[str, float]] | None:
    """How well each model's CLIP score separated clean from corrupted validation pairs (validation
    stage, evidence.py); None without a validation set."""
    store = open_store(audit_dir)
    if not store.validation_complete():
        return None
    return store.validation_attrs().get("evidence")
