"""The closed-form embedding cotangents of a batch's per-pair terms (docs/METHOD.md, "A pair's two roles"):
what each Pos(n), Neg(n) and 1 - cos(u_n, v_n) sends to every caption and image embedding. The
gradient paths (gradients.py, partners.py) push them back through the towers."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ecif_core.influence.losses import NegTerm, contrastive_terms, log_one_minus_softmax


def embedding_cotangents(text_emb: torch.Tensor, image_emb: torch.Tensor, scale: torch.Tensor,
                         neg_term: NegTerm, rows: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d[Pos(1..B), Neg(1..B)] / d(u, v): shapes (2B, B, D) each, plus the 2B term values.

    Closed form (docs/METHOD.md, "A pair's two roles"), `rows` outputs at a time. With G = d term / dS
    (B x B), the chain through S = s u^ v^T gives d/du_i = (1/|u_i|) (I - u^_i u^_i^T) s G[i] V^ and
    d/dv_j = (1/|v_j|) (I - v^_j v^_j^T) s G[:, j]^T U^. G of Pos(n) is (p_n. - e_n) on row n plus
    (q_.n - e_n) on column n. Every Neg form is sum_{k != n} f(p_kn) + f(q_nk), and
    d p_kn / dS_kj = p_kn (d_jn - p_kj), so G[k, j] = A_kn (d_jn - p_kj) + C_nj (d_kn - q_kj) with
    A = p f'(p): p / (1 - p) (exact, from log-probabilities), p (first_order), -1/p (paper).
    jacrev of the terms gives the same numbers (tested) but costs O(B^3) vmapped temporaries.
    """
    s = softmax_parts(text_emb, image_emb, scale, neg_term)
    u, size = s.u_hat, s.u_hat.shape[0]
    u_hat, v_hat, u_norm, v_norm, p, q = s.u_hat, s.v_hat, s.u_norm, s.v_norm, s.p, s.q
    one_minus_p, one_minus_q, a_rows, c_cols = s.one_minus_p, s.one_minus_q, s.a, s.c
    jac_u = torch.empty(2 * size, size, u.shape[1], dtype=u.dtype, device=u.device)
    jac_v = torch.empty_like(jac_u)
    eye = torch.eye(size, dtype=u.dtype, device=u.device)
    for start in range(0, 2 * size, rows):
        stop = min(2 * size, start + rows)
        g = torch.zeros(stop - start, size, size, dtype=u.dtype, device=u.device)
        for o in range(start, stop):
            n = o % size
            if o < size:   # Pos(n)
                g[o - start, n, :] += p[n] - eye[n]
                g[o - start, :, n] += q[:, n] - eye[n]
            else:          # Neg(n); A (1 - p) on column n directly (A - A p cancels when p ~ 1)
                part_p, part_q = -a_rows[:, n, None] * p, -c_cols[n, None, :] * q
                part_p[:, n] = a_rows[:, n] * one_minus_p[:, n]
                part_q[n, :] = c_cols[n] * one_minus_q[n]
                g[o - start] = part_p + part_q
        jac_u[start:stop] = _through_normalisation(scale * (g @ v_hat), u_hat, u_norm)
        jac_v[start:stop] = _through_normalisation(scale * (g.transpose(1, 2) @ u_hat), v_hat, v_norm)
    return jac_u, jac_v, torch.cat([s.pos, s.neg]).detach()


class SoftmaxParts(NamedTuple):
    """What the closed-form cotangents of a batch read (embedding_cotangents, partners.kept_cotangents)."""

    u_hat: torch.Tensor
    v_hat: torch.Tensor
    u_norm: torch.Tensor
    v_norm: torch.Tensor
    pos: torch.Tensor           # Pos(1..B)
    neg: torch.Tensor           # Neg(1..B)
    p: torch.Tensor             # row softmax p[k, j]
    q: torch.Tensor             # column softmax q[k, j]
    one_minus_p: torch.Tensor   # 1 - p, from log-probabilities (exact where p is near 1)
    one_minus_q: torch.Tensor
    a: torch.Tensor             # A[k, n] = p_kn f'(p_kn), zero on the diagonal
    c: torch.Tensor             # C[n, k] = q_nk f'(q_nk), zero on the diagonal
    scale: torch.Tensor         # s = 1/tau: logits = s u^ v^T


