"""Per-pair projected gradients g_pos(n), g_neg(n) of one batch (docs/METHOD.md, "Influence").

Every Pos(n) and Neg(n) depends on all 2B embeddings of the batch. We take the Jacobian of
the 2B per-pair terms with respect to the embeddings (cheap, embedding level), plus the B
cotangents of each pair's own 1 - cos(u_n, v_n) (the Algorithm 3 test gradient C_n), then either

- "per_pair": push all 3B cotangent sets back through the encoders in batched backwards (vmap
  via `is_grads_batched`), chunked to bound memory, and project each gradient as it appears:
  3B backward passes over the batch, so the cost per pair grows with B; or
- "per_item": the encoders embed each item independently, so item j's projected Jacobian
  M_j (R x k: row r is the projected gradient of its embedding along direction r) comes from
  R backward passes batched in one backward, kept apart per item by the LoGra factors (inputs
  and output-gradients are per item and token). Then g(n) = sum_j a_j(n)^T M_j, a small
  contraction with the coordinates a_j(n) of the embedding-level cotangents c_j(n) in those
  directions. Every c_j(n) lies in the span of the other tower's B embeddings and item j's own
  (basis.py, docs/METHOD.md, "Per-item cotangent basis"), so R = min(D, B + 1) directions are
  exact; "per_item_onehot" keeps the D coordinate directions (the earlier path, for comparison).

`choose_method` (the cost model in memory.py) needs LoGra factors on every theta weight for
"per_item" and then compares flops: directions x items x the flops of one direction through
theta's layers, plus the per-item coordinate and contraction steps. The paths give the same
numbers to float tolerance (tests/core/test_gradients.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import torch

from ecif_core.influence.basis import ItemBasis, identity_basis, item_basis
from ecif_core.influence.cotangents import _all_cotangents, softmax_parts
from ecif_core.influence.head import HeadGradients, head_ready
from ecif_core.influence.losses import NegTerm, batch_loss, pair_logits
from ecif_core.influence.memory import backward_passes, choose_method, direction_flops
from ecif_core.influence.logra import Use, WeightUseRecorder, project_side, projected_from_uses
from ecif_core.influence.projection import Projector
from ecif_core.influence.trunk import TrunkCache


@dataclass
class BatchGradients:
    """Projected per-pair gradients and the per-pair numbers that come for free with them."""

    pos: torch.Tensor         # (B, k)  g_pos
    neg: torch.Tensor         # (B, k)  g_neg
    pos_terms: torch.Tensor   # (B,)    Pos(n)
    neg_terms: torch.Tensor   # (B,)    Neg(n)
    clip_score: torch.Tensor  # (B,)    cosine of the pair's own embeddings
    clip: torch.Tensor        # (B, k)  C_n = grad [1 - cos(u_n, v_n)] (Algorithm 3; docs/METHOD.md, "Influence")
    dropped_mass: torch.Tensor | None = None  # (B,) softmax mass on dropped partners (partners.py); None = exact
    # ((B, d_image), (B, d_text)): the projections' inputs (the towers' features), read from the head path's
    # recorded uses when theta is the two projections; None on every other path
    features: tuple[torch.Tensor, torch.Tensor] | None = None


class Embeddings(NamedTuple):
    """Text first, as S_ij = cos(u_i, v_j) / tau is written (docs/METHOD.md, "Setting") and as
    pair_logits(text, image) takes them; open_clip's own forward returns the image first, so read them by name where it matters."""

    text: torch.Tensor   # u
    image: torch.Tensor  # v


