"""The seeded, fixed partition of pair ids into batches (docs/METHOD.md, "Setting").

Training and the audit must see the same batches: the partition depends only on the set of
ids, the seed and the batch size, never on the order of rows in a file. Removing pairs
(excluded or rejected rows) drops them from their batches and leaves every other batch as is,
exactly as the leave-out objective of ECIF assumes.
"""
from __future__ import annotations

import hashlib
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


def training_batches(ids: Iterable[str], batch_size: int, seed: int,
                     drop: Iterable[str] = ()) -> tuple[list[list[str]], list[str]]:
    """(batches the objective sums over, ids left alone in their batch).

    The one definition shared by the trainer and the audit: a pair alone in its batch after
    removals has no in-batch negatives and a degenerate loss, so neither trains nor audits it.
    """
    batches = partition(ids, batch_size, seed, drop)
    return [b for b in batches if len(b) >= 2], [b[0] for b in batches if len(b) == 1]


def batch_count(pairs: int, batch_size: int) -> int:
    """Batches of two or more pairs that `training_batches` makes of `pairs` ids none of which is
    dropped: ceil(pairs / B), less the last batch when it holds a single pair (left alone)."""
    full, rest = divmod(pairs, batch_size)
    return full + (rest >= 2)


def ids_digest(ids: Iterable[str]) -> str:
    """Identity of an id set: equal digests mean equal partitions for the same (seed, B)."""
    return hashlib.sha256("\n".join(sorted(set(ids))).encode()).hexdigest()


def hash_seed(*parts: int) -> int:
    """A seed derived from several integers, stable across processes (unlike hash())."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def rebatch_within(ids: Sequence, batch_size: int, seed: int) -> list[list]:
    """A further seeded partition of a block (the extra partitions r >= 1); a trailing lone
    item joins the previous batch so nobody is left without in-batch negatives."""
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    batches = [shuffled[s:s + batch_size] for s in range(0, len(shuffled), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] += batches.pop()
    return batches
