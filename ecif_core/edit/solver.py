"""The model edit: remove (or demote) a set of training pairs without retraining (the seed's
Algorithm 1 line 11; docs/METHOD.md, "Removing pairs: the model edit" and "Demotion").

theta_tilde = theta_hat + (H + lambda I)^-1 (grad Pos(E) + grad Neg(E)), in the model's own
parameter space (the projected curvature of the scores cannot be mapped back to parameters).
H is the exact Hessian of the objective WITHOUT E at theta_hat: the sum over the fixed partition
of L_batch with E's pairs dropped from their batches, plus (delta/2)|theta|^2. With that H the
edit is exactly one Newton step of the leave-out objective from theta_hat, which is what makes it
equal retraining on a quadratic and track it on a nearly convex problem; for a small E it differs
from the full objective's Hessian by E's own curvature only. The linear system is solved by
conjugate gradients on Hessian-vector products (Pearlmutter: double backward), so nothing of size
|theta|^2 is ever formed; a direction of negative curvature (a non-convex objective) stops CG there
(truncated CG, Steihaug) and is reported. Pos(E) and Neg(E) use the exact group form, so pairs of E
that share a batch are removed together.

Demoting E keeps its pairs in their batches as in-batch negatives and drops their own terms:
the objective J_D differs from the full one by Pos(E) alone, so the step is
(H_D + lambda I)^-1 grad Pos(E), with H_D the Hessian of the demoted objective (batch_loss with
`demoted`), the same Newton argument with Neg(E) left out.

When theta is only the two final projections (`visual.proj`, `text_projection`, both `x @ W`),
every batch's tower outputs are computed once and each Hessian-vector product is a pass over those
cached features: the same numbers at a fraction of the cost (tested against the full forward).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ecif_core.errors import ConfigError, NonFiniteResult
from ecif_core.influence.gradients import embed, temperature_scale
from ecif_core.edit.settings import SETTING, EditSettings
from ecif_core.edit.removal import ACTIONS, Action
from ecif_core.influence.losses import batch_loss, group_terms, pair_logits
from ecif_core.edit.caches import is_head_only, tower_features, trunk_outputs
from ecif_core.progress import Progress
from ecif_core.models.features import projected
from ecif_core.models.theta import PROJECTIONS


@dataclass
class TrainingBatch:
    """One batch of the fixed partition: its inputs and which of its pairs are in the set E (to remove
    or to demote: LeaveOutObjective.action)."""

    images: torch.Tensor
    tokens: torch.Tensor
    chosen: torch.Tensor  # bool per pair

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.tokens


class StreamedBatch:
    """A TrainingBatch whose inputs are read from their source each time they are used (`inputs`), so the
    edit keeps no batch of images in memory: with the feature cache they are read once (the cache is built
    batch by batch), otherwise once per conjugate-gradient product; not at all when the audit kept the towers'
    features (`stored_features`). `load` returns (images, tokens)."""

    def __init__(self, load: Callable[[], tuple[torch.Tensor, torch.Tensor]], chosen: torch.Tensor,
                 stored_features: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.inputs, self.chosen = load, chosen
        self.stored_features = stored_features  # (image, text) features the audit kept (caches.tower_features)


STOPS = ("converged", "max iterations", "negative curvature", "time budget", "finished")  # why the solve ended
# (edit.json `stopped`; "finished": the replay ran its whole recipe)
# LeaveOutObjective.curvature: the exact Hessian (the default, first) or Gauss-Newton (positive semi-definite)
CURVATURES = ("hessian", "gauss-newton")


@dataclass
class CGResult:
    solution: torch.Tensor
    iterations: int
    relative_residual: float
    negative_curvature: bool
    stopped: str = "converged"  # one of STOPS


@dataclass
class EditResult:
    """theta_tilde - theta_hat per parameter, and what the solve did."""

    delta: dict[str, torch.Tensor]
    damping: float
    iterations: int
    relative_residual: float
    negative_curvature: bool
    removal_gradient_norm: float
    pairs_removed: int  # the pairs of E (removed, or demoted: `action`)
    batches_touched: int
    seconds: dict[str, float] = field(default_factory=dict)
    dampings_tried: list[float] = field(default_factory=list)
    stopped: str = "converged"  # one of STOPS
    action: Action = "remove"
    removal_curvature: float | None = None  # |g.Hg| / g.g along the removal gradient g (lambda's scale)
    method: str = "newton"  # one of METHODS: how delta was found
    steps: int | None = None  # the replay's planned steps per run (iterations: the steps done)

    def summary(self) -> dict:
        pairs = "pairs_removed" if self.action == "remove" else "pairs_demoted"
        if self.method == "replay":
            return {"action": self.action, "method": self.method, "replay_steps": self.steps,
                    "steps_done": self.iterations, "stopped": self.stopped,
                    "removal_gradient_norm": self.removal_gradient_norm, pairs: self.pairs_removed,
                    "batches_touched": self.batches_touched, "parameter_change_norm": _norm(self.delta),
                    "seconds": self.seconds}
        return {"action": self.action, "method": self.method, "damping": self.damping, "dampings_tried": self.dampings_tried,
                "cg_iterations": self.iterations, "cg_relative_residual": self.relative_residual,
                "stopped": self.stopped, "negative_curvature": self.negative_curvature,
                "removal_gradient_norm": self.removal_gradient_norm, "removal_curvature": self.removal_curvature,
                pairs: self.pairs_removed,
                "batches_touched": self.batches_touched, "parameter_change_norm": _norm(self.delta),
                "seconds": self.seconds}


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(sum(float((t.double() ** 2).sum()) for t in tensors.values()) ** 0.5)


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, tolerance: float,
                       max_iterations: int, first_product: torch.Tensor | None = None,
                       progress: Progress | None = None, deadline: float | None = None) -> CGResult:
    """Solve A x = b for a symmetric A given by products; stops at a direction of non-positive
    curvature, keeping the iterate reached so far (zero if it is the first direction) and saying so.

    `first_product`: A b when the caller already has it (saves one product: x0 = 0, so p0 = b).
    `progress`: ("iteration", i, max_iterations, residual=|r_i| / |b|, eta_s=...) after each iteration.
    `deadline` (time.monotonic()): stop after the iteration that reaches it (always one at least),
    keeping that iterate: `stopped` is then "time budget"."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr, b_norm = float(r @ r), float(b.norm())
    if b_norm == 0.0:
        return CGResult(x, 0, 0.0, False)
    started = time.monotonic()
    for iteration in range(1, max_iterations + 1):
        ap = first_product if (iteration == 1 and first_product is not None) else matvec(p)
        curvature = float(p @ ap)
        if curvature <= 0:
            return CGResult(x, iteration - 1, float(r.norm()) / b_norm, True, "negative curvature")
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = float(r @ r)
        residual, now = rr_new ** 0.5 / b_norm, time.monotonic()
        if progress is not None:
            progress("iteration", iteration, max_iterations, residual=residual,
                     eta_s=cg_eta(now - started, iteration, max_iterations, residual, tolerance, deadline, now))
        if residual <= tolerance:
            return CGResult(x, iteration, residual, False, "converged")
        if deadline is not None and now >= deadline:
            return CGResult(x, iteration, residual, False, "time budget")
        p = r + (rr_new / rr) * p
        rr = rr_new
    return CGResult(x, max_iterations, rr ** 0.5 / b_norm, False, "max iterations")


