"""Influence vs retraining (docs/METHOD.md, "What is checked").

A tiny, nearly convex CLIP-like problem: fixed class-structured text and image features,
linear projection heads (the parameters theta), cosine logits at a fixed scale, the
contrastive batch loss summed over a fixed seeded partition plus (delta/2)|theta|^2, trained
to convergence in float64 (L-BFGS, then Newton on the exact Hessian). For single pairs and
for groups, the predicted change of a clean validation loss,
    IS = grad L'(theta_hat)^T H^{-1} (g_pos + g_neg),
must rank like the change measured by retraining without them (Spearman >= 0.9), and the
exact Neg term must beat Pos-only and the published ("paper") Neg term.

Model. Each embedding is [(B + W) x ; F x]: a trained 4 x 6 head W on top of a fixed seeded
"pretrained" head B, plus 2 frozen output rows F; theta = (W_t, W_v), 48 parameters.
- pair_logits normalises embeddings. A fully trained linear head lets the optimiser drive a
  pair's embedding to ~0, where the cosine is singular and its direction free: it memorises
  the pair that way (gradients ~1e5, Hessian ~1e17; seen for a 4 x 6 head at every delta
  from 0.1 to 100, and for a 6 x 6 head on 2 of 5 seeds). The frozen rows keep |u| >= |F x|
  > 0, so the objective is smooth and its minima regular (checked on seeds 0..5).
- B makes the start point non-degenerate (with theta = 0 and no B the trained part of every
  embedding is 0, a saddle); the L2 term is then weight decay towards the pretrained head.
DELTA = 1 (top of the suggested 1e-2..1): exact H at theta_hat has condition ~1e3..5e3 over
seeds 0..5, i.e. well conditioned in float64; chosen on conditioning only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ecif_core.influence.losses import batch_loss, contrastive_terms, group_terms, pair_logits

DTYPE = torch.float64
N_CLASSES = 6
LATENT_DIM = 6
TEXT_DIM = 6
IMAGE_DIM = 6
EMB_DIM = 4  # trained output rows per head: theta = 2 x (4 x 6) = 48 parameters
FROZEN_DIM = 2  # frozen output rows per head
N_TRAIN = 128
N_VAL = 96
BATCH_SIZE = 16
LOGIT_SCALE = 5.0  # 1/tau, fixed (not trained)
DELTA = 1.0  # L2 weight on theta (see module docstring)
N_SINGLES = 64
N_GROUPS_IN_BATCH = 16
N_GROUPS_SPREAD = 12
GRAD_TOL = 1e-10
MIN_SPEARMAN = 0.9
NEG_FORMS = ("exact", "first_order", "paper", "pos_only")

ScalarFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """Features, fixed heads (base B, frozen rows F) and the fixed batch partitions."""

    train_txt: torch.Tensor
    train_img: torch.Tensor
    val_txt: torch.Tensor
    val_img: torch.Tensor
    base_txt: torch.Tensor
    base_img: torch.Tensor
    frozen_txt: torch.Tensor
    frozen_img: torch.Tensor
    batches: tuple[torch.Tensor, ...]
    val_batches: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Fit:
    """theta_hat, the exact Hessian of J there, and H^{-1} grad L'(theta_hat)."""

    theta: torch.Tensor
    hessian: torch.Tensor
    val_loss: float
    h_inv_val_grad: torch.Tensor


# ---------------------------------------------------------------- problem and objective


