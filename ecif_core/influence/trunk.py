"""The trunk below theta, run once per batch (without grad) and replayed for each slice of items.

per_pair_gradients runs a no-grad forward of the whole batch (its embeddings give the
cotangents) and then a recorded forward per slice of items. Only the residual blocks from the
first one holding a theta weight upwards need that second run: the output of the block below
is the same numbers. TrunkCache keeps that output from the no-grad forward and, during a
slice's forward, the blocks below return it (the slice's rows) instead of recomputing. This is
open_clip's layout (`visual.transformer.resblocks`, `transformer.resblocks`); a tower with a
theta parameter before its blocks (patch or token embedding, class or position embedding,
ln_pre), or another layout, runs unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

_BEFORE_BLOCKS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "token_embedding")


@dataclass
class _Tower:
    blocks: torch.nn.ModuleList
    first: int          # index of the first block holding theta: blocks[:first] are the trunk
    batch_dim: int      # 0 when the blocks run batch-first, else 1
    cached: torch.Tensor | None = None


class TrunkCache:
    """capture() during the whole batch's no-grad forward, then replay(a, b) around the forward
    of items [a, b)."""

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter]):
        theta = {id(p) for p in params}
        self.towers = [t for t in (_tower(getattr(model, "visual", None), theta), _tower(model, theta)) if t]

    @contextmanager
    def capture(self) -> Iterator[None]:
        def keep(tower: _Tower):
            def hook(module, args, output):
                tower.cached = output.detach()
            return hook

        handles = [t.blocks[t.first - 1].register_forward_hook(keep(t)) for t in self.towers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replay(self, start: int, stop: int) -> Iterator[None]:
        with self._replay(lambda cached, dim: cached.narrow(dim, start, stop - start)):
            yield

    @contextmanager
    def replay_outputs(self, outputs: Sequence[torch.Tensor]) -> Iterator[None]:
        """replay() of a whole batch whose trunk outputs (one per tower, as capture() left them in
        `cached`) were kept earlier: the edit's objective keeps them for every batch (edit/caches.py)."""
        for tower, output in zip(self.towers, outputs):
            tower.cached = output
        with self._replay(lambda cached, dim: cached):
            yield

    @contextmanager
    def replay_items(self, index: torch.Tensor) -> Iterator[None]:
        """replay() for the items `index` names, in that order and repeats allowed (a gathered
        batch: partners.py)."""
        with self._replay(lambda cached, dim: cached.index_select(dim, index.to(cached.device))):
            yield

    @contextmanager
    def _replay(self, rows_of) -> Iterator[None]:
        patched = []
        for tower in self.towers:
            if tower.cached is None:
                continue
            rows = rows_of(tower.cached, tower.batch_dim)
            for i in range(tower.first):
                block = tower.blocks[i]
                block.forward = (lambda x, *a, **k: x) if i < tower.first - 1 else (lambda x, *a, _r=rows, **k: _r)
                patched.append(block)
        try:
            yield
        finally:
            for block in patched:
                del block.forward


def _tower(module: torch.nn.Module | None, theta: set[int]) -> _Tower | None:
    """The tower's trunk, or None where there is none to skip (or the layout is not open_clip's)."""
    transformer = getattr(module, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        return None
    for name in _BEFORE_BLOCKS:
        part = getattr(module, name, None)
        owned = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters()) if isinstance(part, torch.nn.Module) else []
        if any(id(p) in theta for p in owned):
            return None
    holding = [i for i, block in enumerate(blocks) if any(id(p) in theta for p in block.parameters())]
    first = holding[0] if holding else len(blocks)
    if first == 0:
        return None
    return _Tower(blocks, first, 0 if getattr(transformer, "batch_first", True) else 1)