def softmax_parts(text_emb: torch.Tensor, image_emb: torch.Tensor, scale: torch.Tensor, neg_term: NegTerm) -> SoftmaxParts:
    """The batch's unit embeddings, terms, softmaxes and Neg coefficients (no graph), computed once."""
    u, v = text_emb.detach(), image_emb.detach()
    size = u.shape[0]
    u_norm, v_norm = u.norm(dim=1, keepdim=True), v.norm(dim=1, keepdim=True)
    u_hat, v_hat = u / u_norm, v / v_norm
    logits = scale * (u_hat @ v_hat.T)
    pos, neg = contrastive_terms(logits, neg_term)
    log_p, log_q = torch.log_softmax(logits, dim=1), torch.log_softmax(logits, dim=0)
    p, q = log_p.exp(), log_q.exp()
    off = ~torch.eye(size, dtype=torch.bool, device=u.device)
    one_minus_p, one_minus_q = log_one_minus_softmax(logits, 1).exp(), log_one_minus_softmax(logits, 0).exp()
    a = torch.where(off, _neg_coefficient(logits, log_p, 1, neg_term), torch.zeros_like(p))
    c = torch.where(off, _neg_coefficient(logits, log_q, 0, neg_term), torch.zeros_like(q))
    return SoftmaxParts(u_hat, v_hat, u_norm, v_norm, pos, neg, p, q, one_minus_p, one_minus_q, a, c, scale)


def clip_cotangents(text_emb: torch.Tensor, image_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d[1 - cos(u_n, v_n)] / d(u, v) for n = 1..B: shapes (B, B, D), non-zero on item n only.

    d cos / du = (1/|u|) (I - u^ u^T) v^ (and symmetrically for v): the test gradient C_n of the
    seed's Algorithm 3 involves the pair's own two items, no batch coupling (docs/METHOD.md, "Influence")."""
    u, v = text_emb.detach(), image_emb.detach()
    u_norm, v_norm = u.norm(dim=1, keepdim=True), v.norm(dim=1, keepdim=True)
    u_hat, v_hat = u / u_norm, v / v_norm
    d_u = -_through_normalisation(v_hat, u_hat, u_norm)
    d_v = -_through_normalisation(u_hat, v_hat, v_norm)
    size = u.shape[0]
    jac_u = torch.zeros(size, size, u.shape[1], dtype=u.dtype, device=u.device)
    jac_v = torch.zeros_like(jac_u)
    index = torch.arange(size, device=u.device)
    jac_u[index, index], jac_v[index, index] = d_u, d_v
    return jac_u, jac_v


def _neg_coefficient(logits: torch.Tensor, log_prob: torch.Tensor, dim: int, neg_term: NegTerm) -> torch.Tensor:
    """p f'(p) for the Neg form's f, elementwise on a softmax along `dim` (see embedding_cotangents)."""
    if neg_term == "exact":    # f = -log(1 - p): p / (1 - p), from log-probabilities (finite for p near 1)
        return torch.exp(log_prob - log_one_minus_softmax(logits, dim))
    if neg_term == "first_order":
        return log_prob.exp()
    if neg_term == "paper":    # f = 1/p
        return -torch.exp(-log_prob)
    raise ValueError(f"neg_term must be one of exact, first_order, paper, got {neg_term!r}")


def _through_normalisation(grad_hat: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """d/dx from d/dx^ for x^ = x / |x|: (I - x^ x^T) g / |x|, rows of (R, B, D)."""
    return (grad_hat - (grad_hat * unit).sum(-1, keepdim=True) * unit) / norm


def _all_cotangents(text_emb: torch.Tensor, image_emb: torch.Tensor, scale: torch.Tensor,
                    neg_term: NegTerm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 3B cotangent sets of one batch: Pos(1..B), Neg(1..B), then 1 - cos(u_n, v_n)."""
    jac_u, jac_v, values = embedding_cotangents(text_emb, image_emb, scale, neg_term)
    clip_u, clip_v = clip_cotangents(text_emb, image_emb)
    return torch.cat([jac_u, clip_u]), torch.cat([jac_v, clip_v]), values
