"""Contrastive batch loss and its split into per-pair positive and negative parts.

Implements docs/METHOD.md, "Setting" and "A pair's two roles". Every function takes
a B x B logits matrix S already scaled by 1/tau (text rows, image columns) and works in
float32 and float64.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

NegTerm = Literal["exact", "first_order", "paper"]
NEG_TERMS: tuple[str, ...] = ("exact", "first_order", "paper")


def pair_logits(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """S_ij = <u_i, v_j> / (|u_i| |v_j| tau), with logit_scale = 1/tau (docs/METHOD.md, "Setting")."""
    u = torch.nn.functional.normalize(text_emb, dim=-1)
    v = torch.nn.functional.normalize(image_emb, dim=-1)
    return logit_scale * (u @ v.T)


def log_one_minus_exp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from log p; accurate while p <= 1/2 and p near 0 (Maechler's log1mexp)."""
    cutoff = -math.log(2.0)
    near_zero = log_p > cutoff
    safe_near = torch.where(near_zero, log_p, torch.full_like(log_p, cutoff))
    safe_far = torch.where(near_zero, torch.full_like(log_p, cutoff), log_p)
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def log_one_minus_softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """log(1 - softmax(logits)) elementwise, finite even when one probability rounds to 1.

    Off the argmax of a softmax slice p <= 1/2, where log1mexp is accurate. At the argmax,
    1 - p_kn = sum_{j != n} p_kj exactly, i.e. a log-sum-exp with entry n left out (a hard negative
    must keep a finite, exact Neg term: docs/METHOD.md, "Numerics").
    """
    log_prob = torch.log_softmax(logits, dim=dim)
    top = logits.argmax(dim=dim, keepdim=True)
    is_top = torch.zeros_like(logits, dtype=torch.bool).scatter(dim, top, True)
    without_top = torch.logsumexp(logits.masked_fill(is_top, float("-inf")), dim=dim, keepdim=True)
    at_top = without_top - torch.logsumexp(logits, dim=dim, keepdim=True)
    if logits.shape[dim] == 1:  # a batch of one pair has no negatives
        at_top = torch.full_like(at_top, float("-inf"))
    return torch.where(is_top, at_top.expand_as(logits), log_one_minus_exp(torch.where(is_top, torch.full_like(log_prob, -1.0), log_prob)))


def _log_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q): row softmax (T2I, text i over images) and column softmax (I2T)."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be a square B x B matrix, got shape {tuple(logits.shape)}")
    return torch.log_softmax(logits, dim=1), torch.log_softmax(logits, dim=0)


def batch_loss(logits: torch.Tensor, demoted: torch.Tensor | None = None) -> torch.Tensor:
    """L_batch = sum_i [-log p_ii - log q_ii] (a sum, not a mean: the objective sums batches).

    `demoted` (bool per pair): those pairs' own terms Pos(i) are dropped while they stay in every
    softmax as in-batch negatives (docs/METHOD.md, "Demotion"); None or all False is the plain loss."""
    log_p, log_q = _log_probs(logits)
    if demoted is not None:
        demoted = torch.as_tensor(demoted, dtype=torch.bool, device=logits.device)
        if demoted.shape != (logits.shape[0],):
            raise ValueError(f"demoted must hold one flag per pair ({logits.shape[0]}), got {tuple(demoted.shape)}")
    if demoted is None or not bool(demoted.any()):  # the plain sum, bit for bit
        return -(torch.diagonal(log_p).sum() + torch.diagonal(log_q).sum())
    kept = ~demoted
    return -(torch.diagonal(log_p)[kept].sum() + torch.diagonal(log_q)[kept].sum())


def pos_terms(logits: torch.Tensor) -> torch.Tensor:
    """Pos(n) = -log p_nn - log q_nn for every n; sums to batch_loss exactly."""
    log_p, log_q = _log_probs(logits)
    return -(torch.diagonal(log_p) + torch.diagonal(log_q))


def neg_terms(logits: torch.Tensor, neg_term: NegTerm = "exact") -> torch.Tensor:
    """Neg(n), the loss the other pairs of the batch lose when pair n leaves it.

    exact:       sum_{k != n} [-log(1 - p_kn) - log(1 - q_nk)]   (L_full - Pos - Neg = L_without_n)
    first_order: sum_{k != n} (p_kn + q_nk)                       (its linearisation)
    paper:       sum_{k != n} (1/p_kn + 1/q_nk)                   (the published, inverted form)
    """
    log_p, log_q = _log_probs(logits)
    off_diagonal = ~torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    # Column n of p holds p_kn (text k scoring image n); row n of q holds q_nk (image k scoring text n).
    if neg_term == "exact":
        per_entry_p, per_entry_q = -log_one_minus_softmax(logits, 1), -log_one_minus_softmax(logits, 0)
    elif neg_term == "first_order":
        per_entry_p, per_entry_q = log_p.exp(), log_q.exp()
    elif neg_term == "paper":
        per_entry_p, per_entry_q = (-log_p).exp(), (-log_q).exp()
    else:
        raise ValueError(f"neg_term must be one of {NEG_TERMS}, got {neg_term!r}")
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    from_rows = torch.where(off_diagonal, per_entry_p, zero).sum(dim=0)  # sum over k of column n
    from_cols = torch.where(off_diagonal, per_entry_q, zero).sum(dim=1)  # sum over k of row n
    return from_rows + from_cols


def contrastive_terms(logits: torch.Tensor, neg_term: NegTerm = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """(pos, neg) with pos[n] = Pos(n) and neg[n] = Neg(n) (docs/METHOD.md, "A pair's two roles")."""
    return pos_terms(logits), neg_terms(logits, neg_term)


def group_terms(logits: torch.Tensor, members: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Pos(E), Neg(E)) for a group E of pairs in one batch; Neg(E) is not the sum of Neg(n)."""
    log_p, log_q = _log_probs(logits)
    size = logits.shape[0]
    idx = torch.as_tensor(members, dtype=torch.long, device=logits.device).unique()
    if idx.numel() == 0:
        raise ValueError("members must name at least one pair")
    if int(idx.min()) < 0 or int(idx.max()) >= size:
        raise ValueError(f"members must be indices in [0, {size}), got {idx.tolist()}")
    in_group = torch.zeros(size, dtype=torch.bool, device=logits.device)
    in_group[idx] = True
    pos = -(torch.diagonal(log_p)[idx].sum() + torch.diagonal(log_q)[idx].sum())
    if bool(in_group.all()):
        return pos, torch.zeros((), dtype=logits.dtype, device=logits.device)
    others = ~in_group
    # log(1 - sum_{n in E} p_kn) = LSE_{j not in E} S_kj - LSE_j S_kj: exact, no cancellation.
    rows = logits[others]
    log_p_rest = torch.logsumexp(rows[:, others], dim=1) - torch.logsumexp(rows, dim=1)
    cols = logits[:, others]
    log_q_rest = torch.logsumexp(cols[others], dim=0) - torch.logsumexp(cols, dim=0)
    return pos, -(log_p_rest.sum() + log_q_rest.sum())
