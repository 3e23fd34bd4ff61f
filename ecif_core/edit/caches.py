"""What the edit's objective computes once and keeps between conjugate-gradient products: the
towers' features when theta is within the two projections, or the output of the blocks below theta
(influence.trunk). Every product then runs only the part of the model that theta changes."""
from __future__ import annotations

import contextlib
from typing import Iterator, Protocol, Sequence

import torch

from ecif_core.influence.gradients import embed
from ecif_core.influence.trunk import TrunkCache


class TrainingBatch(Protocol):
    """What the caches read of solver.TrainingBatch or StreamedBatch (no import of the solver: it imports
    this module)."""

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, tokens), read once per call."""


HEAD_PARAMETERS = ("visual.proj", "text_projection")


def is_head_only(model: torch.nn.Module, theta: Sequence[tuple[str, torch.nn.Parameter]]) -> bool:
    names = {name for name, _ in theta}
    return (names <= set(HEAD_PARAMETERS)
            and isinstance(getattr(getattr(model, "visual", None), "proj", None), torch.nn.Parameter)
            and isinstance(getattr(model, "text_projection", None), torch.nn.Parameter))


@contextlib.contextmanager
def without_projections(model: torch.nn.Module) -> Iterator[None]:
    """encode_image / encode_text return the projections' inputs while inside (open_clip skips a None)."""
    saved = model.visual.proj, model.text_projection
    if not all(isinstance(p, torch.nn.Parameter) for p in saved):
        raise TypeError("needs both projections as x @ W parameters (open_clip's default CLIP)")
    model.visual.proj, model.text_projection = None, None
    try:
        yield
    finally:
        model.visual.proj, model.text_projection = saved


@torch.no_grad()
def tower_features(model: torch.nn.Module, batches: Sequence[TrainingBatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image features, text features) of every batch, before the projections."""
    out = []
    with without_projections(model):
        for b in batches:
            text, image = embed(model, *b.inputs())
            out.append((image.detach(), text.detach()))
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
