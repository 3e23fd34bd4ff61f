"""The seeded, fixed partition of pair ids into batches (ECIF_MATH "Setting").

Training and the audit must see the same batches: the partition depends only on the set of
ids, the seed and the batch size, never on the order of rows in a file. Removing pairs
(excluded or rejected rows) drops them from their batches and leaves every other batch as is,
exactly as the leave-out objective of ECIF assumes.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def partition(ids: Iterable[str], batch_size: int, seed: int, drop: Iterable[str] = ()) -> list[list[str]]:
    """Batches of ids: sort, permute with PCG64(seed), cut into runs of batch_size; then drop ids."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ordered = sorted(set(ids))
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(ordered))
    shuffled = [ordered[i] for i in order]
    dropped = set(drop)
    batches = [[i for i in shuffled[s:s + batch_size] if i not in dropped] for s in range(0, len(shuffled), batch_size)]
    return [b for b in batches if b]


def rebatch_within(ids: Sequence[str], batch_size: int, seed: int) -> list[list[str]]:
    """A further seeded partition of a block of ids (used for the extra partitions r >= 1)."""
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    return [shuffled[s:s + batch_size] for s in range(0, len(shuffled), batch_size)]
