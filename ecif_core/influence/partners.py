"""Per-pair gradients from each pair's top-m in-batch partners: an approximation, off by default
(docs/METHOD.md, "Top-m partners").

The exact path pushes every pair's cotangents through all 2B items of its batch, so a pair's
cost grows with B (min(D, B + 1) directions per item on the per-item path). Most of a pair's
cotangent sits on few items: its own, and the pairs it is confused with, where the softmax
weight w_nk = p_nk + q_kn + p_kn + q_nk (pair n as a positive and as a negative of k; symmetric)
is large. This path keeps, for pair n, the items of S_n = {n} and its m partners of largest
w_nk, with their exact embedding cotangents, and drops the rest. The kept items of every pair
in a slice form a gathered batch (an item appears once per pair that keeps it), so a recorded
forward and one batched backward give every pair's three gradients: three cotangent rows (Pos,
Neg, C) for the pair's own items, two for its partners' (C_n is zero there), 3 + 2m
item-backwards and m + 1 item-forwards per pair, whatever B.

What is dropped is reported per pair: `dropped` = sum over k outside S_n of w_nk, the softmax
mass between the pair and the partners it lost. To first order the dropped embedding cotangent
is at most 2 s / min|emb| times it (s = 1/tau); it bounds the cotangent, not the score, which
also depends on the dropped items' Jacobians and on the test gradient. With m >= B - 1 nothing
is dropped and the numbers are the exact path's.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ecif_core.influence import gradients as exact
from ecif_core.influence.head import are_the_projections
from ecif_core.influence.cotangents import SoftmaxParts, _all_cotangents, _through_normalisation, softmax_parts
from ecif_core.influence.losses import NegTerm
from ecif_core.influence.logra import WeightUseRecorder
from ecif_core.influence.projection import Projector
from ecif_core.influence.trunk import TrunkCache

# theta-layer activations x 3 cotangent rows per gathered backward: on the tiny CLIP (one thread)
# slices of 30-60 gathered items ran 1.4-2x faster than slices of 300 (bench/RESULTS.md, "Top-m partners")
GATHERED_SLICE_BYTES = 32 << 20
GATHERED_SLICE_BYTES_GPU = 2 << 30  # a GPU wants wide batches (not measured: no device in this round)


def partner_sets(s: SoftmaxParts, partners: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(support (B, m + 1): pair n itself, then its m partners by w_nk, largest first; dropped (B,):
    the softmax mass w_nk on the partners left out), with m = min(partners, B - 1), from the batch's
    softmaxes (cotangents.softmax_parts)."""
    if partners < 1:
        raise ValueError(f"partners must be at least 1, got {partners}")
    weight = s.p + s.p.T + s.q + s.q.T
    size = weight.shape[0]
    weight.fill_diagonal_(float("-inf"))
    m = min(partners, size - 1)
    top = weight.topk(m, dim=1).indices if m > 0 else weight.new_zeros((size, 0), dtype=torch.long)
    support = torch.cat([torch.arange(size, device=weight.device)[:, None], top], dim=1)
    kept = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, support, True)
    dropped = torch.where(kept, torch.zeros_like(weight), weight).sum(dim=1)
    return support, dropped


