"""Batched per-pair gradients equal autograd of pos[n] and neg[n] taken one at a time."""
import pytest
import torch

from ecif_core.gradients import embed, loss_gradient, per_pair_gradients
from ecif_core.losses import batch_loss, contrastive_terms, pair_logits
from ecif_core.models import restrict_grad_to, select_theta
from ecif_core.projection import Projector, ProjectionSpec, gaussian_factor
from tests.core.helpers import micro_model, random_batch


@pytest.fixture(scope="module")
def setup():
    loaded = micro_model(seed=1)
    theta = select_theta(loaded.model)
    restrict_grad_to(loaded.model, theta)
    return loaded, theta


def _one_at_a_time(loaded, params, images, tokens, neg_term):
    """Reference: a separate autograd call for every Pos(n) and Neg(n)."""
    u, v = embed(loaded.model, images, tokens)
    pos, neg = contrastive_terms(pair_logits(u, v, loaded.model.logit_scale.exp().detach()), neg_term)
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])
    g_pos = torch.stack([flat(torch.autograd.grad(pos[n], params, retain_graph=True)) for n in range(len(pos))])
    g_neg = torch.stack([flat(torch.autograd.grad(neg[n], params, retain_graph=True)) for n in range(len(neg))])
    return g_pos, g_neg, pos.detach(), neg.detach()


@pytest.mark.parametrize("neg_term,chunk", [("exact", 64), ("exact", 3), ("first_order", 5)])
def test_per_pair_gradients_match_autograd(setup, neg_term, chunk):
    loaded, theta = setup
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(None, None))
    images, tokens = random_batch(loaded, 6, seed=2)
    result = per_pair_gradients(loaded.model, params, projector, images, tokens, neg_term, chunk=chunk)
    g_pos, g_neg, pos, neg = _one_at_a_time(loaded, params, images, tokens, neg_term)
    assert result.pos.shape == g_pos.shape == (6, projector.dim)
    torch.testing.assert_close(result.pos, g_pos, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.neg, g_neg, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.pos_terms, pos)
    torch.testing.assert_close(result.neg_terms, neg)


def test_projected_gradient_is_kronecker_projection_of_the_true_one(setup):
    loaded, theta = setup
    params = [p for _, p in theta]
    names = [n for n, _ in theta]
    spec = ProjectionSpec(k_in=3, k_out=4, seed=11)
    projector = Projector(names, [p.shape for p in params], spec)
    images, tokens = random_batch(loaded, 5, seed=3)
    result = per_pair_gradients(loaded.model, params, projector, images, tokens)
    g_pos, _, _, _ = _one_at_a_time(loaded, params, images, tokens, "exact")
    # Rebuild pair 2's projection of the first 2-D block by hand: P_out G P_in^T.
    name, shape = names[0], params[0].shape
    grad = g_pos[2, : shape.numel()].reshape(shape)
    p_out = gaussian_factor(11, name, "out", 4, shape[0])
    p_in = gaussian_factor(11, name, "in", 3, shape[1])
    block = projector.blocks[0]
    torch.testing.assert_close(result.pos[2, block.start:block.stop], (p_out @ grad @ p_in.T).reshape(-1),
                               rtol=1e-4, atol=1e-6)


def test_loss_gradient_sums_pos_terms(setup):
    loaded, theta = setup
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(None, None))
    images, tokens = random_batch(loaded, 7, seed=4)
    grad, loss = loss_gradient(loaded.model, params, projector, images, tokens)
    result = per_pair_gradients(loaded.model, params, projector, images, tokens)
    torch.testing.assert_close(grad, result.pos.sum(0), rtol=1e-4, atol=1e-5)  # sum_n Pos(n) = L_batch
    u, v = embed(loaded.model, images, tokens)
    assert loss == pytest.approx(float(batch_loss(pair_logits(u, v, loaded.model.logit_scale.exp())).detach()), rel=1e-6)


def test_projection_is_regenerated_identically():
    a = gaussian_factor(3, "visual.proj", "in", 4, 10)
    assert torch.equal(a, gaussian_factor(3, "visual.proj", "in", 4, 10))
    assert not torch.equal(a, gaussian_factor(3, "text_projection", "in", 4, 10))
    assert not torch.equal(a, gaussian_factor(4, "visual.proj", "in", 4, 10))


def test_logra_factors_equal_projected_dense_gradients(setup):
    """The LoGra path (layer inputs x output-gradients) equals projecting full weight gradients."""
    from ecif_core.logra import WeightUseRecorder

    loaded, theta = setup
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(k_in=3, k_out=5, seed=7))
    images, tokens = random_batch(loaded, 6, seed=8)
    logra = per_pair_gradients(loaded.model, params, projector, images, tokens, method="logra", chunk=5)
    dense = per_pair_gradients(loaded.model, params, projector, images, tokens, method="dense")
    # float32 sums in another order: entries near zero differ by ~1e-6 on some CPUs, so the
    # absolute tolerance is 1e-5 of the largest entry (the relative one stays 1e-4).
    for ours, reference in ((logra.pos, dense.pos), (logra.neg, dense.neg)):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
    recorder = WeightUseRecorder(params)
    with recorder:
        loaded.model.encode_text(tokens), loaded.model.encode_image(images)
    recorded = {theta[u.index][0] for u in recorder.uses}
    assert {"visual.proj", "text_projection"} <= recorded and any("mlp.c_fc" in n for n in recorded)
