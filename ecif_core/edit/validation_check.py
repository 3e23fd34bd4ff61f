"""The edit's validation check: the audit's validation loss L' before and after the edit, and its gradient
for the first-order prediction, on the partition the audit's validation stage used. From the towers'
features the audit kept when theta lies within the projections (no image decoded), else from the images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ecif_core.data.batching import partition
from ecif_core.data.images import load_batch
from ecif_core.data.manifest import Manifest
from ecif_core.data.sources import read_pairs
from ecif_core.errors import ConfigError
from ecif_core.influence.gradients import embed, temperature_scale
from ecif_core.influence.losses import batch_loss, pair_logits
from ecif_core.models.features import projected
from ecif_core.stages.plan import image_access, load_plan, open_store


def validation_batches(audit_dir: str | Path, manifest: Manifest, preprocess, tokenizer) -> list[tuple]:
    """The validation partition the audit used (same batch size and seed), batches of >= 2 pairs."""
    access = image_access(load_plan(audit_dir), audit_dir)
    pairs, _, _ = read_pairs(manifest.validation, field="validation", access=access)
    by_id = {p.id: p for p in pairs}
    return [load_batch([by_id[i] for i in ids], preprocess, tokenizer, access.fetch_dir, access.roots)
            for ids in partition(by_id, manifest.options.batch_size, manifest.options.seed) if len(ids) >= 2]


def kept_validation_features(audit_dir: str | Path) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The validation batches as the towers' (image, text) features the audit kept (same partition as
    `validation_batches`), or None where it kept none."""
    kept = open_store(audit_dir).validation_features()
    if kept is None:
        return None
    image, text, sizes = kept
    ends = np.cumsum(sizes)
    return [(torch.from_numpy(image[end - size:end]), torch.from_numpy(text[end - size:end]))
            for size, end in zip(sizes, ends)]


def validation_loss(model: torch.nn.Module, batches: list[tuple], params: list | None = None,
                    from_features: bool = False) -> tuple[float, list[torch.Tensor] | None]:
    """Mean contrastive loss per validation pair (the audit's L'), and its gradient in `params` when given.
    `batches`: (images, tokens) each, or (image, text) tower features with `from_features` (theta within
    the projections)."""
    total, count = 0.0, 0
    grads = None if params is None else [torch.zeros_like(p, dtype=torch.float64) for p in params]
    scale = temperature_scale(model)
    for images, tokens in batches:
        with torch.set_grad_enabled(params is not None):
            if from_features:
                like = model.text_projection  # its device and dtype (the audit keeps float32)
                text, image = projected(model, images.to(like), tokens.to(like))
            else:
                text, image = embed(model, images, tokens)
            loss = batch_loss(pair_logits(text, image, scale))
        if params is not None:
            for g, part in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if part is not None:
                    g += part.double()
        total, count = total + float(loss.detach()), count + images.shape[0]
    if count == 0:
        raise ConfigError("validation", "no batch holds two usable pairs")
    return total / count, None if grads is None else [g / count for g in grads]
