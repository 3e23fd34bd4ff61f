"""Per-pair projected gradients g_pos(n), g_neg(n) of one batch (ECIF_MATH "Influence").

Every Pos(n) and Neg(n) depends on all 2B embeddings of the batch. We take the Jacobian of
the 2B per-pair terms with respect to the embeddings (cheap, embedding level), then push all
2B cotangent sets back through the encoders in one batched backward (vmap via
`is_grads_batched`), chunked to bound memory, and project each gradient as it appears.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .losses import NegTerm, batch_loss, contrastive_terms, pair_logits
from .logra import WeightUseRecorder, projected_from_uses
from .projection import Projector


@dataclass
class BatchGradients:
    """Projected per-pair gradients and the per-pair numbers that come for free with them."""

    pos: torch.Tensor         # (B, k)  g_pos
    neg: torch.Tensor         # (B, k)  g_neg
    pos_terms: torch.Tensor   # (B,)    Pos(n)
    neg_terms: torch.Tensor   # (B,)    Neg(n)
    clip_score: torch.Tensor  # (B,)    cosine of the pair's own embeddings


def embed(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text embeddings u, image embeddings v), unnormalised; normalisation lives in pair_logits.

    Inputs move to the model's device (a GPU worker's model lives on the GPU)."""
    device = model.logit_scale.device
    return model.encode_text(tokens.to(device)), model.encode_image(images.to(device))


def temperature_scale(model: torch.nn.Module) -> torch.Tensor:
    """1/tau = logit_scale.exp(); fixed (not in theta), so detached."""
    return model.logit_scale.detach().exp()


def embedding_cotangents(text_emb: torch.Tensor, image_emb: torch.Tensor, scale: torch.Tensor,
                         neg_term: NegTerm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d[Pos(1..B), Neg(1..B)] / d(u, v): shapes (2B, B, D) each, plus the 2B term values."""

    def terms(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.cat(contrastive_terms(pair_logits(u, v, scale), neg_term))
        return values, values

    (jac_u, jac_v), values = torch.func.jacrev(terms, argnums=(0, 1), has_aux=True)(text_emb.detach(), image_emb.detach())
    return jac_u, jac_v, values


def per_pair_gradients(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], projector: Projector,
                       images: torch.Tensor, tokens: torch.Tensor, neg_term: NegTerm = "exact",
                       chunk: int = 32, method: str = "logra") -> BatchGradients:
    """g_pos(n), g_neg(n) for every pair n of one batch, projected to (B, k) each.

    method "logra" asks autograd only for the outputs' gradients of the theta layers and projects
    from (input, output-gradient) factors; "dense" forms every full weight gradient first (the
    reference the tests compare with; also what parameters not used as linear weights get).
    """
    recorder = WeightUseRecorder(params)
    with recorder:
        text_emb, image_emb = embed(model, images, tokens)
    uses = recorder.uses if method == "logra" else []
    dense = [i for i in range(len(params)) if i not in {u.index for u in uses}]
    scale = temperature_scale(model)
    jac_u, jac_v, values = embedding_cotangents(text_emb, image_emb, scale, neg_term)
    rows = jac_u.shape[0]
    projected = []
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        inputs = [u.output for u in uses] + [params[i] for i in dense]
        grads = torch.autograd.grad((text_emb, image_emb), inputs, grad_outputs=(jac_u[start:stop], jac_v[start:stop]),
                                    is_grads_batched=True, retain_graph=stop < rows, allow_unused=True)
        grads = [torch.zeros((stop - start, *t.shape), device=t.device) if g is None else g
                 for g, t in zip(grads, inputs)]
        blocks = projected_from_uses(uses, grads[:len(uses)], projector, stop - start)
        for i, g in zip(dense, grads[len(uses):]):
            blocks[i] = projector.project_block(i, g)
        projected.append(torch.cat([blocks[i] for i in range(len(params))], dim=1))
    flat = torch.cat(projected).cpu()
    size = rows // 2
    with torch.no_grad():
        clip_score = torch.nn.functional.cosine_similarity(text_emb, image_emb, dim=-1)
    values = values.detach().cpu()
    return BatchGradients(pos=flat[:size], neg=flat[size:], pos_terms=values[:size], neg_terms=values[size:],
                          clip_score=clip_score.detach().cpu())


def loss_gradient(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], projector: Projector,
                  images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Projected gradient of one batch's contrastive loss (validation and test losses), and the loss."""
    text_emb, image_emb = embed(model, images, tokens)
    loss = batch_loss(pair_logits(text_emb, image_emb, temperature_scale(model)))
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return projector.project([g.unsqueeze(0) for g in grads])[0].cpu(), float(loss.detach())
