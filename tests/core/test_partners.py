"""The top-m partner approximation (ecif_core/influence/partners.py) against independent computations."""
import pytest
import torch

from ecif_core.influence.cotangents import _all_cotangents, softmax_parts
from ecif_core.influence.gradients import embed, per_pair_gradients, temperature_scale
from ecif_core.influence.losses import pair_logits
from ecif_core.influence.partners import partner_gradients, partner_sets
from ecif_core.influence.projection import Projector, ProjectionSpec
from ecif_core.models.factory import restrict_grad_to, select_theta
from tests.core.test_gradients import _tiny_batch, _tiny_clip

BLOCKS = ["blocks:2"]  # the last two blocks + the projections: the paths through blocks


@pytest.fixture(scope="module")
def tiny():
    loaded = _tiny_clip()
    theta = select_theta(loaded.model, BLOCKS)
    restrict_grad_to(loaded.model, theta)
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(None, None))
    images, tokens = _tiny_batch(loaded, 7, seed=4)
    return loaded, params, projector, images, tokens


def _kept_items_reference(loaded, params, images, tokens, support):
    """g(n) with pair n's exact embedding cotangents kept on the items of S_n only: one autograd
    call per pair and term through the whole batch (no gathered batch, no LoGra factors)."""
    u, v = embed(loaded.model, images, tokens)
    jac_u, jac_v, _ = _all_cotangents(u.detach(), v.detach(), temperature_scale(loaded.model), "exact")
    size = len(tokens)
    out = torch.zeros(3, size, sum(p.numel() for p in params), dtype=torch.float64)
    for t in range(3):
        for n in range(size):
            mask = torch.zeros(size, 1, dtype=torch.float64)
            mask[support[n]] = 1.0
            target = (jac_u[t * size + n] * mask * u).sum() + (jac_v[t * size + n] * mask * v).sum()
            grads = torch.autograd.grad(target, params, retain_graph=True, allow_unused=True)
            out[t, n] = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])
    return out


