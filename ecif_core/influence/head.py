"""Per-pair projected gradients in closed form when theta is the towers' final projections
(docs/METHOD.md, "Projections in closed form").

When each theta weight is the last map of its tower (u_k = f_k W_t, v_k = h_k W_v), a term's
gradient in W_t is sum_k f_k (x) c_k with c_k its embedding cotangent, so its LoGra projection is
sum_k (P f_k) (x) (P' c_k). Only the projected cotangents P' c_k are needed, and they follow from
the softmaxes without forming the 3B x B x D cotangents (cotangents.embedding_cotangents) or
pushing them through autograd: with W = V^ P'^T (B x r) and S = U^ V^^T,

    P' c_k(term) = (s / |u_k|) [ (G W)[k] - (sum_j G[k, j] S_kj) P' u^_k ]

(G = d term / dS, the normalisation's projection written through S), and for the per-pair terms G
has the structure of embedding_cotangents' docstring, so every (G W)[k] is a few B x B x r
tensors. The image side is the same formula on the transposed batch (p <-> q^T, A <-> C^T,
S <-> S^T), which leaves every Pos(n) and Neg(n) unchanged. Cost O(B^2 r) per term set instead of
O(B^2 D) per term; equal to the autograd paths to float tolerance (tests/core/test_head_gradients.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ecif_core.influence.cotangents import SoftmaxParts
from ecif_core.influence.logra import Use, project_side
from ecif_core.influence.projection import Projector


def are_the_projections(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> bool:
    """`params` are exactly the towers' two x @ W projections (by identity): their recorded inputs are the
    towers' features (gradients.recorded_features)."""
    heads = (getattr(getattr(model, "visual", None), "proj", None), getattr(model, "text_projection", None))
    return all(isinstance(h, torch.nn.Parameter) for h in heads) and len(params) == 2 \
        and {id(p) for p in params} == {id(h) for h in heads}


def head_ready(uses: Sequence[Use], text_uses: int, n_params: int, text_emb: torch.Tensor,
               image_emb: torch.Tensor) -> bool:
    """Every theta weight is used once, and its output is its tower's embedding itself."""
    text, image = uses[:text_uses], uses[text_uses:]
    return (len(text) <= 1 and len(image) <= 1 and {u.index for u in uses} == set(range(n_params))
            and len(uses) == n_params and all(u.output is text_emb for u in text)
            and all(u.output is image_emb for u in image))