def embed(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> Embeddings:
    """Embeddings(text u, image v), unnormalised; normalisation lives in pair_logits.

    Inputs move to the model's device (a GPU worker's model lives on the GPU)."""
    device = model.logit_scale.device
    return Embeddings(text=model.encode_text(tokens.to(device)), image=model.encode_image(images.to(device)))


def temperature_scale(model: torch.nn.Module) -> torch.Tensor:
    """1/tau = logit_scale.exp(); fixed (not in theta), so detached."""
    return model.logit_scale.detach().exp()


Method = Literal["auto", "head", "per_item", "per_item_onehot", "per_pair", "logra", "dense"]


def per_pair_gradients(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], projector: Projector,
                       images: torch.Tensor, tokens: torch.Tensor, neg_term: NegTerm = "exact",
                       chunk: int = 32, method: Method = "auto", items: int | None = None,
                       memory_limit: int | None = None) -> BatchGradients:
    """g_pos(n), g_neg(n) for every pair n of one batch, projected to (B, k) each.

    method "auto" picks by `choose_method`; "per_item", "per_item_onehot" (D directions per item
    instead of min(D, B + 1)) and "per_pair" (= "logra") force a path;
    "dense" forms every full weight gradient first on the per-pair path (the reference the tests
    compare with; also what parameters not used as linear weights get). `chunk` = cotangents
    per batched backward (embedding coordinates on the per-item path, pair terms otherwise).
    `items` = items per forward/backward: both paths are sums over items, so the batch can be
    taken in slices after one no-grad forward of the whole batch gave the cotangents; the
    memory of a backward is then set by chunk x items, not by B. `memory_limit` (bytes) picks
    items and chunk (memory.plan_chunks) instead.
    """
    device = model.logit_scale.device
    size = len(tokens)
    features = None
    if memory_limit is not None:
        from ecif_core.influence.memory import plan_for_batch

        items, chunk = plan_for_batch(model, params, images, tokens, chunk, memory_limit)
    elif items is None and device.type == "cpu":
        from ecif_core.influence.memory import item_bytes

        per_item, dim = item_bytes(model, params, images[:1], tokens[:1])
        items = cpu_items(size, dim, chunk, per_item)
    if items is not None and items < size:  # equal slices (30 + 2 items would waste the second)
        items = -(-size // -(-size // items))
    if items is None or items >= size:
        recorder = WeightUseRecorder(params)
        with recorder:
            text_emb = model.encode_text(tokens.to(device))
            text_uses = len(recorder.uses)
            image_emb = model.encode_image(images.to(device))
        head = _head(method, recorder.uses, text_uses, params, projector, text_emb, image_emb, model, neg_term)
        if head is not None:
            flat, values = head[0].add(_zeros(size, projector, text_emb), recorder.uses, projector, 0, size), head[1]
            features = recorded_features([recorder.uses], text_uses)
        else:
            jac_u, jac_v, values = _all_cotangents(text_emb, image_emb, temperature_scale(model), neg_term)
            method = _resolve(method, recorder.uses, text_uses, projector, size, text_emb.shape[1])
            bases = _bases(method, text_emb, image_emb)
            flat = _gradients_of_slice(method, recorder.uses, text_uses, params, projector, text_emb, image_emb,
                                       jac_u, jac_v, chunk, bases)
    else:  # the trunk below theta runs once, here, and is replayed for every slice
        trunk = TrunkCache(model, params)
        with torch.no_grad(), trunk.capture():
            text_emb, image_emb = embed(model, images, tokens)
        flat, head, sliced_uses = None, None, []
        for a in range(0, size, items):
            b = min(size, a + items)
            recorder = WeightUseRecorder(params)
            with recorder, trunk.replay(a, b):
                part_u = model.encode_text(tokens[a:b].to(device))
                text_uses = len(recorder.uses)
                part_v = model.encode_image(images[a:b].to(device))
            if a == 0:  # one decision per batch, on the whole batch's B
                head = _head(method, recorder.uses, text_uses, params, projector, part_u, part_v, model, neg_term,
                             (text_emb, image_emb))
                if head is None:
                    jac_u, jac_v, values = _all_cotangents(text_emb, image_emb, temperature_scale(model), neg_term)
                    method = _resolve(method, recorder.uses, text_uses, projector, size, text_emb.shape[1], b - a)
                    bases = _bases(method, text_emb, image_emb)
                else:
                    flat, values = _zeros(size, projector, text_emb), head[1]
            if head is not None:
                head[0].add(flat, recorder.uses, projector, a, b)
                sliced_uses.append(recorder.uses)
            else:
                part = _gradients_of_slice(method, recorder.uses, text_uses, params, projector, part_u, part_v,
                                           jac_u[:, a:b], jac_v[:, a:b], chunk,
                                           None if bases is None else (bases[0].part(a, b), bases[1].part(a, b)))
                flat = part if flat is None else flat.add_(part)
            del recorder, part_u, part_v
        features = recorded_features(sliced_uses, text_uses) if head is not None else None
    flat = flat.cpu()
    with torch.no_grad():
        clip_score = torch.nn.functional.cosine_similarity(text_emb, image_emb, dim=-1)
    values = values.detach().cpu()
    return BatchGradients(pos=flat[:size], neg=flat[size:2 * size], pos_terms=values[:size], neg_terms=values[size:],
                          clip_score=clip_score.detach().cpu(), clip=flat[2 * size:],
                          features=features)


def recorded_features(slices: Sequence[Sequence[Use]], text_uses: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(image, text) inputs of the two projections over the batch's slices, when theta is both projections,
    each used once (text first); None otherwise (one projection only: the other's input is not recorded)."""
    if text_uses != 1 or any(len(uses) != 2 for uses in slices) or not slices:
        return None
    image = torch.cat([uses[1].inputs.detach() for uses in slices]).cpu()
    text = torch.cat([uses[0].inputs.detach() for uses in slices]).cpu()
    return image, text


CPU_SLICE_BYTES = 256 << 20  # theta-layer activations x cotangents per batched backward on CPU


def cpu_items(batch: int, dim: int, chunk: int, per_item: int) -> int:
    """Items per slice on CPU, so that items x min(chunk, passes) x A stays near CPU_SLICE_BYTES
    (A = one item's theta-layer activations, memory.item_bytes). Wider backwards leave the
    cache and hold more memory: the tiny CLIP's per-item path took 46 ms per pair at B = 128 in
    one slice and 18 ms in slices of 32 (one thread); ViT-B-32 (A = 9.5 MiB) gets one item per
    slice, which keeps B = 256 near 3 GB. Each slice costs one recorded forward of its items."""
    return max(1, CPU_SLICE_BYTES // (per_item * min(chunk, backward_passes(batch, dim))))


def _head(method: str, uses: Sequence[Use], text_uses: int, params: Sequence[torch.nn.Parameter],
          projector: Projector, text_emb: torch.Tensor, image_emb: torch.Tensor, model: torch.nn.Module,
          neg_term: NegTerm, whole: tuple[torch.Tensor, torch.Tensor] | None = None
          ) -> tuple[HeadGradients, torch.Tensor] | None:
    """(the closed-form projections path, the 2B term values) when method is "auto" or "head" and
    theta is the towers' final projections (head.py); None otherwise. `whole`: the whole batch's
    (text, image) embeddings when text_emb / image_emb are a slice's."""
    if method not in ("auto", "head"):
        return None
    if not head_ready(uses, text_uses, len(params), text_emb, image_emb):
        if method == "head":
            raise ValueError("the head path needs theta = the towers' final projections, each used once")
        return None
    text, image = whole or (text_emb, image_emb)
    parts = softmax_parts(text, image, temperature_scale(model), neg_term)
    return HeadGradients(parts, projector, uses, text_uses), torch.cat([parts.pos, parts.neg]).detach()


def _zeros(size: int, projector: Projector, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(3 * size, projector.dim, dtype=like.dtype, device=like.device)


def _resolve(method: str, uses: Sequence[Use], text_uses: int, projector: Projector, size: int, dim: int,
             items: int | None = None) -> str:
    """The path to run: the cost model for "auto" (flops of each path for these theta layers),
    checked for the per-item paths."""
    factored = method != "dense" and _per_item_ready(uses, len(projector.blocks), size if items is None else items)
    if method == "auto":
        if not factored:
            return "per_pair"
        rows = [tuple(None if f is None else f.shape[0] for f in projector.factors(i, torch.device("cpu")))
                for i in range(len(projector.blocks))]
        return choose_method(size, dim, True, direction_flops=direction_flops(uses, text_uses, rows),
                             k=projector.dim)
    if method in ("per_item", "per_item_onehot") and not factored:
        raise ValueError("per_item needs LoGra factors for every theta weight, batch-first")
    return method


def _bases(method: str, text_emb: torch.Tensor, image_emb: torch.Tensor) -> tuple[ItemBasis, ItemBasis] | None:
    """(caption basis, image basis) of the whole batch for the per-item paths, else None."""
    if method == "per_item":
        return item_basis(text_emb, image_emb), item_basis(image_emb, text_emb)
    if method == "per_item_onehot":
        return identity_basis(text_emb.shape[1], text_emb), identity_basis(image_emb.shape[1], image_emb)
    return None


def _gradients_of_slice(method: str, uses: Sequence[Use], text_uses: int, params: Sequence[torch.nn.Parameter],
                        projector: Projector, text_emb: torch.Tensor, image_emb: torch.Tensor, jac_u: torch.Tensor,
                        jac_v: torch.Tensor, chunk: int,
                        bases: tuple[ItemBasis, ItemBasis] | None = None) -> torch.Tensor:
    """(3B, k): the contribution of the items whose embeddings are given (all, or a slice)."""
    if method in ("per_item", "per_item_onehot"):
        return per_item_gradients(uses, text_uses, text_emb, image_emb, jac_u, jac_v, projector, chunk, bases)
    return _per_pair(uses if method in ("per_pair", "logra") else [], params, projector, text_emb, image_emb,
                     jac_u, jac_v, chunk)


def _per_item_ready(uses: Sequence[Use], n_params: int, items: int) -> bool:
    """Every theta weight is used as a recorded linear / matmul, with the item index first."""
    return ({u.index for u in uses} == set(range(n_params))
            and all(u.inputs.shape[0] == items and u.output.shape[0] == items for u in uses))


def _per_pair(uses: Sequence[Use], params: Sequence[torch.nn.Parameter], projector: Projector,
              text_emb: torch.Tensor, image_emb: torch.Tensor, jac_u: torch.Tensor, jac_v: torch.Tensor,
              chunk: int) -> torch.Tensor:
    """3B cotangent sets through the encoders, `chunk` per batched backward -> (3B, k)."""
    dense = [i for i in range(len(params)) if i not in {u.index for u in uses}]
    rows = jac_u.shape[0]
    projected = []
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        inputs = [u.output for u in uses] + [params[i] for i in dense]
        towers = _towers(text_emb, image_emb, jac_u[start:stop], jac_v[start:stop])
        grads = torch.autograd.grad(towers[0], inputs, grad_outputs=towers[1],
                                    is_grads_batched=True, retain_graph=stop < rows, allow_unused=True)
        grads = [torch.zeros((stop - start, *t.shape), device=t.device) if g is None else g
                 for g, t in zip(grads, inputs)]
        blocks = projected_from_uses(uses, grads[:len(uses)], projector, stop - start)
        for i, g in zip(dense, grads[len(uses):]):
            blocks[i] = projector.project_block(i, g)
        projected.append(torch.cat([blocks[i] for i in range(len(params))], dim=1))
    return torch.cat(projected)


def per_item_gradients(uses: Sequence[Use], text_uses: int, text_emb: torch.Tensor, image_emb: torch.Tensor,
                       jac_u: torch.Tensor, jac_v: torch.Tensor, projector: Projector, chunk: int,
                       bases: tuple[ItemBasis, ItemBasis] | None = None) -> torch.Tensor:
    """(3B, k) per-pair gradients from per-item projected Jacobians (module docstring).

    uses[:text_uses] belong to the text tower (their output-gradients come from text_emb only),
    the rest to the image tower. `bases` = (caption basis, image basis) for these items (the
    identity, one-hot coordinates, when None). Basis rows [r0, r1) go to every item of both
    towers as cotangents in one batched backward; each use's output-gradient then holds, per
    item j and direction r, d <b_jr, emb_j> / d y_j, which the LoGra factors turn into M_j[r]
    (k_block), and g(n) += sum_{j, r} a_j(n)[r] M_j[r] with a_j(n) the coordinates of
    c = jac_u (text uses) or jac_v (image uses) in item j's basis.
    """
    items, dim = text_emb.shape
    text_basis, image_basis = bases or (identity_basis(dim, text_emb), identity_basis(dim, image_emb))
    if text_basis.size != image_basis.size:
        raise ValueError(f"caption and image bases differ in size: {text_basis.size} != {image_basis.size}")
    size = text_basis.size
    coords_u, coords_v = text_basis.coefficients(jac_u), image_basis.coefficients(jac_v)  # (3B, items, R)
    out = torch.zeros(jac_u.shape[0], projector.dim, device=text_emb.device, dtype=text_emb.dtype)
    for r0 in range(0, size, chunk):
        r1 = min(size, r0 + chunk)
        towers = _towers(text_emb, image_emb, text_basis.directions(r0, r1, items).to(text_emb.dtype),
                         image_basis.directions(r0, r1, items).to(image_emb.dtype))
        grads = torch.autograd.grad(towers[0], [u.output for u in uses], grad_outputs=towers[1],
                                    is_grads_batched=True, retain_graph=r1 < size, allow_unused=True)
        for position, (use, dy) in enumerate(zip(uses, grads)):
            if dy is None:
                continue
            jacobian = item_jacobian_block(use, dy, projector)                   # (R, items, k_block)
            c = (coords_u if position < text_uses else coords_v)[:, :, r0:r1]    # (3B, items, R)
            block = projector.blocks[use.index]
            out[:, block.start:block.stop] += torch.einsum("njr,rjk->nk", c.to(jacobian.dtype), jacobian)
    return out


def _towers(text_emb: torch.Tensor, image_emb: torch.Tensor, text_cot: torch.Tensor,
            image_cot: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(outputs, cotangents) of the towers that hold theta (a theta in one tower leaves the other
    embedding without a graph)."""
    pairs = [(e, c) for e, c in ((text_emb, text_cot), (image_emb, image_cot)) if e.requires_grad]
    return tuple(e for e, _ in pairs), tuple(c for _, c in pairs)


def item_jacobian_block(use: Use, dy: torch.Tensor, projector: Projector) -> torch.Tensor:
    """(R, items, k_block): per item, the projected weight gradient of R output cotangents, summed
    over that item's tokens only (sum_m (P_out dy_m)(P_in x_m)^T per item: docs/METHOD.md, "Curvature at scale")."""
    p_out, p_in = projector.factors(use.index, dy.device)
    rows, items = dy.shape[0], dy.shape[1]
    x = use.inputs.detach().reshape(items, -1, use.inputs.shape[-1])
    dy = dy.reshape(rows, items, -1, dy.shape[-1])
    if use.kind == "linear":   # W: (d_out, d_in)
        block = torch.einsum("rjto,jti->rjoi", project_side(dy, p_out), project_side(x, p_in))
    else:                      # W: (d_in, d_out) as stored
        block = torch.einsum("jto,rjti->rjoi", project_side(x, p_out), project_side(dy, p_in))
    return block.reshape(rows, items, -1)


def loss_gradient(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], projector: Projector,
                  images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Projected gradient of one batch's contrastive loss (validation and test losses), and the loss."""
    text_emb, image_emb = embed(model, images, tokens)
    loss = batch_loss(pair_logits(text_emb, image_emb, temperature_scale(model)))
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return projector.project([g.unsqueeze(0) for g in grads])[0].cpu(), float(loss.detach())