def kept_cotangents(s: SoftmaxParts, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_u, c_v, values): c_u[t, n, w] = the cotangent term t (0 Pos(n), 1 Neg(n), 2 the C_n term
    1 - cos(u_n, v_n)) sends to caption support[n, w], c_v likewise to image support[n, w], each
    (3, B, W, D); values = the 2B terms Pos(1..B), Neg(1..B).

    `s`: the batch's cotangents.softmax_parts (with the audit's Neg form). The same closed form as
    cotangents.embedding_cotangents (G = d term / dS; caption i gets
    s (I - û_i û_i^T) G[i, :] V̂ / |u_i|, image j gets s (I - v̂_j v̂_j^T) G[:, j]^T Û / |v_j|), but
    only the rows and columns of G the kept items need: B x W x B entries per term instead of
    B x B x B, so the cost per pair is W B D, not B^2 D."""
    size, width = support.shape
    u_hat, v_hat, u_norm, v_norm, p, q = s.u_hat, s.v_hat, s.u_norm, s.v_norm, s.p, s.q
    one_minus_p, one_minus_q, a, c = s.one_minus_p, s.one_minus_q, s.a, s.c                 # A[k, n], C[n, k]
    n = torch.arange(size, device=u_hat.device)[:, None].expand(size, width)                # owner of each slot
    k = support                                                                             # the kept item
    own = (k == n).to(u_hat.dtype)                                                          # (B, W)
    e_n = torch.nn.functional.one_hot(n, size).to(u_hat.dtype)                              # (B, W, B)

    # Pos(n): G[i, j] = d_in (p_nj - d_jn) + d_jn (q_in - d_in)
    pos_row = own[..., None] * (p[n] - e_n) + e_n * (q[k, n] - own)[..., None]           # G[k, :]
    pos_col = e_n * (p[n, k] - own)[..., None] + own[..., None] * (q.T[n] - e_n)   # G[:, k]
    # Neg(n): G[i, j] = -A_in p_ij (j != n; A_in (1 - p_in) at j = n) - C_nj q_ij (i != n; C_nj (1 - q_nj) at i = n)
    a_kn = a[k, n][..., None]
    neg_row = -a_kn * p[k] + e_n * (a_kn * (p[k, n] + one_minus_p[k, n])[..., None])
    c_n = c[n]                                                                             # (B, W, B): C[n, :]
    neg_row = neg_row + torch.where(own[..., None].bool(), c_n * one_minus_q[n], -c_n * q[k])
    a_col, p_col, q_col = a.T[n], p.T[k], q.T[k]                                          # A[:, n], p[:, k], q[:, k]
    neg_col = torch.where(own[..., None].bool(), a_col * one_minus_p.T[n], -a_col * p_col)
    c_nk = c[n, k][..., None]
    neg_col = neg_col - c_nk * q_col + e_n * (c_nk * (q_col * e_n).sum(-1, keepdim=True) + c_nk * one_minus_q[n, k][..., None])

    rows = torch.stack([pos_row, neg_row])                                                 # (2, B, W, B)
    cols = torch.stack([pos_col, neg_col])
    c_u = _through_normalisation(s.scale * (rows @ v_hat), u_hat[k], u_norm[k])
    c_v = _through_normalisation(s.scale * (cols @ u_hat), v_hat[k], v_norm[k])
    clip_u = -_through_normalisation(v_hat[k], u_hat[k], u_norm[k]) * own[..., None]
    clip_v = -_through_normalisation(u_hat[k], v_hat[k], v_norm[k]) * own[..., None]
    values = torch.cat([s.pos, s.neg]).detach()
    return torch.cat([c_u, clip_u[None]]), torch.cat([c_v, clip_v[None]]), values


def batch_gradients(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], projector: Projector,
                    images: torch.Tensor, tokens: torch.Tensor, neg_term: NegTerm = "exact", chunk: int = 64,
                    memory_limit: int | None = None, partners: int | None = None) -> exact.BatchGradients:
    """One batch's gradients as an audit asks for them (options.partners): the exact path
    (gradients.per_pair_gradients) when `partners` is None; the top-m approximation with its
    `dropped_mass` otherwise, where m >= B - 1 drops nothing and runs the exact path (dropped 0)."""
    if partners is not None and partners < len(tokens) - 1:
        return partner_gradients(model, params, projector, images, tokens, neg_term, partners,
                                 memory_limit=memory_limit)
    result = exact.per_pair_gradients(model, params, projector, images, tokens, neg_term, chunk,
                                      memory_limit=memory_limit)
    if partners is not None:
        result.dropped_mass = torch.zeros(len(tokens))
    return result


def partner_gradients(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], projector: Projector,
                      images: torch.Tensor, tokens: torch.Tensor, neg_term: NegTerm, partners: int,
                      pairs_per_slice: int | None = None, memory_limit: int | None = None):
    """BatchGradients of one batch on the top-m path, with `dropped_mass` set (module docstring).

    Needs LoGra factors on every theta weight (the per-item condition): the gathered batch's
    per-item projected gradients are summed per owning pair. `pairs_per_slice` bounds the
    gathered batch (pairs x (m + 1) items); by default it keeps the recorded activations near
    GATHERED_SLICE_BYTES (GATHERED_SLICE_BYTES_GPU on a GPU), and within half of what
    `memory_limit` (bytes) leaves above the memory already in use."""
    device = model.logit_scale.device
    size = len(tokens)
    trunk = TrunkCache(model, params)
    features = None
    if are_the_projections(model, params):  # the towers' features come with this forward (the store keeps them)
        recorder = WeightUseRecorder(params)
        with torch.no_grad(), trunk.capture(), recorder:
            text_emb = model.encode_text(tokens.to(device))
            text_uses = len(recorder.uses)
            image_emb = model.encode_image(images.to(device))
        features = exact.recorded_features([recorder.uses], text_uses)
        del recorder
    else:
        with torch.no_grad(), trunk.capture():
            text_emb, image_emb = exact.embed(model, images, tokens)
    parts = softmax_parts(text_emb, image_emb, exact.temperature_scale(model), neg_term)  # once, for both
    support, dropped = partner_sets(parts, partners)
    kept_u, kept_v, values = kept_cotangents(parts, support)                                  # (3, B, W, D)
    width = support.shape[1]
    if pairs_per_slice is None:
        from ecif_core.influence.memory import item_bytes, resident_bytes

        per_item, _ = item_bytes(model, params, images[:1], tokens[:1])
        budget = GATHERED_SLICE_BYTES if device.type == "cpu" else GATHERED_SLICE_BYTES_GPU
        if memory_limit is not None:
            budget = min(budget, max(0, memory_limit - resident_bytes(device)) // 2)
        pairs_per_slice = max(1, budget // (per_item * 3 * width))
    out = torch.zeros(3, size, projector.dim, dtype=text_emb.dtype, device=text_emb.device)
    images, tokens, support = images.to(device), tokens.to(device), support.to(device)
    if not _add_all_slices(model, params, projector, images, tokens, trunk, support, pairs_per_slice, kept_u, kept_v,
                           out):
        out = _kept_items_per_pair(model, params, projector, images, tokens, neg_term, support)
    with torch.no_grad():
        clip_score = torch.nn.functional.cosine_similarity(text_emb, image_emb, dim=-1)
    out, values = out.cpu(), values.detach().cpu()
    return exact.BatchGradients(pos=out[0], neg=out[1], pos_terms=values[:size], neg_terms=values[size:],
                                clip_score=clip_score.detach().cpu(), clip=out[2], dropped_mass=dropped.cpu(),
                                features=features)


def _kept_items_per_pair(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], projector: Projector,
                         images: torch.Tensor, tokens: torch.Tensor, neg_term: NegTerm, support: torch.Tensor,
                         chunk: int = 32) -> torch.Tensor:
    """(3, B, k): the same kept-items gradients on the per-pair path, for a theta without LoGra
    factors on every weight (a LayerNorm weight, say): each pair's cotangents are zeroed off its
    kept items and pushed through the whole batch. Same numbers, none of the saving."""
    size = len(tokens)
    recorder = WeightUseRecorder(params)
    with recorder:
        text_emb, image_emb = exact.embed(model, images, tokens)
    jac_u, jac_v, _ = _all_cotangents(text_emb, image_emb, exact.temperature_scale(model), neg_term)
    kept = torch.zeros(size, size, dtype=jac_u.dtype, device=jac_u.device).scatter_(1, support.to(jac_u.device), 1.0)
    mask = kept.repeat(3, 1)[:, :, None]                                   # row t B + n keeps S_n's items
    flat = exact._per_pair(recorder.uses, params, projector, text_emb, image_emb, jac_u * mask, jac_v * mask, chunk)
    return flat.reshape(3, size, -1)


def _add_all_slices(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], projector: Projector,
                    images: torch.Tensor, tokens: torch.Tensor, trunk: TrunkCache, support: torch.Tensor,
                    pairs_per_slice: int, kept_u: torch.Tensor, kept_v: torch.Tensor, out: torch.Tensor) -> bool:
    """Every slice of pairs: their own items with three cotangent rows, then their partners' items
    with two (C_n is zero off the pair's own items). False as soon as theta turns out to lack LoGra
    factors somewhere (the caller then takes the per-pair path)."""
    size, width = support.shape
    for a in range(0, size, pairs_per_slice):
        b = min(size, a + pairs_per_slice)
        pairs = torch.arange(a, b, device=support.device)
        groups = [(support[a:b, 0], pairs, (0, 1, 2), kept_u[:, a:b, 0], kept_v[:, a:b, 0])]
        if width > 1:
            dim = kept_u.shape[-1]
            groups.append((support[a:b, 1:].reshape(-1), pairs.repeat_interleave(width - 1), (0, 1),
                           kept_u[:2, a:b, 1:].reshape(2, -1, dim), kept_v[:2, a:b, 1:].reshape(2, -1, dim)))
        for items, owner, terms, cot_u, cot_v in groups:
            if not _add_gathered(model, params, projector, images, tokens, trunk, items, owner, terms, cot_u, cot_v,
                                 out):
                return False
    return True


def _add_gathered(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], projector: Projector,
                  images: torch.Tensor, tokens: torch.Tensor, trunk: TrunkCache, items: torch.Tensor,
                  owner: torch.Tensor, terms: tuple[int, ...], cot_u: torch.Tensor, cot_v: torch.Tensor,
                  out: torch.Tensor) -> bool:
    """Adds to out[t, owner[j]] the projected gradient of item items[j] along cotangent cot_u[r, j]
    (its caption) and cot_v[r, j] (its image), t = terms[r] (0 Pos, 1 Neg, 2 C): one recorded
    forward of the gathered items and one batched backward. False (nothing added) when theta
    lacks LoGra factors somewhere."""
    size = out.shape[1]
    recorder = WeightUseRecorder(params)
    with recorder, trunk.replay_items(items):
        part_u = model.encode_text(tokens[items])
        part_v = model.encode_image(images[items])
    if not exact._per_item_ready(recorder.uses, len(params), len(items)):
        return False
    towers = exact._towers(part_u, part_v, cot_u.to(part_u.dtype), cot_v.to(part_v.dtype))
    grads = torch.autograd.grad(towers[0], [u.output for u in recorder.uses], grad_outputs=towers[1],
                                is_grads_batched=True, allow_unused=True)
    selected = list(terms)
    for use, dy in zip(recorder.uses, grads):
        if dy is None:
            continue
        block = projector.blocks[use.index]
        per_item = exact.item_jacobian_block(use, dy, projector)                # (T, items, k_block)
        summed = torch.zeros(len(terms), size, per_item.shape[-1], dtype=out.dtype, device=out.device)
        summed.index_add_(1, owner, per_item.to(out.dtype))
        out[selected, :, block.start:block.stop] += summed
    return True

