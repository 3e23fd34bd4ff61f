"""What the edit's objective computes once and keeps between conjugate-gradient products: the
towers' features when theta is within the two projections, or the output of the blocks below theta
(influence.trunk). Every product then runs only the part of the model that theta changes."""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ecif_core.influence.gradients import embed
from ecif_core.influence.trunk import TrunkCache
from ecif_core.models.features import projection_inputs, tower_feature_dims


class TrainingBatch(Protocol):
    """What the caches read of solver.TrainingBatch or StreamedBatch (no import of the solver: it imports
    this module)."""

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, tokens), read once per call."""


def is_head_only(model: torch.nn.Module, theta: Sequence[tuple[str, torch.nn.Parameter]]) -> bool:
    """theta lies within the two x @ W projections (models.features.tower_feature_dims)."""
    return tower_feature_dims(model, [name for name, _ in theta]) is not None


@torch.no_grad()
def tower_features(model: torch.nn.Module, batches: Sequence[TrainingBatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image features, text features) of every batch, before the projections: those the audit kept
    (a batch's `stored_features`, when it has them: no image is decoded), else computed from its inputs."""
    out = []
    like = model.text_projection  # the projections' device and dtype (the audit keeps float32)
    for b in batches:
        stored = getattr(b, "stored_features", None)
        image, text = stored() if stored is not None else projection_inputs(model, *b.inputs())
        out.append((image.to(like), text.to(like)))
    return out


TRUNK_CACHE_BYTES = 2 * 1024 ** 3  # the blocks' outputs below theta kept for every batch, at most this much


@torch.no_grad()
def trunk_outputs(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], batches: Sequence[TrainingBatch]
                   ) -> tuple[TrunkCache | None, list[list[torch.Tensor]] | None]:
    """The output of the last block below theta in each tower, per batch (influence.trunk.TrunkCache): every
    Hessian-vector product of CG then runs only the blocks from theta up. (None, None) where no tower has a
    trunk to skip, or where keeping it would take more than TRUNK_CACHE_BYTES (the products then recompute it)."""
    trunk = TrunkCache(model, params)
    if not trunk.towers:
        return None, None
    outputs, size = [], 0
    for b in batches:
        with trunk.capture():
            embed(model, *b.inputs())
        kept = [tower.cached for tower in trunk.towers]
        size += sum(t.numel() * t.element_size() for t in kept)
        if size > TRUNK_CACHE_BYTES:
            return None, None
        outputs.append(kept)
    for tower in trunk.towers:
        tower.cached = None
    return trunk, outputs
