"""Curvature stage: the eigendecomposition of the summed g_pos outer products (full or per-layer
blocks), and the damped inverse every later reader builds from it (docs/METHOD.md, "Curvature at scale")."""
from __future__ import annotations

from pathlib import Path

import torch

from ecif_core.errors import NotReady
from ecif_core.influence.curvature import DampedInverse, default_damping, eigendecompose, fisher_sum
from ecif_core.influence.projection import Block
from ecif_core.data.store import AuditStore
from ecif_core.progress import Progress



from ecif_core.stages.plan import Plan, manifest_of, load_plan, open_store


def curvature(audit_dir: str | Path, *, progress: Progress | None = None) -> None:
    """Eigendecomposition of sum_n g_pos g_pos^T (full, or per-layer blocks).

    The sum is the total over shards of each shard's k x k partial sum, one shard in memory at a
    time, so this task's memory does not grow with N: the stored partial sum when it pays
    (`partial_sums_pay`), else the shard's own rows, which are then fewer bytes than the sum
    (also for stores made before the partial sums existed). `progress`: ("step", shards summed
    (then + 1 for the eigendecomposition), shards + 1)."""
    plan, store = load_plan(audit_dir), open_store(audit_dir)
    if store.curvature_complete():
        return
    missing = [s for s in range(plan.shards) if not store.is_done("gradients", s)]
    if missing:
        raise NotReady(f"curvature needs every gradient shard; missing {missing[:10]}")
    fisher = fisher_from_partials(store, plan, progress)
    manifest = manifest_of(plan)
    blocks = [Block(**b) for b in plan.blocks] if manifest.options.curvature == "blocks" else None
    eigvals, eigvecs = eigendecompose(fisher, blocks)
    store.write_curvature(eigvals.numpy(), eigvecs.numpy(), {"kind": manifest.options.curvature,
                                                             "mean_eigenvalue": float(eigvals.mean())})
    if progress is not None:
        progress("step", plan.shards + 1, plan.shards + 1)


def partial_sums_pay(plan: Plan) -> bool:
    """A shard's k x k partial sum (float64) is stored only when it is smaller than the shard's
    g_pos rows it sums (shard_rows x k float32): otherwise the curvature stage reads those rows,
    fewer bytes to write and read (the demo's shards of 256 rows at k = 1,152 wrote 44 KB of
    partial sums per pair, 62% of the audit folder). Both give the same numbers, bit for bit."""
    return sums_pay(plan.shard_rows, plan.dim)


def sums_pay(shard_rows: int, dim: int) -> bool:
    """partial_sums_pay for a shard of `shard_rows` rows of k = `dim` (before a plan exists: the estimate)."""
    return shard_rows * 4 >= dim * 8


def fisher_from_partials(store: AuditStore, plan: Plan, progress: Progress | None = None) -> torch.Tensor:
    """sum over shards of each shard's sum g_pos g_pos^T, one shard in memory at a time: its
    stored partial sum when there is one, else from its rows."""
    stored = store.has_fisher_partials() and partial_sums_pay(plan)
    total = None
    for s in range(plan.shards):
        if stored:
            part = torch.from_numpy(store.fisher_partial(s))
        else:
            rows = store.pos_gradients(s * plan.shard_rows, (s + 1) * plan.shard_rows)
            part = fisher_sum([torch.from_numpy(rows)], plan.dim)
        total = part.clone() if total is None else total.add_(part)
        if progress is not None:
            progress("step", s + 1, plan.shards + 1)  # the last step is the eigendecomposition
    return total


def inverse_for(plan: Plan, store: AuditStore, damping: float | None = None) -> DampedInverse:
    """H^-1 with delta (weight decay) + lambda (damping) added now, not at curvature time."""
    o = manifest_of(plan).options
    eigvals, eigvecs = stored_curvature(store)
    lam = damping if damping is not None else (o.damping if o.damping is not None
                                                else default_damping(eigvals, o.damping_per_mean_eigenvalue))
    return DampedInverse(eigvals, eigvecs, o.weight_decay + lam)


def stored_curvature(store: AuditStore) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigvals, eigvecs) of the stored Fisher, once the curvature stage has finished."""
    if not store.curvature_complete():
        raise NotReady("scoring needs the curvature stage first")
    eigvals, eigvecs = store.curvature()
    return torch.from_numpy(eigvals), torch.from_numpy(eigvecs)
