"""The retraining oracle of the fidelity experiment: frozen towers, cached features, theta refitted.

theta = the two final projections (`visual.proj`, `text_projection`, both used as `x @ W`). With
the towers frozen, each pair's embeddings are its cached projection inputs times theta, so the
contrastive part of the training objective, sum over the fixed partition of L_batch (docs/METHOD.md,
"Setting"), is evaluated exactly from the cache, all batches at once (padded, masked). `fit`
minimises it plus (l2/2)|theta - theta_0|^2 to convergence with L-BFGS in float64.

Why an L2 towards the trained projections theta_0 (L2-SP) and not the trainer's (wd/2)|theta|^2:
the logits are cosines, so L_batch is invariant to rescaling either projection and |theta|^2 only
shrinks theta towards the singular point 0, without a minimiser; and without a strong anchor the
projections alone memorise the training pairs (on the 20% shuffle model the loss falls from 3.1 to
0.8 nats per pair while the validation loss rises, and L-BFGS never converges). The anchor's
Hessian is l2 * I, which the audit of the oracle's model gets as its weight decay (sidecar), so
H = Fisher + (l2 + damping) I describes the same objective. `choose_l2` takes the smallest l2 of a
grid of powers of ten for which the fit converges: a conditioning criterion that never looks at
the fidelity it is used to measure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ecif_core.models.features import without_projections
from ecif_core.influence.gradients import embed
from ecif_core.influence.losses import group_terms, pair_logits
from ecif_core.models.runtime import flush_denormals

from .tensors import Batch

PROJECTIONS = ("visual.proj", "text_projection")


@torch.no_grad()
def tower_features(model: torch.nn.Module, batches: Sequence[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features, text features), float64, one row per pair in batch order."""
    images, texts = [], []
    with without_projections(model), flush_denormals():
        for b in batches:
            text, image = embed(model, b.images, b.tokens)
            images.append(image.double())
            texts.append(text.double())
    return torch.cat(images), torch.cat(texts)


def projection_weights(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_img, W_txt) as float64 copies."""
    return model.visual.proj.detach().double().clone(), model.text_projection.detach().double().clone()


class FeatureObjective:
    """sum over `batches` (lists of row indices) of L_batch, with u = f_txt W_txt and v = f_img W_img."""

    def __init__(self, image_features: torch.Tensor, text_features: torch.Tensor, batches: Sequence[Sequence[int]],
                 scale: float):
        if any(len(b) < 2 for b in batches) or not batches:
            raise ValueError("every batch needs at least 2 pairs")
        n = image_features.shape[0]
        width = max(len(b) for b in batches)
        index = torch.full((len(batches), width), n, dtype=torch.long)  # n = a zero row (padding)
        for row, b in enumerate(batches):
            index[row, : len(b)] = torch.as_tensor(list(b), dtype=torch.long)
        self.valid = index < n
        pad = lambda f: torch.cat([f, torch.zeros(1, f.shape[1], dtype=f.dtype)])  # noqa: E731
        self._image, self._text = pad(image_features)[index], pad(text_features)[index]
        self.image_features, self.text_features = image_features, text_features
        self.batches, self.scale, self.pairs = [list(b) for b in batches], float(scale), int(self.valid.sum())

    def __call__(self, w_img: torch.Tensor, w_txt: torch.Tensor) -> torch.Tensor:
        u = torch.nn.functional.normalize(self._text @ w_txt, dim=-1)
        v = torch.nn.functional.normalize(self._image @ w_img, dim=-1)
        logits = self.scale * (u @ v.transpose(1, 2))  # (batches, B, B): text rows, image columns
        valid_col, valid_row = self.valid[:, None, :], self.valid[:, :, None]
        log_p = torch.log_softmax(logits.masked_fill(~valid_col, float("-inf")), dim=2)
        log_q = torch.log_softmax(logits.masked_fill(~valid_row, float("-inf")), dim=1)
        diagonal = torch.diagonal(log_p, dim1=1, dim2=2) + torch.diagonal(log_q, dim1=1, dim2=2)
        return -torch.where(self.valid, diagonal, torch.zeros_like(diagonal)).sum()

    def without(self, batches: Sequence[Sequence[int]]) -> "FeatureObjective":
        """The same cached features over other batches (e.g. with removed rows dropped)."""
        return FeatureObjective(self.image_features, self.text_features, batches, self.scale)

    def batch_logits(self, batch: int, w_img: torch.Tensor, w_txt: torch.Tensor) -> torch.Tensor:
        """Logits of one batch through ecif_core.influence.losses.pair_logits (the reference path)."""
        rows = torch.as_tensor(self.batches[batch])
        return pair_logits(self.text_features[rows] @ w_txt, self.image_features[rows] @ w_img, self.scale)

    def group_gradient(self, members: dict[int, Sequence[int]], w_img: torch.Tensor,
                       w_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of sum_b [Pos(E_b) + Neg(E_b)] (losses.group_terms), E_b = positions in batch b."""
        w_img, w_txt = w_img.detach().requires_grad_(True), w_txt.detach().requires_grad_(True)
        total = sum(sum(group_terms(self.batch_logits(b, w_img, w_txt), list(e))) for b, e in members.items() if e)
        return torch.autograd.grad(total, (w_img, w_txt))


@dataclass
class Fit:
    w_img: torch.Tensor
    w_txt: torch.Tensor
    loss: float          # the contrastive part (sum of batch losses) at the fit
    max_grad: float      # max |gradient| of the full objective (with the anchor term)
    iterations: int

    @property
    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_img, self.w_txt


def fit(objective: FeatureObjective, start: tuple[torch.Tensor, torch.Tensor],
        anchor: tuple[torch.Tensor, torch.Tensor], l2: float, max_iter: int = 2000, tolerance: float = 1e-8) -> Fit:
    """L-BFGS (strong Wolfe) on objective(W) + (l2/2)|W - anchor|^2 from `start`."""
    params = [w.detach().clone().double().requires_grad_(True) for w in start]
    anchor = tuple(a.detach().double() for a in anchor)
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=tolerance, tolerance_change=1e-16,
                                  history_size=50, line_search_fn="strong_wolfe")

    def total() -> tuple[torch.Tensor, torch.Tensor]:
        loss = objective(*params)
        return loss, loss + 0.5 * l2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = total()[1]
        value.backward()
        return value

    optimizer.step(closure)
    loss, value = total()
    grads = torch.autograd.grad(value, params)
    iterations = optimizer.state[optimizer._params[0]].get("n_iter", 0)
    return Fit(params[0].detach(), params[1].detach(), float(loss.detach()),
               max(float(g.abs().max()) for g in grads), iterations)


def choose_l2(objective: FeatureObjective, anchor: tuple[torch.Tensor, torch.Tensor],
              grid: Sequence[float] = (1.0, 10.0, 100.0, 1000.0, 10000.0), max_iter: int = 500,
              converged: float = 1e-4) -> tuple[float, Fit, dict[str, float]]:
    """The smallest l2 of `grid` whose fit from the anchor converges (max |grad| <= `converged`
    within `max_iter` iterations); returns it, its fit and the final max |grad| of every try."""
    tries: dict[str, float] = {}
    for l2 in grid:
        result = fit(objective, anchor, anchor, l2, max_iter=max_iter)
        tries[str(l2)] = result.max_grad
        if result.max_grad <= converged:
            return l2, result, tries
    raise RuntimeError(f"no l2 in {list(grid)} gives a converged fit: max |grad| per l2 {tries}")
