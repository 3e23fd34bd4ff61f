"""IS, self-IS, relative-IS and the misalignment ranking (ECIF_MATH "Influence").

Sign and unit: influence(n) = grad L'^T H^-1 (g_pos(n) + g_neg(n)) is the first-order
predicted change of the validation loss L' (mean contrastive loss per validation pair, nats)
when pair n is removed. Negative = removing n lowers the validation loss = n is harmful.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from .hessian import DampedInverse
from .projection import Block

RankBy = Literal["influence", "self_influence", "combined"]
RANK_BY: tuple[str, ...] = ("influence", "self_influence", "combined")


def pair_scores(g_pos: torch.Tensor, g_neg: torch.Tensor, inverse: DampedInverse,
                validation_grad: torch.Tensor | None, blocks: Sequence[Block] | None = None) -> dict[str, torch.Tensor]:
    """Per-pair influence numbers for rows of (g_pos, g_neg), each (R, k).

    Returns influence, influence_pos, influence_neg (NaN without a validation set),
    self_influence = g_pos^T H^-1 (g_pos + g_neg), leverage = g_pos^T H^-1 g_pos, its
    leave-own-out form g^T (H - g g^T)^-1 g (per curvature block when `blocks` are given, where
    each block's leverage is in [0, 1)), and the Gram entries of the two influence directions
    H^-1 g_pos, H^-1 g_neg that relative-IS needs later.
    """
    x, y = inverse.rotate(g_pos), inverse.rotate(g_neg)
    w = inverse.inv_eigvals
    out = {
        "self_influence": (x * w * (x + y)).sum(dim=1),
        "leverage": (x * w * x).sum(dim=1),
        "leave_own_out": sum(leave_own_out_leverage((x[:, b] * w[b] * x[:, b]).sum(dim=1))
                             for b in _block_slices(blocks, x.shape[1])),
        "gram_pos_pos": (x * x * w * w).sum(dim=1),
        "gram_pos_neg": (x * y * w * w).sum(dim=1),
        "gram_neg_neg": (y * y * w * w).sum(dim=1),
    }
    if validation_grad is None:
        nan = torch.full((g_pos.shape[0],), float("nan"), dtype=torch.float64)
        out.update(influence=nan, influence_pos=nan.clone(), influence_neg=nan.clone())
    else:
        direction = inverse.rotate(validation_grad) * w
        out["influence_pos"], out["influence_neg"] = x @ direction, y @ direction
        out["influence"] = out["influence_pos"] + out["influence_neg"]
    return out


def _block_slices(blocks: Sequence[Block] | None, dim: int) -> list[slice]:
    """Index ranges of the curvature blocks (block-diagonal eigenvectors keep each block's range)."""
    return [slice(0, dim)] if blocks is None else [slice(b.start, b.stop) for b in blocks]


def relative_is(test_pos: torch.Tensor, test_neg: torch.Tensor, gram_pos_pos: torch.Tensor,
                gram_pos_neg: torch.Tensor, gram_neg_neg: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """sqrt(a^T G^-1 a): length of the projection of C onto span{H^-1 g_pos, H^-1 g_neg}.

    a = (C^T H^-1 g_pos, C^T H^-1 g_neg) per pair (test_pos, test_neg). When G is singular
    (the two directions parallel, or one is zero) the span is one line d and the result is
    |C^T d| / |d| (ECIF_MATH "Relative-IS").
    """
    a1, a2 = test_pos.to(torch.float64), test_neg.to(torch.float64)
    g11, g12, g22 = (t.to(torch.float64) for t in (gram_pos_pos, gram_pos_neg, gram_neg_neg))
    det = g11 * g22 - g12 * g12
    regular = det > rtol * g11 * g22
    safe_det = torch.where(regular, det, torch.ones_like(det))
    quad = (g22 * a1 * a1 - 2 * g12 * a1 * a2 + g11 * a2 * a2) / safe_det
    use_pos = g11 >= g22
    line_a = torch.where(use_pos, a1, a2)
    line_g = torch.where(use_pos, g11, g22)
    fallback = torch.where(line_g > 0, line_a.abs() / line_g.clamp_min(1e-300).sqrt(), torch.zeros_like(line_a))
    return torch.where(regular, quad.clamp_min(0).sqrt(), fallback)


def misalignment_score(scores: dict[str, torch.Tensor], rank_by: RankBy) -> torch.Tensor:
    """Higher = more likely misaligned, for the chosen ranking rule."""
    if rank_by == "influence":
        if torch.isnan(scores["influence"]).all():
            raise ValueError("rank_by='influence' needs a validation set")
        return -scores["influence"]
    if rank_by == "self_influence":
        return scores["self_influence"]
    if rank_by == "combined":
        return _rank_average(scores["self_influence"], -scores["influence"])
    raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")


def _rank_average(*columns: torch.Tensor) -> torch.Tensor:
    """Mean of the normalised ranks of the columns that are not all NaN (robust to scale)."""
    usable = [c for c in columns if not torch.isnan(c).all()]
    ranks = [torch.argsort(torch.argsort(c)).to(torch.float64) / max(len(c) - 1, 1) for c in usable]
    return torch.stack(ranks).mean(dim=0)


def leave_own_out_leverage(leverage: torch.Tensor) -> torch.Tensor:
    """A / (1 - A) = g^T (H - g g^T)^-1 g (Sherman-Morrison): the pair's self-influence under the
    curvature of the other pairs. Unlike A it is unbounded, so outliers stand out."""
    return leverage / (1.0 - leverage).clamp_min(1e-12)


def robust_outliers(values: torch.Tensor, z: float) -> torch.Tensor:
    """(v - median) / (1.4826 MAD) > z; nothing is an outlier when MAD = 0."""
    median = values.median()
    mad = 1.4826 * (values - median).abs().median()
    if float(mad) == 0.0:
        return torch.zeros_like(values, dtype=torch.bool)
    return (values - median) / mad > z


def ranking(misalignment: torch.Tensor) -> torch.Tensor:
    """Row order, most suspicious first; ties keep the input order (stable)."""
    return torch.argsort(-misalignment.to(torch.float64), stable=True)
