"""Scores of each pair under a reference model (the checkpoint before fine-tuning, or any CLIP).

A fine-tuned model has seen its misaligned pairs and partly memorised them; a reference model
has not, so where it knows the domain its CLIP score is out-of-sample evidence. Both numbers are
computed from the images the gradients stage already decoded (no second pass over the data):
- reference_clip_score: cosine of the pair's image and caption embeddings (CLIPScore);
- reference_negclip: negCLIPLoss (Wang et al. 2024, "CLIPLoss and norm-based data selection"):
  s_ii - (tau/2) [log sum_k exp(s_ik / tau) + log sum_k exp(s_ki / tau)], the sums over the
  pair's training batch and tau the reference's own temperature: the CLIP score minus how well
  the pair's image and caption also match the rest of the batch (generic captions and images
  that match everything get no credit).
"""
from __future__ import annotations

import torch

from ecif_core.influence.gradients import embed, temperature_scale
from ecif_core.models.runtime import flush_denormals


@torch.no_grad()
def reference_scores(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_score, negclip) per pair of one batch under `model`, float64 on the CPU."""
    with flush_denormals():
        text, image = embed(model, images, tokens)
    u = torch.nn.functional.normalize(text.double(), dim=-1)
    v = torch.nn.functional.normalize(image.double(), dim=-1)
    similarity = v @ u.T                     # s[i, k] = cos(image i, caption k)
    tau = 1.0 / float(temperature_scale(model))
    normaliser = 0.5 * tau * (torch.logsumexp(similarity / tau, dim=1) + torch.logsumexp(similarity / tau, dim=0))
    own = torch.diagonal(similarity)
    return own.cpu(), (own - normaliser).cpu()