@pytest.mark.parametrize("partners,pairs_per_slice", [(2, 3), (6, 7)])
def test_partner_path_equals_the_kept_items_gradient_in_float64(tiny, partners, pairs_per_slice):
    """Every pair's three gradients equal autograd of its exact cotangents restricted to the items
    it keeps (1e-6 relative, float64), in one gathered slice and in several; with m = B - 1 that
    is the exact gradient, equal to the per-pair path."""
    loaded, params, projector, images, tokens = tiny
    ours = partner_gradients(loaded.model, params, projector, images, tokens, "exact", partners,
                             pairs_per_slice=pairs_per_slice)
    with torch.no_grad():
        u, v = embed(loaded.model, images, tokens)
    support, _ = partner_sets(softmax_parts(u, v, temperature_scale(loaded.model), "exact"), partners)
    reference = _kept_items_reference(loaded, params, images, tokens, support)
    for t, name in enumerate(("pos", "neg", "clip")):
        want = reference[t]
        torch.testing.assert_close(getattr(ours, name).double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    if partners >= len(tokens) - 1:
        exact = per_pair_gradients(loaded.model, params, projector, images, tokens, method="per_pair")
        assert float(ours.dropped_mass.abs().max()) == 0.0
        for name in ("pos", "neg", "clip"):
            want = getattr(exact, name).double()
            torch.testing.assert_close(getattr(ours, name).double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_partners_are_chosen_by_softmax_weight_and_the_dropped_mass_is_the_rest():
    """S_n = n and its m largest w_nk = p_nk + q_kn + p_kn + q_nk; the dropped mass is the sum of
    w_nk outside S_n, computed here by a loop over the definition."""
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    v = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    scale = torch.tensor(5.0, dtype=torch.float64)
    support, dropped = partner_sets(softmax_parts(u, v, scale, "exact"), 2)
    p = torch.softmax(pair_logits(u, v, scale), dim=1)
    q = torch.softmax(pair_logits(u, v, scale), dim=0)
    for n in range(6):
        weight = {k: float(p[n, k] + q[k, n] + p[k, n] + q[n, k]) for k in range(6) if k != n}
        best = sorted(weight, key=weight.get, reverse=True)[:2]
        assert support[n].tolist() == [n, *best]
        assert float(dropped[n]) == pytest.approx(sum(w for k, w in weight.items() if k not in best), rel=1e-12)
    everything, none_dropped = partner_sets(softmax_parts(u, v, scale, "exact"), 10)
    assert everything.shape == (6, 6) and float(none_dropped.abs().max()) == 0.0


def test_batch_gradients_routes_partners_and_reports_no_drop_when_every_partner_is_kept(tiny):
    from ecif_core.influence.partners import batch_gradients

    loaded, params, projector, images, tokens = tiny
    approx = batch_gradients(loaded.model, params, projector, images, tokens, partners=2)
    assert approx.dropped_mass.shape == (7,) and float(approx.dropped_mass.min()) > 0.0
    whole = batch_gradients(loaded.model, params, projector, images, tokens, partners=6)
    plain = per_pair_gradients(loaded.model, params, projector, images, tokens)
    assert plain.dropped_mass is None and float(whole.dropped_mass.abs().max()) == 0.0
    torch.testing.assert_close(whole.pos, plain.pos)
    assert not torch.allclose(approx.pos, plain.pos, rtol=1e-6, atol=1e-9)


def test_a_theta_without_logra_factors_gets_the_same_approximation_on_the_per_pair_path():
    """A LayerNorm weight in theta rules out the gathered batch: the kept-items gradients then come
    from the per-pair path with masked cotangents, equal to the reference."""
    loaded = _tiny_clip()
    theta = select_theta(loaded.model, ["visual.proj", "visual.ln_post.weight", "text_projection"])
    restrict_grad_to(loaded.model, theta)
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(None, None))
    images, tokens = _tiny_batch(loaded, 6, seed=8)
    ours = partner_gradients(loaded.model, params, projector, images, tokens, "exact", 2)
    with torch.no_grad():
        u, v = embed(loaded.model, images, tokens)
    support, dropped = partner_sets(softmax_parts(u, v, temperature_scale(loaded.model), "exact"), 2)
    reference = _kept_items_reference(loaded, params, images, tokens, support)
    torch.testing.assert_close(ours.dropped_mass, dropped.cpu())
    for t, name in enumerate(("pos", "neg", "clip")):
        want = reference[t]
        torch.testing.assert_close(getattr(ours, name).double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_memory_limit_bounds_the_gathered_slices(tiny, monkeypatch):
    """memory_limit leaves half of what is free above the resident memory to a gathered backward:
    here room for two pairs' items per slice, so 7 pairs take 4 slices (two groups each)."""
    from ecif_core.influence import memory, partners as module

    loaded, params, projector, images, tokens = tiny
    per_item, _ = memory.item_bytes(loaded.model, params, images[:1], tokens[:1])
    monkeypatch.setattr(memory, "resident_bytes", lambda device: 1 << 20)
    calls = []
    real = module._add_gathered
    monkeypatch.setattr(module, "_add_gathered", lambda *a, **k: calls.append(len(a[6])) or real(*a, **k))
    limit = (1 << 20) + 2 * (per_item * 3 * 3) * 2
    module.partner_gradients(loaded.model, params, projector, images, tokens, "exact", 2, memory_limit=limit)
    assert calls == [2, 4, 2, 4, 2, 4, 1, 2]  # own items, then partners' items, per slice of 2 pairs


@pytest.mark.parametrize("neg_term", ["exact", "first_order", "paper"])
def test_kept_cotangents_are_the_full_cotangents_on_the_kept_items(neg_term):
    """kept_cotangents (rows and columns of G for the kept items only) equals
    embedding_cotangents and clip_cotangents (every item) read at the kept items, to 1e-12 in
    float64, a hard negative included."""
    from ecif_core.influence.partners import kept_cotangents

    generator = torch.Generator().manual_seed(3)
    u = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    v = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    v[2] = u[6] * 1.5 + 1e-3  # caption 6 almost image 2
    scale = torch.tensor(30.0, dtype=torch.float64)
    support, _ = partner_sets(softmax_parts(u, v, scale, neg_term), 3)
    full_u, full_v, full_values = _all_cotangents(u, v, scale, neg_term)
    c_u, c_v, values = kept_cotangents(softmax_parts(u, v, scale, neg_term), support)
    torch.testing.assert_close(values, full_values, rtol=1e-12, atol=1e-12)
    for t in range(3):
        for n in range(8):
            for w, k in enumerate(support[n].tolist()):
                top = float(max(full_u.abs().max(), full_v.abs().max()))
                torch.testing.assert_close(c_u[t, n, w], full_u[t * 8 + n, k], rtol=1e-10, atol=1e-12 * top)
                torch.testing.assert_close(c_v[t, n, w], full_v[t * 8 + n, k], rtol=1e-10, atol=1e-12 * top)


def test_with_theta_the_two_projections_the_partner_forward_records_the_tower_features():
    """The store keeps the towers' features; on the top-m path they come from its one no-grad forward (no
    second forward): equal to the towers' outputs below the projections, image first. With another theta
    the path records none (the gradients stage then computes them)."""
    from ecif_core.models.features import projection_inputs

    loaded = _tiny_clip()
    images, tokens = _tiny_batch(loaded, 7, seed=4)
    for patterns, recorded in ((["visual.proj", "text_projection"], True), (BLOCKS, False)):
        theta = select_theta(loaded.model, patterns)
        restrict_grad_to(loaded.model, theta)
        projector = Projector.for_theta(theta, ProjectionSpec(None, None))
        result = partner_gradients(loaded.model, [p for _, p in theta], projector, images, tokens, "exact", 2)
        assert (result.features is not None) is recorded
        if recorded:
            image, text = projection_inputs(loaded.model, images, tokens)
            torch.testing.assert_close(result.features[0], image, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(result.features[1], text, rtol=1e-5, atol=1e-6)
