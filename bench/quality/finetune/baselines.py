"""Scores the benchmark computes itself, to compare the audit's rankings with what a user could do instead.

Every function returns raw values in the order of the ids it is given; `scores.BASELINE_SIGN` orients them.
- CLIPScore of the audited model, and of the reference (the base the fine-tune started from);
- reference negCLIPLoss: the base's CLIPScore minus the negCLIPLoss paper's batch normaliser
  (bench.quality.baselines.neg_clip_loss, random batches, the base's temperature);
- cross-fitted CLIPScore: K fine-tunes from the base on K-1 folds each, every pair scored by the model that
  never saw it (a memorised wrong caption cannot look aligned); costs K fine-tunes;
- self-TracIn: sum over the saved checkpoints of lr_c |grad Pos(n)|^2 with theta = the two projections
  (cheap; for a LoRA fine-tune the projections are frozen, so this is the gradient-norm proxy there);
  TracIn on the validation loss comes from the same gradients;
- own loss: Pos(n) of the pair in its training batch under the audited model.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ecif_core.influence.gradients import embed, loss_gradient, per_pair_gradients, temperature_scale
from ecif_core.influence.losses import contrastive_terms, pair_logits
from ecif_core.models.factory import LoadedModel, restrict_grad_to, select_theta
from ecif_core.influence.projection import ProjectionSpec, Projector
from ecif_core.models.runtime import flush_denormals
from ecif_core.train import TrainConfig, train

from ..baselines import embed_batches, model_tau, neg_clip_loss
from ..tensors import Batch, batch_ids


def clip_scores(loaded: LoadedModel, batches: Sequence[Batch]) -> np.ndarray:
    """Cosine of each pair's own text and image embeddings (rows in batch order)."""
    text, image = embed_batches(loaded.model, batches)
    return (text * image).sum(dim=1).numpy()


def reference_neg_clip_loss(reference: LoadedModel, batches: Sequence[Batch], batch_size: int, repeats: int,
                            seed: int) -> np.ndarray:
    """negCLIPLoss under the reference model: CLIPScore minus (tau/2)(LSE over texts + LSE over images) in
    random batches of `batch_size`, averaged over `repeats` partitions (higher = better aligned)."""
    text, image = embed_batches(reference.model, batches)
    return neg_clip_loss(image @ text.T, model_tau(reference.model), batch_size, repeats, seed)


@torch.no_grad()
def own_loss(loaded: LoadedModel, batches: Sequence[Batch]) -> np.ndarray:
    """Pos(n) = -log p_nn - log q_nn of each pair in its training batch (the batches as trained)."""
    out = []
    for b in batches:
        with flush_denormals():
            text_emb, image_emb = embed(loaded.model, b.images, b.tokens)
            pos, _ = contrastive_terms(pair_logits(text_emb, image_emb, temperature_scale(loaded.model)))
        out.append(pos.double())
    return torch.cat(out).numpy()


def tracin(models: Sequence[Callable[[], LoadedModel]], weights: Sequence[float], theta: list[str],
           train_batches: Sequence[Batch], val_batches: Sequence[Batch]) -> tuple[np.ndarray, np.ndarray]:
    """(TracIn on the mean validation loss, self-TracIn), summed over checkpoints with weights w_c.

    Exact (unprojected) gradients of theta: with the two projections that is 2 x 64 x 32 numbers per pair.
    TracIn > 0 = training on the pair lowered the validation loss; self-TracIn = sum_c w_c |g_pos|^2.
    """
    n = sum(len(b.ids) for b in train_batches)
    influence, self_influence = np.zeros(n), np.zeros(n)
    for load, weight in zip(models, weights):
        loaded = load()
        chosen = select_theta(loaded.model, theta)
        restrict_grad_to(loaded.model, chosen)
        params, projector = [p for _, p in chosen], Projector.for_theta(chosen, ProjectionSpec(None, None, 0))
        with flush_denormals():
            val_grad, count = torch.zeros(projector.dim, dtype=torch.float64), 0
            for b in val_batches:
                grad, _ = loss_gradient(loaded.model, params, projector, b.images, b.tokens)
                val_grad += grad.double()
                count += len(b.ids)
            val_grad /= max(count, 1)
            row = 0
            for b in train_batches:
                g = per_pair_gradients(loaded.model, params, projector, b.images, b.tokens, "exact")
                rows = slice(row, row + len(b.ids))
                influence[rows] += weight * ((g.pos + g.neg).double() @ val_grad).numpy()
                self_influence[rows] += weight * (g.pos.double() ** 2).sum(dim=1).numpy()
                row += len(b.ids)
    return influence, self_influence


def crossfit_folds(ids: Sequence[str], folds: int, seed: int) -> list[list[str]]:
    """`folds` disjoint random folds of the ids (sizes differ by at most one)."""
    order = np.random.default_rng(seed).permutation(len(ids))
    return [sorted(ids[i] for i in order[k::folds]) for k in range(folds)]


def crossfit_clip_scores(data: Path, config: Path, base: Path, folder: Path, cfg: TrainConfig, folds: int,
                         load: Callable[[Path], LoadedModel], batches: Sequence[Batch]) -> tuple[np.ndarray, dict]:
    """CLIPScore of every pair under the fine-tune that left its fold out (same base, recipe and partition:
    the fold is dropped from its batches with `exclude`, as a leave-out retraining). Returns the scores in
    the order of `batches` and {fold_seconds, folds}; fold models are deleted once they have scored."""
    ids = batch_ids(batches)
    position = {pair_id: i for i, pair_id in enumerate(ids)}
    scores = np.full(len(ids), np.nan)
    seconds = []
    for k, held_out in enumerate(crossfit_folds(ids, folds, cfg.seed)):
        out = folder / (f"fold{k}" if cfg.lora_rank is not None else f"fold{k}.pt")
        started = time.perf_counter()
        train(data, config, out, TrainConfig(**{**cfg.__dict__, "exclude": tuple(held_out), "checkpoints": 0}), init=base)
        fold_scores = clip_scores(load(out), batches)
        rows = [position[i] for i in held_out]
        scores[rows] = fold_scores[rows]
        seconds.append(time.perf_counter() - started)
        _remove(out)
    return scores, {"fold_seconds": seconds, "folds": folds}


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        Path(str(path) + ".json").unlink(missing_ok=True)