def _without_column(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Y[k, n] = sum_{j != n} p[k, j] values[j] for values (B, r) shared by every row k: (B, B, r).

    p[k] @ values minus the n-th summand; where p[k, n] is close to 1 that difference cancels, so
    the one column per row that can hold more than half the mass (its argmax) is summed again
    without it."""
    out = (p @ values)[:, None, :] - p[:, :, None] * values[None, :, :]
    rows, top = torch.arange(p.shape[0], device=p.device), p.argmax(1)
    masked = p.clone()
    masked[rows, top] = 0
    out[rows, top] = masked @ values
    return out


def _without_column_rowwise(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Y[k, n] = sum_{j != n} p[k, j] values[k, j] for values (B, B): (B, B), as _without_column."""
    weighted = p * values
    out = weighted.sum(1, keepdim=True) - weighted
    rows, top = torch.arange(p.shape[0], device=p.device), p.argmax(1)
    weighted[rows, top] = 0
    out[rows, top] = weighted.sum(1)
    return out


def _side(parts: SoftmaxParts, text: bool, factor: torch.Tensor | None) -> torch.Tensor:
    """(3B, B, r): P' c_k for Pos(1..B), Neg(1..B), then 1 - cos(u_n, v_n), on one tower's items k."""
    if text:
        p, omp, q, omq, a, c = parts.p, parts.one_minus_p, parts.q, parts.one_minus_q, parts.a, parts.c
        unit, other, norm, cos = parts.u_hat, parts.v_hat, parts.u_norm, parts.u_hat @ parts.v_hat.T
    else:  # the transposed batch: the same per-pair terms
        p, omp, q, omq, a, c = parts.q.T, parts.one_minus_q.T, parts.p.T, parts.one_minus_p.T, parts.c.T, parts.a.T
        unit, other, norm, cos = parts.v_hat, parts.u_hat, parts.v_norm, parts.v_hat @ parts.u_hat.T
    size = p.shape[0]
    w, own = project_side(other, factor), project_side(unit, factor)     # (B, r): P' v^_j, P' u^_k
    diag = torch.arange(size, device=p.device)

    # Pos(n): row n of G is p[n] - e_n, column n is q[:, n] - e_n
    gw_pos = q.T[:, :, None] * w[:, None, :]                            # [n, k] = q_kn w_n
    gw_pos[diag, diag] += p @ w - 2 * w
    sigma_pos = q.T * cos.T                                             # [n, k] = q_kn S_kn
    sigma_pos[diag, diag] += (p * cos).sum(1) - 2 * cos.diagonal()

    # Neg(n): G[k, j] = A_kn (d_jn - p_kj) + C_nj (d_kn - q_kj), the (1 - p) factors from log-probabilities
    y = _without_column(p, w)                                           # [k, n] = sum_{j != n} p_kj w_j
    y_sigma = _without_column_rowwise(p, cos)                           # [k, n] = sum_{j != n} p_kj S_kj
    gw_neg = (a * omp)[:, :, None] * w[None, :, :] - a[:, :, None] * y   # [k, n]
    sigma_neg = a * omp * cos - a * y_sigma
    # the C part: -sum_j q_kj C_nj w_j on items k != n, sum_j C_nj (1 - q_nj) w_j on item n
    z = -(q @ (c.T[:, :, None] * w[:, None, :]).reshape(size, -1)).reshape(size, size, -1)
    z_sigma = -(q * cos) @ c.T
    z[diag, diag] = (c * omq) @ w
    z_sigma[diag, diag] = (c * omq * cos).sum(1)
    gw_neg, sigma_neg = (gw_neg + z).transpose(0, 1), (sigma_neg + z_sigma).T

    gw, sigma = torch.cat([gw_pos, gw_neg]), torch.cat([sigma_pos, sigma_neg])  # (2B, B, r), (2B, B)
    terms = parts.scale * (gw - sigma[:, :, None] * own[None, :, :]) / norm.reshape(1, size, 1)
    clip = torch.zeros(size, size, w.shape[1], dtype=w.dtype, device=w.device)
    clip[diag, diag] = -(w - cos.diagonal()[:, None] * own) / norm      # d[1 - cos(u_n, v_n)] on item n only
    return torch.cat([terms, clip])


class HeadGradients:
    """The projected cotangents of one batch (both towers), computed once; `add` sums a slice of
    items' contributions into the (3B, k) per-pair gradients."""

    def __init__(self, parts: SoftmaxParts, projector: Projector, uses: Sequence[Use], text_uses: int):
        self.cotangents: dict[int, torch.Tensor] = {}
        for position, use in enumerate(uses):
            p_out, p_in = _factors(projector, use.index, parts.u_hat)
            self.cotangents[use.index] = _side(parts, position < text_uses, p_out if use.kind == "linear" else p_in)

    def add(self, out: torch.Tensor, uses: Sequence[Use], projector: Projector, start: int, stop: int) -> torch.Tensor:
        """out (3B, k) += the projected gradients through the items [start, stop) recorded in `uses`."""
        for use in uses:
            p_out, p_in = _factors(projector, use.index, out)
            cot = self.cotangents[use.index][:, start:stop].to(out.dtype)
            if use.kind == "linear":   # W: (d_out, d_in); sum_k (P_out c_k)(P_in x_k)^T
                block = torch.einsum("tko,ki->toi", cot, project_side(use.inputs.detach().to(out.dtype), p_in))
            else:                      # W: (d_in, d_out); sum_k (P_out x_k)(P_in c_k)^T
                block = torch.einsum("ko,tki->toi", project_side(use.inputs.detach().to(out.dtype), p_out), cot)
            span = projector.blocks[use.index]
            out[:, span.start:span.stop] += block.reshape(out.shape[0], -1)
        return out


def _factors(projector: Projector, index: int, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(P_out, P_in) of theta weight `index` in `like`'s dtype and device (a float64 model keeps float64)."""
    return tuple(None if f is None else f.to(like.dtype) for f in projector.factors(index, like.device))  # type: ignore[return-value]
