"""Scores stage, one task per shard: influence scores from the stored gradients and the damped
inverse; and the readers of the scored columns."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ecif_core.data.sources import Pair
from ecif_core.errors import InconsistentAudit, NotReady
from ecif_core.influence.projection import Block
from ecif_core.influence.scores import pair_scores
from ecif_core.progress import Progress
from ecif_core.data.store import SCORE_FIELDS, TERM_FIELDS, AuditStore



from ecif_core.stages.curvature import inverse_for
from ecif_core.stages.plan import Plan, manifest_of, load_plan, load_slots, open_store


def shard_scores(audit_dir: str | Path, shard: int, damping: float | None = None, *,
                 progress: Progress | None = None) -> bool:
    """IS / IS_pos / IS_neg / self-IS / leverage / Gram entries for one shard, into the store.

    `damping` re-scores with another lambda from the stored gradients; the shift used is recorded
    per shard so finalize and traces never mix scores of different dampings. `progress`: ("pair",
    0, the shard's pairs) before and (pairs, pairs) once the shard is written (one matrix pass).
    """
    plan, store = load_plan(audit_dir), open_store(audit_dir)
    if store.is_done("scores", shard) and damping is None:
        return False
    pairs_here = len(load_slots(audit_dir, shard)) if progress is not None else 0
    if progress is not None:
        progress("pair", 0, pairs_here)
    manifest = manifest_of(plan)
    if manifest.validation is not None and not store.validation_complete():
        raise NotReady("scoring needs the validation stage first")
    inverse = inverse_for(plan, store, damping)
    start, stop = shard * plan.shard_rows, (shard + 1) * plan.shard_rows
    g_pos = torch.from_numpy(store.pos_gradients(start, stop))
    g_neg = torch.from_numpy(store.neg_gradients(start, stop))
    val, examples = None, None
    if manifest.validation is not None:
        val = torch.from_numpy(store.validation_gradient())
        stored_examples = store.validation_examples()  # None in stores made before they were kept
        examples = None if stored_examples is None else torch.from_numpy(stored_examples)
    clip_rows = store.clip_gradients(start, stop)  # None in stores made before C_n
    g_clip = None if clip_rows is None else torch.from_numpy(clip_rows)
    blocks = [Block(**b) for b in plan.blocks] if manifest.options.curvature == "blocks" else None
    scores = pair_scores(g_pos, g_neg, inverse, val, blocks, g_clip=g_clip, validation_examples=examples,
                         pairs=plan.pairs_usable)
    store.write_scores(start, {name: scores[name].numpy() for name in store.score_fields()})
    store.write_curvature_shift(shard, inverse.curvature_shift)
    store.mark_done("scores", shard)
    if progress is not None:
        progress("pair", pairs_here, pairs_here)
    return True


def scored_curvature_shift(plan: Plan, store: AuditStore) -> float:
    """The delta + lambda every scored shard used; refuses missing or mixed shards."""
    done = store.done_count("scores")
    if done != plan.shards:
        raise NotReady(f"{plan.shards - done} of {plan.shards} shards are not scored yet")
    shifts = store.curvature_shifts()
    if not np.allclose(shifts, shifts[0], rtol=1e-12, atol=0):
        raise InconsistentAudit("shards were scored with different curvature shifts "
                                f"{sorted(set(shifts.tolist()))[:3]}; re-score every shard")
    return float(shifts[0])


def collect_scores(audit_dir: str | Path) -> tuple[list[Pair], dict[str, np.ndarray]]:
    """Usable pairs in slot order with their score and term columns."""
    _, pairs, columns = scored_columns(audit_dir)
    return pairs, columns


def shard_score_columns(audit_dir: str | Path, shard: int) -> tuple[np.ndarray, list[Pair], dict[str, np.ndarray]]:
    """(slots, pairs, score and term columns) of one scored shard, for bulk writes elsewhere."""
    return scored_columns(audit_dir, shard)


def scored_columns(audit_dir: str | Path, shard: int | None = None) -> tuple[np.ndarray, list[Pair], dict]:
    store = open_store(audit_dir)
    slots = load_slots(audit_dir, shard)
    index = np.array([slot for slot, _ in slots], dtype=np.int64)
    start, stop = (None, None) if shard is None else (int(index.min()), int(index.max()) + 1)
    local = index - (start or 0)
    columns = {}
    for names, read in ((SCORE_FIELDS, store.score_column), (TERM_FIELDS, store.term_column)):
        for name in names:
            stored = read(name, start, stop)
            columns[name] = stored[local] if stored is not None else np.full(len(index), np.nan)  # made before it
    # the pair's predicted cosine under the model trained without it (Algorithm 3; docs/METHOD.md, "Influence")
    columns["clip_score_loo"] = columns["clip_score"].astype(np.float64) - columns["self_influence_clip"]
    return index, [p for _, p in slots], columns