def _pairs(gen: torch.Generator, means: torch.Tensor, mix_txt: torch.Tensor, mix_img: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs share a latent (class mean + instance noise); each modality sees it through its own map plus its own noise."""
    labels = torch.randint(N_CLASSES, (n,), generator=gen)
    latent = means[labels] + 0.5 * torch.randn(n, LATENT_DIM, generator=gen, dtype=DTYPE)
    txt = latent @ mix_txt.T + 0.3 * torch.randn(n, TEXT_DIM, generator=gen, dtype=DTYPE)
    img = latent @ mix_img.T + 0.3 * torch.randn(n, IMAGE_DIM, generator=gen, dtype=DTYPE)
    return txt, img


def _partition(gen: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
    """A fixed seeded partition into batches of BATCH_SIZE (docs/METHOD.md, "Setting")."""
    return tuple(torch.randperm(n, generator=gen).split(BATCH_SIZE))


def make_problem(seed: int = 0) -> Problem:
    """Seeded image-text matching data with class structure, like a tiny CLIP fine-tuning set."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(N_CLASSES, LATENT_DIM, generator=gen, dtype=DTYPE)
    mix_txt = torch.randn(TEXT_DIM, LATENT_DIM, generator=gen, dtype=DTYPE) / LATENT_DIM**0.5
    mix_img = torch.randn(IMAGE_DIM, LATENT_DIM, generator=gen, dtype=DTYPE) / LATENT_DIM**0.5
    train_txt, train_img = _pairs(gen, means, mix_txt, mix_img, N_TRAIN)
    val_txt, val_img = _pairs(gen, means, mix_txt, mix_img, N_VAL)
    base_txt = torch.randn(EMB_DIM, TEXT_DIM, generator=gen, dtype=DTYPE) / TEXT_DIM**0.5
    base_img = torch.randn(EMB_DIM, IMAGE_DIM, generator=gen, dtype=DTYPE) / IMAGE_DIM**0.5
    frozen_txt = torch.randn(FROZEN_DIM, TEXT_DIM, generator=gen, dtype=DTYPE) / TEXT_DIM**0.5
    frozen_img = torch.randn(FROZEN_DIM, IMAGE_DIM, generator=gen, dtype=DTYPE) / IMAGE_DIM**0.5
    return Problem(
        train_txt, train_img, val_txt, val_img, base_txt, base_img, frozen_txt, frozen_img,
        batches=_partition(gen, N_TRAIN), val_batches=_partition(gen, N_VAL),
    )


def n_params() -> int:
    """Size of theta: both trained heads, flattened."""
    return EMB_DIM * (TEXT_DIM + IMAGE_DIM)


def embed(theta: torch.Tensor, prob: Problem, idx: torch.Tensor, val: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and image embeddings [(B + W) x ; F x] of the pairs idx (training or validation)."""
    w_txt = prob.base_txt + theta[: EMB_DIM * TEXT_DIM].reshape(EMB_DIM, TEXT_DIM)
    w_img = prob.base_img + theta[EMB_DIM * TEXT_DIM :].reshape(EMB_DIM, IMAGE_DIM)
    txt, img = (prob.val_txt[idx], prob.val_img[idx]) if val else (prob.train_txt[idx], prob.train_img[idx])
    head_txt, head_img = torch.cat([w_txt, prob.frozen_txt]), torch.cat([w_img, prob.frozen_img])
    return txt @ head_txt.T, img @ head_img.T


def logits_of(theta: torch.Tensor, prob: Problem, idx: torch.Tensor, val: bool = False) -> torch.Tensor:
    """Cosine logits of the pairs idx at the fixed logit scale."""
    return pair_logits(*embed(theta, prob, idx, val), LOGIT_SCALE)


def objective(theta: torch.Tensor, prob: Problem, batches: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """J(theta) = sum of batch losses over the given batches + (delta/2)|theta|^2."""
    data = sum(batch_loss(logits_of(theta, prob, idx)) for idx in batches if idx.numel() > 0)
    return data + 0.5 * DELTA * theta.dot(theta)


def validation_loss(theta: torch.Tensor, prob: Problem) -> torch.Tensor:
    """L'(theta): the same contrastive loss on the fixed validation batches, per validation pair."""
    return sum(batch_loss(logits_of(theta, prob, idx, val=True)) for idx in prob.val_batches) / N_VAL


def without(batches: tuple[torch.Tensor, ...], removed: set[int]) -> tuple[torch.Tensor, ...]:
    """Drop the removed pairs from their batches; every other membership stays as it was."""
    return tuple(idx[torch.tensor([int(i) not in removed for i in idx], dtype=torch.bool)] for idx in batches)


def hessian(fn: ScalarFn, theta: torch.Tensor) -> torch.Tensor:
    """Exact Hessian of a scalar function of the flat parameter vector."""
    return torch.autograd.functional.hessian(fn, theta, vectorize=True)


def _cholesky(hess: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of hess, shifted (Levenberg) only if hess is not positive definite."""
    shift = 0.0
    while True:
        chol, info = torch.linalg.cholesky_ex(hess + shift * torch.eye(len(hess), dtype=DTYPE))
        if info == 0:
            return chol
        shift = max(2.0 * shift, 1e-3)


def minimise(fn: ScalarFn, theta0: torch.Tensor, hess0: torch.Tensor | None = None, max_iter: int = 200) -> torch.Tensor:
    """Newton's method on the exact Hessian with Armijo backtracking, until |grad| < GRAD_TOL.

    The Hessian is re-evaluated only when the gradient stops shrinking fast (a chord/Newton
    hybrid): a warm start from theta_hat with hess0 = H(theta_hat) then costs a few gradients.
    The stopping rule, not the path, fixes the optimum: it is accurate to ~1e-11, far below
    the measured changes of L' (1e-5 .. 1e-2 here).
    """
    theta = theta0.detach().clone()
    chol = None if hess0 is None else _cholesky(hess0)
    previous = float("inf")
    for _ in range(max_iter):
        x = theta.clone().requires_grad_(True)
        value = fn(x)
        (grad,) = torch.autograd.grad(value, x)
        norm = float(grad.norm())
        if norm < GRAD_TOL:
            return theta
        if chol is None or norm > 0.25 * previous:
            chol = _cholesky(hessian(fn, theta))
        previous = norm
        step = -torch.cholesky_solve(grad[:, None], chol)[:, 0]
        rate, value, slope = 1.0, value.detach(), float(grad.dot(step))
        # Armijo backtracking; once the predicted decrease is below what J's rounding can
        # resolve, take the full step (the iteration then contracts the gradient directly).
        if -slope > 1e-12 * (1.0 + abs(float(value))):
            while fn(theta + rate * step) > value + 1e-4 * rate * slope and rate > 1e-10:
                rate *= 0.5
        theta = theta + rate * step
    raise AssertionError(f"Newton did not converge: |grad| = {norm:.3e}")


def lbfgs(fn: ScalarFn, theta0: torch.Tensor) -> torch.Tensor:
    """L-BFGS with strong Wolfe line search: a robust first phase from the base heads, where H is
    indefinite and plain Newton steps can overshoot; Newton (minimise) then polishes."""
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=1000, tolerance_grad=1e-4, tolerance_change=1e-12, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = fn(theta)
        value.backward()
        return value

    opt.step(closure)
    return theta.detach()


def spearman(pred: np.ndarray, actual: np.ndarray) -> float:
    """Spearman rank correlation as a float."""
    return float(spearmanr(pred, actual).statistic)


# ---------------------------------------------------------------- per-pair and group gradients


def pair_gradients(theta: torch.Tensor, prob: Problem, neg_term: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x P) gradients of Pos(n) and Neg(n), row n = global pair n, from each pair's own batch."""
    g_pos = torch.zeros(N_TRAIN, n_params(), dtype=DTYPE)
    g_neg = torch.zeros(N_TRAIN, n_params(), dtype=DTYPE)
    for idx in prob.batches:
        def terms(t: torch.Tensor, idx: torch.Tensor = idx) -> torch.Tensor:
            return torch.stack(contrastive_terms(logits_of(t, prob, idx), neg_term=neg_term))
        jac = torch.autograd.functional.jacobian(terms, theta, vectorize=True)  # 2 x B x P
        g_pos[idx], g_neg[idx] = jac[0], jac[1]
    return g_pos, g_neg


def group_parts(theta: torch.Tensor, prob: Problem, members: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Pos(E), Neg(E)): group_terms in every batch the group touches, summed over those batches."""
    pos = neg = torch.zeros((), dtype=DTYPE)
    wanted = set(members)
    for idx in prob.batches:
        local = [k for k, i in enumerate(idx.tolist()) if i in wanted]
        if local:
            p, n = group_terms(logits_of(theta, prob, idx), local)
            pos, neg = pos + p, neg + n
    return pos, neg


def group_gradient(theta: torch.Tensor, prob: Problem, members: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of Pos(E) and the exact Neg(E) (see group_parts)."""
    x = theta.clone().requires_grad_(True)
    pos, neg = group_parts(x, prob, members)
    g_pos = torch.autograd.grad(pos, x, retain_graph=True)[0]
    return g_pos, torch.autograd.grad(neg, x)[0]


def choose_groups(prob: Problem, seed: int = 1) -> tuple[list[list[int]], list[list[int]]]:
    """Seeded groups: some inside one batch, some spread over 2-3 batches (1-3 pairs per batch)."""
    gen = torch.Generator().manual_seed(seed)
    in_batch = []
    for _ in range(N_GROUPS_IN_BATCH):
        idx = prob.batches[int(torch.randint(len(prob.batches), (1,), generator=gen))]
        size = int(torch.randint(2, 6, (1,), generator=gen))
        in_batch.append(idx[torch.randperm(len(idx), generator=gen)[:size]].tolist())
    spread = []
    for _ in range(N_GROUPS_SPREAD):
        n_batches = int(torch.randint(2, 4, (1,), generator=gen))
        group: list[int] = []
        for m in torch.randperm(len(prob.batches), generator=gen)[:n_batches].tolist():
            idx = prob.batches[m]
            per_batch = int(torch.randint(1, 4, (1,), generator=gen))
            group += idx[torch.randperm(len(idx), generator=gen)[:per_batch]].tolist()
        spread.append(group)
    return in_batch, spread


def retrained_change(prob: Problem, fit: Fit, removed: list[int]) -> float:
    """L'(theta_new) - L'(theta_hat), theta_new = J without the removed pairs, warm-started at theta_hat."""
    batches = without(prob.batches, set(removed))
    theta_new = minimise(lambda t: objective(t, prob, batches), fit.theta, fit.hessian)
    return float(validation_loss(theta_new, prob)) - fit.val_loss


def reweighted_change(prob: Problem, fit: Fit, members: list[int], t: float) -> float:
    """L'(theta_t) - L'(theta_hat), theta_t minimising (1 - t) J + t J_without_E = J - t (Pos(E) + Neg(E)).

    t = 1 is the removal; d/dt at t = 0 is exactly what the first-order influence predicts,
    so a central difference in t checks the group form free of higher-order effects.
    """
    batches = without(prob.batches, set(members))
    fn = lambda th: (1.0 - t) * objective(th, prob, prob.batches) + t * objective(th, prob, batches)  # noqa: E731
    return float(validation_loss(minimise(fn, fit.theta, fit.hessian), prob)) - fit.val_loss


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """48-parameter problem: extra threads only add overhead, and stall badly on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prob() -> Problem:
    return make_problem(seed=0)


@pytest.fixture(scope="module")
def fit(prob: Problem) -> Fit:
    """Train from theta = 0 (the base heads) to convergence; exact Hessian and H^{-1} grad L'."""
    fn = lambda t: objective(t, prob, prob.batches)  # noqa: E731
    theta = minimise(fn, lbfgs(fn, torch.zeros(n_params(), dtype=DTYPE)))
    hess = hessian(fn, theta)
    x = theta.clone().requires_grad_(True)
    val = validation_loss(x, prob)
    (val_grad,) = torch.autograd.grad(val, x)
    return Fit(theta, hess, float(val.detach()), torch.linalg.solve(hess, val_grad))


@pytest.fixture(scope="module")
def per_pair(prob: Problem, fit: Fit) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(g_pos, g_neg) for every training pair at theta_hat, per Neg form (g_pos is the same in all)."""
    return {form: pair_gradients(fit.theta, prob, form) for form in ("exact", "first_order", "paper")}


@pytest.fixture(scope="module")
def singles(prob: Problem, fit: Fit, per_pair: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Predicted change of L' per Neg form, and the retrained change, for N_SINGLES seeded pairs."""
    chosen = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(2))[:N_SINGLES]
    out: dict[str, np.ndarray] = {}
    for form, (g_pos, g_neg) in per_pair.items():
        out[form] = production_influence(fit, g_pos[chosen], g_neg[chosen])["influence"]
    out["pos_only"] = production_influence(fit, per_pair["exact"][0][chosen], per_pair["exact"][1][chosen])["influence_pos"]
    out["actual"] = np.array([retrained_change(prob, fit, [int(n)]) for n in chosen])
    return out


@pytest.fixture(scope="module")
def groups(prob: Problem, fit: Fit, per_pair: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Predictions and retrained changes for seeded groups (first N_GROUPS_IN_BATCH are in one batch).

    exact: group_terms per batch. first_order / paper: these per-pair Neg forms summed over
    the members (additive, as published). sum_of_singles: the exact per-pair Neg summed over
    the members, which is not Neg(E) when members share a batch.
    """
    in_batch, spread = choose_groups(prob)
    all_groups = in_batch + spread
    out: dict[str, list[float]] = {k: [] for k in (*NEG_FORMS, "sum_of_singles", "actual")}
    for members in all_groups:
        g_pos, g_neg = group_gradient(fit.theta, prob, members)
        scored = production_influence(fit, g_pos[None], g_neg[None])
        out["exact"].append(float(scored["influence"][0]))
        out["pos_only"].append(float(scored["influence_pos"][0]))
        for form in ("first_order", "paper"):
            pos, neg = per_pair[form]
            out[form].append(float((pos[members] + neg[members]).sum(0) @ fit.h_inv_val_grad))
        pos, neg = per_pair["exact"]
        out["sum_of_singles"].append(float((pos[members] + neg[members]).sum(0) @ fit.h_inv_val_grad))
        out["actual"].append(retrained_change(prob, fit, members))
    result = {k: np.array(v) for k, v in out.items()}
    result["in_batch"] = np.arange(len(all_groups)) < len(in_batch)
    return result


def production_influence(fit: Fit, g_pos: torch.Tensor, g_neg: torch.Tensor) -> dict[str, np.ndarray]:
    """IS, IS_pos through the production scoring code (ecif_core.influence.scores.pair_scores), with the exact
    Hessian as the curvature (its eigendecomposition, no damping) and the exact validation gradient."""
    from ecif_core.influence.curvature import DampedInverse
    from ecif_core.influence.scores import pair_scores

    eigvals, eigvecs = torch.linalg.eigh(fit.hessian)
    val_grad = fit.hessian @ fit.h_inv_val_grad
    scores = pair_scores(g_pos, g_neg, DampedInverse(eigvals, eigvecs, 0.0), val_grad)
    return {name: scores[name].numpy() for name in ("influence", "influence_pos")}


def _report(name: str, res: dict[str, np.ndarray]) -> dict[str, float]:
    """Spearman of every form against retraining, printed so a failing run shows all of them."""
    rho = {form: spearman(res[form], res["actual"]) for form in NEG_FORMS}
    print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in rho.items()))
    return rho


# ---------------------------------------------------------------- tests


def test_training_converged(prob: Problem, fit: Fit) -> None:
    """theta_hat is a strict local minimum: tiny gradient, positive definite exact Hessian."""
    x = fit.theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(x, prob, prob.batches), x)
    eig = torch.linalg.eigvalsh(fit.hessian)
    base = float(validation_loss(torch.zeros_like(fit.theta), prob))
    print(
        f"|grad J| = {float(grad.norm()):.2e}, H eigenvalues in [{float(eig[0]):.4f}, {float(eig[-1]):.1f}], "
        f"L'(theta_hat) = {fit.val_loss:.4f}, L'(base heads) = {base:.4f}"
    )
    assert grad.norm() < GRAD_TOL
    assert eig[0] > 0, f"H not positive definite: smallest eigenvalue {float(eig[0]):.3e}"
    assert fit.val_loss < base, "training did not improve the validation loss"


def test_removal_identity_at_theta_hat(prob: Problem, fit: Fit) -> None:
    """J without a group == J - Pos(E) - Neg(E) (exact form); this is what the influence linearises."""
    for members in (choose_groups(prob)[0][0], choose_groups(prob)[1][0]):
        full = objective(fit.theta, prob, prob.batches)
        reduced = objective(fit.theta, prob, without(prob.batches, set(members)))
        pos, neg = group_parts(fit.theta, prob, members)
        torch.testing.assert_close(full - pos - neg, reduced, rtol=1e-12, atol=1e-10)


def test_single_pairs_track_retraining(singles: dict[str, np.ndarray]) -> None:
    """Spearman(predicted, retrained change of L') >= 0.9 over single pairs, exact Neg."""
    rho = _report("singles", singles)
    assert rho["exact"] >= MIN_SPEARMAN, f"singles Spearman {rho}"


def test_groups_track_retraining(groups: dict[str, np.ndarray]) -> None:
    """Spearman >= 0.9 over groups (in one batch and spread over batches), exact group Neg."""
    rho = _report("groups", groups)
    assert len(groups["actual"]) >= 20
    assert rho["exact"] >= MIN_SPEARMAN, f"groups Spearman {rho}"


def test_exact_neg_beats_pos_only_and_paper(singles: dict[str, np.ndarray], groups: dict[str, np.ndarray]) -> None:
    """The exact Neg term ranks removals better than ignoring Neg and than the published Neg."""
    for name, res in (("singles", singles), ("groups", groups)):
        rho = _report(name, res)
        assert rho["exact"] > rho["pos_only"], f"{name}: {rho}"
        assert rho["exact"] > rho["paper"], f"{name}: {rho}"


def test_group_form_is_not_sum_of_singles(prob: Problem, fit: Fit, groups: dict[str, np.ndarray]) -> None:
    """Inside one batch, group influence differs from the summed single influences, and it alone
    is the derivative of retraining along J - t (Pos(E) + Neg(E)) (central difference in t)."""
    mask = groups["in_batch"]
    group, summed, actual = groups["exact"][mask], groups["sum_of_singles"][mask], groups["actual"][mask]
    gap = np.abs(group - summed).max()
    print(f"in-batch groups: max |group - sum| = {gap:.3e}, max |actual| = {np.abs(actual).max():.3e}")
    assert gap > 1e-3 * np.abs(actual).max(), "group form equals the sum of single-pair forms"

    t = 1e-3
    in_batch, _ = choose_groups(prob)
    slope = np.array([(reweighted_change(prob, fit, m, t) - reweighted_change(prob, fit, m, -t)) / (2 * t) for m in in_batch])
    err_group, err_sum = np.abs(group - slope).max(), np.abs(summed - slope).max()
    print(f"d/dt retraining: max |slope| = {np.abs(slope).max():.3e}, max error group = {err_group:.3e}, sum = {err_sum:.3e}")
    assert err_group < 1e-3 * np.abs(slope).max(), "group form is not the derivative of retraining"
    assert err_sum > 1e-2 * np.abs(slope).max(), "sum of singles unexpectedly matches the derivative"


# ---------------------------------------------------------------- the seed's Algorithm 3 (CLIP-score self-influence)

N_CLIP_SINGLES = 24


def own_cosine(theta: torch.Tensor, prob: Problem, n: int) -> torch.Tensor:
    """cos(u_n, v_n) of training pair n under theta."""
    u, v = embed(theta, prob, torch.tensor([n]))
    return torch.nn.functional.cosine_similarity(u, v, dim=-1)[0]


def test_self_influence_clip_predicts_the_cosine_change_of_retraining(prob: Problem, fit: Fit,
                                                                       per_pair: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Production pair_scores' self_influence_clip = C_n^T H^-1 (g_pos + g_neg), C_n = grad [1 - cos(u_n, v_n)]
    (autograd here), is the predicted drop of the pair's own cosine when it is removed: it must rank
    like the drop measured by retraining without the pair (Spearman >= 0.9), match its size, and the
    predicted cosine without the pair (clip_score_loo) must be closer to the retrained cosine than the
    in-sample cosine is."""
    from ecif_core.influence.curvature import DampedInverse
    from ecif_core.influence.scores import pair_scores

    chosen = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(5))[:N_CLIP_SINGLES].tolist()
    g_pos, g_neg = (g[chosen] for g in per_pair["exact"])
    g_clip = torch.stack([torch.autograd.grad(1 - own_cosine(x, prob, n), x)[0]
                          for n in chosen for x in [fit.theta.clone().requires_grad_(True)]])
    eigvals, eigvecs = torch.linalg.eigh(fit.hessian)
    inverse = DampedInverse(eigvals, eigvecs, 0.0)   # the exact Hessian: no damping needed
    predicted = pair_scores(g_pos, g_neg, inverse, None, g_clip=g_clip)["self_influence_clip"].numpy()
    before = np.array([float(own_cosine(fit.theta, prob, n)) for n in chosen])
    after = []
    for n in chosen:
        batches = without(prob.batches, {n})
        theta_new = minimise(lambda t: objective(t, prob, batches), fit.theta, fit.hessian)
        after.append(float(own_cosine(theta_new, prob, n)))
    actual_drop = before - np.array(after)
    rho = spearman(predicted, actual_drop)
    print(f"self_influence_clip vs retrained cosine drop: spearman {rho:.4f}, "
          f"median ratio {np.median(predicted / actual_drop):.3f}")
    assert rho >= MIN_SPEARMAN
    assert 0.5 < float(np.median(predicted / actual_drop)) < 2.0
    loo_error = np.abs(before - predicted - np.array(after)).mean()
    assert loo_error < 0.5 * np.abs(actual_drop).mean()