def cg_eta(elapsed: float, iteration: int, max_iterations: int, residual: float, tolerance: float,
           deadline: float | None, now: float) -> float:
    """Seconds CG still needs: the iterations left at the mean time per iteration so far, where the
    iterations left follow the residual's mean geometric decay to the tolerance (at most the
    iteration cap), and never beyond the time budget."""
    left = max_iterations - iteration
    if 0 < residual < 1:
        rate = math.log(residual) / iteration  # log-residual per iteration (< 0)
        left = min(left, max(0, math.ceil(math.log(tolerance / residual) / rate)))
    eta = left * elapsed / iteration
    return max(0.0, min(eta, deadline - now)) if deadline is not None else eta


class LeaveOutObjective:
    """J_E(theta) = sum over batches of L_batch(pairs not in E) + (delta/2)|theta|^2, around theta_hat
    (action "remove"); with action "demote", J_D = sum of L_batch with E's Pos terms dropped and E
    kept in every softmax (losses.batch_loss(demoted=...)).

    A batch left with fewer than two pairs contributes nothing, as in training (batching.training_batches).
    """

    def __init__(self, model: torch.nn.Module, theta: Sequence[tuple[str, torch.nn.Parameter]],
                 batches: Sequence[TrainingBatch], weight_decay: float, use_feature_cache: bool | None = None,
                 action: Action = "remove", curvature: str = CURVATURES[0]):
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if curvature not in CURVATURES:
            raise ConfigError("curvature", f"must be one of {', '.join(CURVATURES)} (got {curvature!r})")
        self.model, self.theta, self.batches, self.weight_decay = model, list(theta), list(batches), weight_decay
        self.action, self.curvature = action, curvature
        self.params = [p for _, p in self.theta]
        self.scale = temperature_scale(model)
        head_only = is_head_only(model, self.theta)
        if use_feature_cache and not head_only:
            raise ConfigError("edit.theta", f"the feature cache needs theta within {PROJECTIONS[:2]}")
        self._features = tower_features(model, self.batches) if head_only and use_feature_cache is not False else None
        self._trunk, self._trunk_outputs = None, None
        if self._features is None and use_feature_cache is not False:
            self._trunk, self._trunk_outputs = trunk_outputs(model, self.params, self.batches)

    @property
    def uses_feature_cache(self) -> bool:
        return self._features is not None

    @property
    def uses_trunk_cache(self) -> bool:
        """theta starts inside the towers' blocks and the blocks below it run once, not once per product."""
        return self._trunk_outputs is not None

    def flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])

    def unflat(self, vector: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(vector[start:start + p.numel()].reshape(p.shape).to(p.dtype))
            start += p.numel()
        return out

    def _embeddings(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) of batch `index`, differentiable in theta."""
        if self._features is None:
            b = self.batches[index]
            if self._trunk_outputs is None:
                return embed(self.model, *b.inputs())
            with self._trunk.replay_outputs(self._trunk_outputs[index]):
                return embed(self.model, *b.inputs())
        return projected(self.model, *self._features[index])

    def removal_gradient(self) -> tuple[torch.Tensor, int]:
        """(grad of what acting on E takes out of the objective, summed over batches; batches touched):
        Pos(E) + Neg(E) for a removal, Pos(E) alone for a demotion, in the exact group form."""
        total, touched = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float64), 0
        for index, b in enumerate(self.batches):
            members = torch.nonzero(b.chosen).flatten()
            if members.numel() == 0:
                continue
            u, v = self._embeddings(index)
            pos, neg = group_terms(pair_logits(u, v, self.scale), members)
            grads = torch.autograd.grad(pos + neg if self.action == "remove" else pos, self.params, allow_unused=True)
            total += self.flat([torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)])
            touched += 1
        return total, touched

    def full_objective_gradient(self) -> torch.Tensor:
        """grad J(theta) of the objective WITH every pair (L2 towards 0 as the trainer has it). The edit
        assumes it is ~0 (a trained optimum); its size next to the removal gradient says how far off."""
        total = self.weight_decay * self.flat([p.detach() for p in self.params])
        for index in range(len(self.batches)):
            u, v = self._embeddings(index)
            grads = torch.autograd.grad(batch_loss(pair_logits(u, v, self.scale)), self.params, allow_unused=True)
            total += self.flat([torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)])
        return total

    def batch_logits(self, index: int, acted: bool = True) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(logits, demoted mask or None) of batch `index` in the objective with the set acted on (`acted`),
        or in the whole objective before it; None when the batch adds nothing."""
        if acted:
            return self._batch_logits(index)
        if len(self.batches[index].chosen) < 2:
            return None
        u, v = self._embeddings(index)
        return pair_logits(u, v, self.scale), None

    def curvature_product(self, vector: torch.Tensor) -> torch.Tensor:
        """The product CG uses: the exact Hessian's, or the Gauss-Newton matrix's (`curvature`)."""
        if self.curvature == CURVATURES[1]:
            return self.gauss_newton_vector_product(vector)
        return self.hessian_vector_product(vector)

    def _batch_logits(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(logits of batch `index` in the objective, demoted mask or None); None when it adds nothing."""
        b = self.batches[index]
        keep = ~b.chosen if self.action == "remove" else torch.ones_like(b.chosen)
        if int(keep.sum()) < 2 or bool(b.chosen.all()) and self.action == "demote":
            return None
        with _twice_differentiable_attention():  # both products differentiate a backward pass
            u, v = self._embeddings(index)
        if self.action == "remove":
            return pair_logits(u[keep], v[keep], self.scale), None
        return pair_logits(u, v, self.scale), b.chosen

    def _sum_over_batches(self, vector: torch.Tensor, batch_product: Callable) -> torch.Tensor:
        """delta * vector plus, over the batches that add to the objective, batch_product(logits, demoted,
        tangent): one batch's product as per-parameter tensors (None entries: unused), or None for nothing."""
        tangent = self.unflat(vector)
        total = self.weight_decay * vector.clone()
        for index in range(len(self.batches)):
            found = self._batch_logits(index)
            if found is None:
                continue
            products = batch_product(*found, tangent)
            if products is not None:
                total += self.flat([torch.zeros_like(p) if h is None else h for h, p in zip(products, self.params)])
        return total

    def gauss_newton_vector_product(self, vector: torch.Tensor) -> torch.Tensor:
        """(sum over batches of J^T H_z J + delta I) @ vector: J the Jacobian of a batch's logits in theta,
        H_z the Hessian of its loss in the logits (positive semi-definite: log-sum-exps of the logits,
        minus linear terms). The network's own second derivatives are left out, so the matrix is PSD
        and CG meets no negative curvature; it is not the Newton step of a quadratic (the Hessian's is)."""
        def batch_product(logits: torch.Tensor, demoted: torch.Tensor | None, tangent: list[torch.Tensor]):
            if not logits.requires_grad:
                return None
            dual = torch.zeros_like(logits, requires_grad=True)  # J v by the double-vjp trick
            pulled = torch.autograd.grad(logits, self.params, grad_outputs=dual, create_graph=True, allow_unused=True)
            dot = sum((g * t).sum() for g, t in zip(pulled, tangent) if g is not None)
            jv = torch.autograd.grad(dot, dual, retain_graph=True)[0]
            z = logits.detach().requires_grad_(True)
            dz = torch.autograd.grad(batch_loss(z, demoted=demoted), z, create_graph=True)[0]
            hjv = torch.autograd.grad((dz * jv).sum(), z)[0]
            return torch.autograd.grad(logits, self.params, grad_outputs=hjv, allow_unused=True)

        return self._sum_over_batches(vector, batch_product)

    def hessian_vector_product(self, vector: torch.Tensor) -> torch.Tensor:
        """(Hessian of J_E, or J_D, at the current theta) @ vector, by double backward, batch by batch."""
        def batch_product(logits: torch.Tensor, demoted: torch.Tensor | None, tangent: list[torch.Tensor]):
            grads = torch.autograd.grad(batch_loss(logits, demoted=demoted), self.params, create_graph=True,
                                        allow_unused=True)
            dot = sum((g * t).sum() for g, t in zip(grads, tangent) if g is not None)
            if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                return None
            return torch.autograd.grad(dot, self.params, allow_unused=True)

        return self._sum_over_batches(vector, batch_product)


def _twice_differentiable_attention() -> contextlib.AbstractContextManager:
    """The math kernel of scaled_dot_product_attention: the fused (flash / efficient) kernels have no
    double backward, which Hessian-vector products need."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


DAMPING_RETRIES = 4  # each multiplies lambda by 10


def edit_parameters(objective: LeaveOutObjective, settings: EditSettings, progress: Progress | None = None) -> EditResult:
    """delta = (H_E + lambda I)^-1 grad(Pos(E) + Neg(E)) at theta_hat, by CG on Hessian-vector products
    (a demotion: (H_D + lambda I)^-1 grad Pos(E); LeaveOutObjective.action).

    A non-convex objective can show CG a direction of negative curvature, where the Newton step is
    undefined and the iterate reached so far overshoots (bench.edit: 8-79x the retrained change).
    Then lambda is raised tenfold and the solve restarted, up to DAMPING_RETRIES times; the record
    keeps every lambda tried, and `negative_curvature` stays true only if the last one failed too.
    `progress`: each CG iteration with its relative residual (a retry starts again at iteration 1).
    `settings.max_seconds`: a budget from this call on; CG stops at it with the iterate reached
    (`stopped` "time budget"), and no damping retry starts after it.
    """
    settings.validate()
    deadline = None if settings.max_seconds is None else time.monotonic() + settings.max_seconds
    pairs_removed = sum(int(b.chosen.sum()) for b in objective.batches)
    if pairs_removed == 0:
        raise ConfigError(objective.action, f"the set to {objective.action} has no pair in the training batches")
    seconds: dict[str, float] = {}
    if progress is not None:
        progress("iteration", 0, settings.max_iterations)  # the removal gradient and the first product come first
    started = time.perf_counter()
    b, touched = objective.removal_gradient()
    seconds["removal_gradient"] = time.perf_counter() - started
    started = time.perf_counter()
    hb = objective.curvature_product(b)
    bb = float(b @ b)
    rayleigh = abs(float(b @ hb)) / bb if bb > 0 else 0.0  # the curvature along the removal gradient
    damping = settings.damping if settings.damping is not None else settings.damping_per_removal_curvature * rayleigh
    tried = []
    for _ in range(DAMPING_RETRIES + 1):
        tried.append(damping)
        result = conjugate_gradient(lambda x, lam=damping: objective.curvature_product(x) + lam * x, b,
                                    settings.tolerance, settings.max_iterations, first_product=hb + damping * b,
                                    progress=progress, deadline=deadline)
        if not result.negative_curvature:
            break
        if deadline is not None and time.monotonic() >= deadline:
            result.stopped = "time budget"  # no retry left: the iterate before the bad direction stands
            break
        damping = 10 * damping if damping > 0 else SETTING["damping_per_removal_curvature"].default * (rayleigh or 1.0)
    seconds["solve"] = time.perf_counter() - started
    if not bool(torch.isfinite(result.solution).all()):
        raise NonFiniteResult(f"the parameter change is not finite (NaN or infinity) with lambda {tried[-1]:g}; "
                              "the edit was not written")
    delta = {name: t for (name, _), t in zip(objective.theta, objective.unflat(result.solution))}
    return EditResult(delta=delta, damping=tried[-1], iterations=result.iterations,
                      relative_residual=result.relative_residual, negative_curvature=result.negative_curvature,
                      removal_gradient_norm=bb ** 0.5, pairs_removed=pairs_removed, batches_touched=touched,
                      seconds=seconds, dampings_tried=tried, stopped=result.stopped, action=objective.action,
                      removal_curvature=rayleigh)


@torch.no_grad()
def apply_delta(theta: Sequence[tuple[str, torch.nn.Parameter]], delta: dict[str, torch.Tensor], sign: float = 1.0) -> None:
    """theta += sign x delta in place (sign -1 undoes an edit)."""
    for name, p in theta:
        p.add_(delta[name].to(p.dtype).to(p.device), alpha=sign)
