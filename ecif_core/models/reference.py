"""Scores of each pair under a reference model (the checkpoint before fine-tuning, or any CLIP).

A fine-tuned model has seen its misaligned pairs and partly memorised them; a reference model
has not, so where it knows the domain its CLIP score is out-of-sample evidence. Both numbers are
computed from the images the gradients stage already decoded (no second pass over the data):
- reference_clip_score: cosine of the pair's image and caption embeddings (CLIPScore);
- reference_negclip: negCLIPLoss (Wang et al. 2024, "CLIPLoss and norm-based data selection"):
  s_ii - (tau/2) [log sum_k exp(s_ik / tau) + log sum_k exp(s_ki / tau)], the sums over a batch holding
  the pair and tau the reference's own temperature: the CLIP score minus how well the pair's image and
  caption also match the rest of the batch (generic captions and images that match everything get no
  credit). Averaged over NEGCLIP_REPEATS random batchings of the pair's shard, as the paper averages
  over random batches: one batch's normaliser is noisy (on the fine-tuning benchmark the one-batch value
  ranked misaligned pairs 0.002-0.026 AUROC below the 10-batch average).
"""
from __future__ import annotations

import torch

from ecif_core.data.batching import hash_seed, rebatch_within
from ecif_core.influence.gradients import embed, temperature_scale
from ecif_core.models.runtime import flush_denormals


NEGCLIP_REPEATS = 10   # random batchings of a shard that reference_negclip averages over
NEGCLIP_STREAM = 7919  # a seed part of their own: these batchings never repeat the audit's extra partitions


@torch.no_grad()
def reference_embeddings(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised caption embeddings, normalised image embeddings) of one batch, float64 on the CPU."""
    with flush_denormals():
        text, image = embed(model, images, tokens)
    return (torch.nn.functional.normalize(text.double(), dim=-1).cpu(),
            torch.nn.functional.normalize(image.double(), dim=-1).cpu())


def reference_temperature(model: torch.nn.Module) -> float:
    """tau, the reference's own softmax temperature (1 / its logit scale)."""
    return 1.0 / float(temperature_scale(model))


def negclip_batchings(rows: int, batch_size: int, seed: int, shard: int) -> list[list[list[int]]]:
    """The NEGCLIP_REPEATS seeded random batchings of a shard's `rows` (row positions) that reference_negclip
    averages over: the same audit and shard give the same batchings."""
    return [rebatch_within(list(range(rows)), batch_size, seed=hash_seed(seed, shard, NEGCLIP_STREAM, repeat))
            for repeat in range(NEGCLIP_REPEATS)]


def averaged_negclip(text: torch.Tensor, image: torch.Tensor, tau: float,
                     batchings: list[list[list[int]]]) -> torch.Tensor:
    """negCLIPLoss of every row, averaged over `batchings` (each a partition of the rows into batches)."""
    total = torch.zeros(len(text), dtype=torch.float64)
    for batches in batchings:
        for rows in batches:
            index = torch.as_tensor(rows)
            similarity = image[index] @ text[index].T
            normaliser = 0.5 * tau * (torch.logsumexp(similarity / tau, dim=1)
                                      + torch.logsumexp(similarity / tau, dim=0))
            total[index] += torch.diagonal(similarity) - normaliser
    return total / len(batchings)
