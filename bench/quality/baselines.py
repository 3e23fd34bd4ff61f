"""Baseline rankings the audit is compared with: CLIPScore / negCLIPLoss embeddings and TracIn.

Sign conventions (raw values; `detection` turns them into "higher = more suspicious"):
- neg_clip_loss: higher = better aligned (Wang et al. 2024); the lowest are suspicious.
- tracin: TracIn of a pair on the validation loss, sum_c w_c (g_pos + g_neg)(z) . g_val; positive =
  training on z lowered the validation loss (a proponent), so the lowest are harmful.
- self_tracin: sum_c w_c |g_pos(z)|^2, the classic mislabel detector (highest = suspicious).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ecif_core.data.batching import hash_seed, rebatch_within
from ecif_core.influence.gradients import embed, loss_gradient, per_pair_gradients, temperature_scale
from ecif_core.models.factory import load_model, restrict_grad_to, select_theta
from ecif_core.influence.projection import ProjectionSpec, Projector
from ecif_core.models.runtime import flush_denormals
from ecif_core.train import lr_factor, snapshot_epochs  # the trainer's own schedule and snapshot epochs

from .tensors import Batch


@torch.no_grad()
def embed_batches(model: torch.nn.Module, batches: Sequence[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised text embeddings, normalised image embeddings), rows in batch order."""
    texts, images = [], []
    for b in batches:
        with flush_denormals():
            u, v = embed(model, b.images, b.tokens)
        texts.append(torch.nn.functional.normalize(u.double(), dim=-1))
        images.append(torch.nn.functional.normalize(v.double(), dim=-1))
    return torch.cat(texts), torch.cat(images)


def neg_clip_loss(similarity: torch.Tensor, tau: float, batch_size: int, repeats: int, seed: int) -> np.ndarray:
    """negCLIPLoss_i = s_ii - (tau/2)[log sum_k exp(s_ik/tau) + log sum_k exp(s_ki/tau)], the sums over a
    random batch holding i, averaged over `repeats` random partitions of all pairs into batches.

    `similarity[i, k]` = cosine(image i, text k). A partition leaves no pair alone (a trailing single
    pair joins the previous batch, batching.rebatch_within).
    """
    n = similarity.shape[0]
    s = similarity.to(torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for r in range(repeats):
        for group in rebatch_within(list(range(n)), batch_size, seed=hash_seed(seed, r)):
            idx = torch.as_tensor(group)
            block = s[idx][:, idx] / tau
            norm = 0.5 * tau * (torch.logsumexp(block, dim=1) + torch.logsumexp(block, dim=0))
            total[idx] += torch.diagonal(s[idx][:, idx]) - norm
    return (total / repeats).numpy()


def checkpoint_weights(epochs: int, count: int, steps_per_epoch: int, lr: float, warmup: int) -> list[float]:
    """w_c = (sum of the learning rate over the steps between checkpoint c-1 and c) / steps per epoch:
    the summed step size of the visits to one pair that checkpoint c stands for (one visit per epoch)."""
    total = epochs * steps_per_epoch
    weights, previous = [], 0
    for epoch in sorted(snapshot_epochs(epochs, count)):
        steps = range(previous * steps_per_epoch, epoch * steps_per_epoch)
        weights.append(sum(lr * lr_factor(s, warmup, total) for s in steps) / steps_per_epoch)
        previous = epoch
    return weights


@dataclass
class TracIn:
    ids: list[str]
    tracin: np.ndarray
    self_tracin: np.ndarray
    weights: list[float]


def tracin_scores(config: str | Path | dict, checkpoints: Sequence[str | Path], weights: Sequence[float],
                  theta: list[str] | None, spec: ProjectionSpec, train: Sequence[Batch], val: Sequence[Batch],
                  neg_term: str = "exact") -> TracIn:
    """TracIn-CP over the checkpoints with the audit's theta and projection (Pruthi et al. 2020):
    per-pair gradients of the pair's two roles, Pos(n) + Neg(n), against the mean validation loss."""
    if len(checkpoints) != len(weights) or not checkpoints:
        raise ValueError(f"need one weight per checkpoint, got {len(weights)} for {len(checkpoints)}")
    n = sum(len(b.ids) for b in train)
    tracin, self_tracin = np.zeros(n), np.zeros(n)
    for checkpoint, weight in zip(checkpoints, weights):
        loaded = load_model(config=config, checkpoint=checkpoint)
        chosen = select_theta(loaded.model, theta)
        restrict_grad_to(loaded.model, chosen)
        params, projector = [p for _, p in chosen], Projector.for_theta(chosen, spec)
        with flush_denormals():
            val_grad = _mean_loss_gradient(loaded.model, params, projector, val)
            row = 0
            for b in train:
                g = per_pair_gradients(loaded.model, params, projector, b.images, b.tokens, neg_term)
                rows = slice(row, row + len(b.ids))
                tracin[rows] += weight * ((g.pos + g.neg).double() @ val_grad).numpy()
                self_tracin[rows] += weight * (g.pos.double() ** 2).sum(dim=1).numpy()
                row += len(b.ids)
    return TracIn([i for b in train for i in b.ids], tracin, self_tracin, list(weights))


def _mean_loss_gradient(model: torch.nn.Module, params: list, projector: Projector, batches: Sequence[Batch]) -> torch.Tensor:
    """Projected gradient of the mean validation loss per pair (the audit's validation stage)."""
    total, count = torch.zeros(projector.dim, dtype=torch.float64), 0
    for b in batches:
        grad, _ = loss_gradient(model, params, projector, b.images, b.tokens)
        total += grad.double()
        count += len(b.ids)
    return total / count


def model_tau(model: torch.nn.Module) -> float:
    """tau = 1 / logit_scale.exp() of the audited model."""
    return float(1.0 / temperature_scale(model))
