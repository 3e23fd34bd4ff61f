"""IS, self-IS and relative-IS per pair (docs/METHOD.md, "Influence"); the ranking rules that order
pairs by them are in ecif_core/ranking.py.

Sign and unit: influence(n) = grad L'^T H^-1 (g_pos(n) + g_neg(n)) is the first-order
predicted change of the validation loss L' (mean contrastive loss per validation pair, nats)
when pair n is removed. Negative = removing n lowers the validation loss = n is harmful.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ecif_core.influence.curvature import DampedInverse
from ecif_core.influence.projection import Block


def pair_scores(g_pos: torch.Tensor, g_neg: torch.Tensor, inverse: DampedInverse,
                validation_grad: torch.Tensor | None, blocks: Sequence[Block] | None = None,
                g_clip: torch.Tensor | None = None, validation_examples: torch.Tensor | None = None,
                pairs: int | None = None) -> dict[str, torch.Tensor]:
    """Per-pair influence numbers for rows of (g_pos, g_neg), each (R, k).

    Returns influence, influence_pos, influence_neg (NaN without a validation set),
    self_influence = g_pos^T H^-1 (g_pos + g_neg), leverage = g_pos^T H^-1 g_pos, its
    leave-own-out form g^T (H - g g^T)^-1 g (per curvature block when `blocks` are given, where
    each block's leverage is in [0, 1)), and the Gram entries of the two influence directions
    H^-1 g_pos, H^-1 g_neg that relative-IS needs later. With `g_clip` (rows C_n, the gradient of
    1 - cos(u_n, v_n)): self_influence_clip = C_n^T H^-1 (g_pos + g_neg), the predicted drop of the
    pair's cosine when it is removed (the seed's Algorithm 3). With `validation_examples` (m, k),
    one gradient per validation pair, and `pairs` (the number of training pairs): the per-example
    aggregates of `per_example_influence`.
    """
    x, y = inverse.rotate(g_pos), inverse.rotate(g_neg)
    w = inverse.inv_eigvals
    nan = torch.full((g_pos.shape[0],), float("nan"), dtype=torch.float64)
    out = {
        "self_influence": (x * w * (x + y)).sum(dim=1),
        "self_influence_clip": nan.clone() if g_clip is None else (inverse.rotate(g_clip) * w * (x + y)).sum(dim=1),
        "leverage": (x * w * x).sum(dim=1),
        "leave_own_out": sum(leave_own_out_leverage((x[:, b] * w[b] * x[:, b]).sum(dim=1))
                             for b in _block_slices(blocks, x.shape[1])),
        "gram_pos_pos": (x * x * w * w).sum(dim=1),
        "gram_pos_neg": (x * y * w * w).sum(dim=1),
        "gram_neg_neg": (y * y * w * w).sum(dim=1),
    }
    if validation_grad is None:
        out.update(influence=nan, influence_pos=nan.clone(), influence_neg=nan.clone())
    else:
        direction = inverse.rotate(validation_grad) * w
        out["influence_pos"], out["influence_neg"] = x @ direction, y @ direction
        out["influence"] = out["influence_pos"] + out["influence_neg"]
    if validation_examples is None or pairs is None:
        out.update({name: nan.clone() for name in PER_EXAMPLE_FIELDS})
    else:
        out.update(per_example_influence(x + y, inverse, validation_examples, pairs))
    return out


PER_EXAMPLE_FIELDS = ("influence_per_example", "influence_per_example_mean", "influence_per_example_min")


def per_example_influence(rotated: torch.Tensor, inverse: DampedInverse, examples: torch.Tensor,
                          pairs: int) -> dict[str, torch.Tensor]:
    """Influence on each validation pair's own loss, standardised per validation pair, aggregated.

    The summed validation gradient cancels class-specific harm (a pair that hurts one class and
    helps another nets zero); one influence per validation example keeps it. a_ni = v_i^T H^-1 g(n)
    is divided by its spread over the training set, s_i = sqrt(d_i^T F d_i / N) with d_i = H^-1 v_i
    and F the stored Fisher sum (the root-mean-square of d_i^T g_pos over the N training pairs), so
    every validation pair weighs the same whatever its loss scale, and the statistic is local to a
    shard (no pass over all rows). Negative = removing n lowers that example's loss (harmful).
    - influence_per_example: mean over examples of min(z_ni, 0), the harmful parts only (default);
    - influence_per_example_mean: mean of z_ni; influence_per_example_min: min over examples.
    `rotated`: Q^T (g_pos + g_neg) per training pair (R, k)."""
    directions = inverse.rotate(examples) * inverse.inv_eigvals          # (m, k) rotated H^-1 v_i
    spread = ((directions * directions * inverse.eigvals).sum(dim=1) / max(pairs, 1)).sqrt()
    z = (rotated @ directions.T) / spread.clamp_min(1e-300)               # (R, m)
    return {"influence_per_example": z.clamp_max(0).mean(dim=1), "influence_per_example_mean": z.mean(dim=1),
            "influence_per_example_min": z.min(dim=1).values}


def _block_slices(blocks: Sequence[Block] | None, dim: int) -> list[slice]:
    """Index ranges of the curvature blocks (block-diagonal eigenvectors keep each block's range)."""
    return [slice(0, dim)] if blocks is None else [slice(b.start, b.stop) for b in blocks]


def relative_is(test_pos: torch.Tensor, test_neg: torch.Tensor, gram_pos_pos: torch.Tensor,
                gram_pos_neg: torch.Tensor, gram_neg_neg: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """sqrt(a^T G^-1 a): length of the projection of C onto span{H^-1 g_pos, H^-1 g_neg}.

    a = (C^T H^-1 g_pos, C^T H^-1 g_neg) per pair (test_pos, test_neg). When G is singular
    (the two directions parallel, or one is zero) the span is one line d and the result is
    |C^T d| / |d| (docs/METHOD.md, "Relative-IS: tracing a test example").
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
