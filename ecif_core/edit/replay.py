"""The replay edit: the change that removing (or demoting) a set E makes to a short training run,
measured as the difference of two short trainings of theta from the audited model, one with E and
one without, on the same batches in the same order with the training's own recipe.

Why: a fine-tune stopped after a few epochs is not at a minimum of its objective. A Newton step
models retraining to convergence and mixes the removal's effect with the pull towards that
minimum; its damping then shrinks both. Retraining without E from the base is another run of the
same recipe, so what a user compares with is a difference of two trainings: A(theta_0; D \\ E) -
A(theta_0; D). The replay measures the same difference from the audited model instead of the base:

    theta_tilde = theta_hat + A(theta_hat; D \\ E) - A(theta_hat; D)

On a quadratic objective trained by gradient descent, with E's curvature small beside the rest,
A(theta; S) = theta*_S + M (theta - theta*_S) with one M = (I - eta H)^T, so both differences equal
(I - M)(theta*_{D\\E} - theta*_D) whatever the starting point: the two runs' common drift towards
the minimum cancels. A run without E alone, A(theta_hat; D \\ E) - theta_hat, keeps that drift.

The two runs are interleaved step by step (a time budget stops both after the same step, so the
difference stays one of equal-length runs). With theta within the two projections each step is a
pass over cached tower features (caches.tower_features), which is what makes the replay cheap.
docs/METHOD.md, "The replay edit".
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ecif_core.edit.solver import EditResult, LeaveOutObjective
from ecif_core.errors import ConfigError, NonFiniteResult
from ecif_core.influence.losses import batch_loss
from ecif_core.progress import Progress
from ecif_core.train import TrainConfig, batch_order, lr_factor


@dataclass(frozen=True)
class Recipe:
    """The training recipe the replay repeats: AdamW at `lr` with the trainer's warm-up and cosine
    decay over `epochs` passes of the fixed partition, batches in the trainer's order for `seed`."""

    epochs: int
    lr: float
    seed: int
    warmup_steps: int = TrainConfig.warmup_steps


def recipe_of(sidecar: dict, seed: int, epochs: int | None, lr: float | None) -> Recipe:
    """The replay's recipe: `epochs` and `lr` when given, else the training sidecar's; refused in one
    sentence when neither has them."""
    epochs = epochs if epochs is not None else sidecar.get("epochs")
    lr = lr if lr is not None else sidecar.get("lr")
    missing = [name for name, value in (("replay_epochs", epochs), ("replay_lr", lr)) if value is None]
    if missing:
        raise ConfigError(missing[0], "the checkpoint's training sidecar does not say how it was trained (epochs, lr): "
                          "give --replay-epochs and --replay-lr as the fine-tune used them, or use --method newton")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError("replay_epochs", f"must be a positive integer (the sidecar says {epochs!r})")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError("replay_lr", f"must be a positive number (the sidecar says {lr!r})")
    return Recipe(int(epochs), float(lr), int(seed))


def _step_loss(objective: LeaveOutObjective, index: int, with_set: bool) -> tuple[torch.Tensor | None, int]:
    """(L_batch of batch `index`, pairs it trains on) as the trainer computes it: the whole batch, with the set
    demoted (its own terms masked in batch_loss: a batch demoted whole still steps, on its L2 share alone), or
    with it removed (the kept pairs; None when fewer than two are left, as the trainer drops the batch)."""
    removing = not with_set and objective.action == "remove"
    found = objective.batch_logits(index, acted=removing)
    if found is None:
        return None, 0
    logits, _ = found
    demoted = objective.batches[index].chosen if not with_set and not removing else None
    return batch_loss(logits, demoted=demoted), logits.shape[0]


def replay_parameters(objective: LeaveOutObjective, recipe: Recipe, progress: Progress | None = None,
                      max_seconds: float | None = None) -> EditResult:
    """delta = A(theta_hat; without E) - A(theta_hat; with E) (module docstring), theta left at theta_hat.
    `progress`: ("step", k, steps, eta_s=...) after each pair of steps; `max_seconds`: both runs stop after
    the step that reaches it (`stopped` "time budget")."""
    pairs_acted = sum(int(b.chosen.sum()) for b in objective.batches)
    if pairs_acted == 0:
        raise ConfigError(objective.action, f"the set to {objective.action} has no pair in the training batches")
    steps = recipe.epochs * len(objective.batches)
    if progress is not None:
        progress("step", 0, steps)  # before the removal gradient: the bar's clock starts with the edit
    started = time.monotonic()
    removal_gradient, touched = objective.removal_gradient()  # its norm is the stationarity check's scale
    params = objective.params
    start = [p.detach().clone() for p in params]
    runs = {}
    for with_set in (True, False):
        used = sum(_pairs_trained(objective, i, with_set) for i in range(len(objective.batches)))
        runs[with_set] = {"state": [t.clone() for t in start], "pairs": max(used, 1),
                          "optimizer": torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)}
    order_rng = batch_order(recipe.seed)  # the trainer's batch order
    deadline = None if max_seconds is None else started + max_seconds
    done, stopped = 0, "finished"
    try:
        for _ in range(recipe.epochs):
            for index in order_rng.permutation(len(objective.batches)):
                lr = recipe.lr * lr_factor(done, recipe.warmup_steps, steps)
                for with_set, run in runs.items():
                    _one_step(objective, int(index), with_set, run, lr)
                done += 1
                now = time.monotonic()
                if progress is not None:
                    progress("step", done, steps, eta_s=(steps - done) * (now - started) / done)
                if deadline is not None and now >= deadline and done < steps:
                    stopped = "time budget"
                    break
            if stopped != "finished":
                break
    finally:
        with torch.no_grad():
            for p, t in zip(params, start):
                p.copy_(t)
    delta_flat = [a - b for a, b in zip(runs[False]["state"], runs[True]["state"])]
    if not all(bool(torch.isfinite(t).all()) for t in delta_flat):
        raise NonFiniteResult("the replay's parameter change is not finite (NaN or infinity): the edit was not "
                              "written; give a smaller --replay-lr or use --method newton")
    delta = {name: t for (name, _), t in zip(objective.theta, delta_flat)}
    return EditResult(delta=delta, damping=0.0, iterations=done, relative_residual=float("nan"),
                      negative_curvature=False, removal_gradient_norm=float(removal_gradient.norm()),
                      pairs_removed=pairs_acted, batches_touched=touched,
                      seconds={"replay": time.monotonic() - started}, stopped=stopped, action=objective.action,
                      method="replay", steps=steps)


def _pairs_trained(objective: LeaveOutObjective, index: int, with_set: bool) -> int:
    """Pairs batch `index` trains on in one run (no forward pass)."""
    chosen = objective.batches[index].chosen
    if with_set or objective.action == "demote":
        return int(chosen.numel())
    kept = int((~chosen).sum())
    return kept if kept >= 2 else 0


def _one_step(objective: LeaveOutObjective, index: int, with_set: bool, run: dict, lr: float) -> None:
    """One AdamW step of one run: its parameters swapped in, the trainer's loss (batch loss plus its share
    of the L2 term), the step, its parameters swapped out."""
    params = objective.params
    with torch.no_grad():
        for p, t in zip(params, run["state"]):
            p.copy_(t)
    loss, pairs = _step_loss(objective, index, with_set)
    if loss is None:
        return
    l2 = sum((p * p).sum() for p in params)
    total = loss + 0.5 * objective.weight_decay * l2 * (pairs / run["pairs"])
    optimizer = run["optimizer"]
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    with torch.no_grad():
        for p, t in zip(params, run["state"]):
            t.copy_(p)
