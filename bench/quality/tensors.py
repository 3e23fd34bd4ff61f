"""A run's splits as preprocessed batches, loaded once and shared by baselines and evaluation.

Train batches follow the training partition (batching.training_batches, as `ecif train` and the
audit use); validation and test batches follow batching.partition with the same size and seed,
as the audit's validation stage does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ecif_core.data.batching import partition, training_batches
from ecif_core.data.images import load_batch
from ecif_core.data.sources import Pair, read_pairs
from ecif_core.models.factory import LoadedModel


@dataclass
class Batch:
    ids: list[str]
    captions: list[str]
    images: torch.Tensor
    tokens: torch.Tensor


def load_batches(path: str | Path, loaded: LoadedModel, batch_size: int, seed: int, training: bool,
                 exclude: Sequence[str] = ()) -> list[Batch]:
    """Batches of >= 2 pairs of a pair file, in partition order."""
    pairs, rejected, all_ids = read_pairs(path)
    drop = set(exclude) | {r.id for r in rejected}
    if training:
        groups, _alone = training_batches(all_ids, batch_size, seed, drop=drop)
    else:
        groups = [b for b in partition([p.id for p in pairs if p.id not in drop], batch_size, seed) if len(b) >= 2]
    by_id = {p.id: p for p in pairs}
    return [_batch([by_id[i] for i in group], loaded) for group in groups]


def _batch(pairs: list[Pair], loaded: LoadedModel) -> Batch:
    images, tokens = load_batch(pairs, loaded.preprocess, loaded.tokenizer)
    return Batch([p.id for p in pairs], [p.caption for p in pairs], images, tokens)


def batch_ids(batches: Sequence[Batch]) -> list[str]:
    return [i for b in batches for i in b.ids]
