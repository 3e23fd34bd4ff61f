"""Batched per-pair gradients equal autograd of pos[n] and neg[n] taken one at a time."""
import pytest
import torch

from ecif_core.influence.gradients import embed, loss_gradient, per_pair_gradients
from ecif_core.influence.losses import batch_loss, contrastive_terms, pair_logits
from ecif_core.models.factory import restrict_grad_to, select_theta
from ecif_core.influence.projection import Projector, ProjectionSpec, gaussian_factor
from tests.core.helpers import micro_model, random_batch

BLOCKS = ["blocks:2"]  # the last two blocks + the projections: the paths through blocks


@pytest.fixture(scope="module")
def setup():
    loaded = micro_model(seed=1)
    theta = select_theta(loaded.model, BLOCKS)
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


@pytest.mark.parametrize("neg_term,chunk,method", [("exact", 64, "per_pair"), ("exact", 3, "per_pair"),
                                                   ("first_order", 5, "per_pair"), ("exact", 64, "per_item"),
                                                   ("exact", 3, "per_item"), ("first_order", 5, "per_item")])
def test_per_pair_gradients_match_autograd(setup, neg_term, chunk, method):
    loaded, theta = setup
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(None, None))
    images, tokens = random_batch(loaded, 6, seed=2)
    result = per_pair_gradients(loaded.model, params, projector, images, tokens, neg_term, chunk=chunk, method=method)
    g_pos, g_neg, pos, neg = _one_at_a_time(loaded, params, images, tokens, neg_term)
    assert result.pos.shape == g_pos.shape == (6, projector.dim)
    # The recorded forward writes attention and gelu with plain ops and the per-item path sums in
    # another order; float32 autograd itself is 1.3e-5 away from the float64 values here (largest
    # entry ~40), so 1e-6 only held for an identical order. test_paths_match_autograd_in_float64
    # checks the same numbers at 1e-9.
    atol = 1e-5
    torch.testing.assert_close(result.pos, g_pos, rtol=1e-4, atol=atol)
    torch.testing.assert_close(result.neg, g_neg, rtol=1e-4, atol=atol)
    torch.testing.assert_close(result.pos_terms, pos)
    torch.testing.assert_close(result.neg_terms, neg)
    torch.testing.assert_close(result.clip, _clip_one_at_a_time(loaded, params, images, tokens), rtol=1e-4, atol=atol)


def _clip_one_at_a_time(loaded, params, images, tokens):
    """Reference C_n = grad [1 - cos(u_n, v_n)], one autograd call per pair."""
    u, v = embed(loaded.model, images, tokens)
    cos = torch.nn.functional.cosine_similarity(u, v, dim=-1)
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])
    return torch.stack([flat(torch.autograd.grad(1 - cos[n], params, retain_graph=True)) for n in range(len(cos))])


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
    # sum_n Pos(n) = L_batch; float32 sums of entries up to ~40 in another order: 2e-5 (the
    # float64 model below holds it to float32 rounding of the result)
    torch.testing.assert_close(grad, result.pos.sum(0), rtol=1e-4, atol=2e-5)
    u, v = embed(loaded.model, images, tokens)
    assert loss == pytest.approx(float(batch_loss(pair_logits(u, v, loaded.model.logit_scale.exp())).detach()), rel=1e-6)
    exact = micro_model(seed=1)
    exact.model.double()
    theta64 = select_theta(exact.model, BLOCKS)
    restrict_grad_to(exact.model, theta64)
    params64 = [p for _, p in theta64]
    grad64, _ = loss_gradient(exact.model, params64, projector, images.double(), tokens)
    result64 = per_pair_gradients(exact.model, params64, projector, images.double(), tokens)
    # loss_gradient returns float32 (Projector.project_block): agreement to float32 rounding
    torch.testing.assert_close(grad64.double(), result64.pos.double().sum(0), rtol=1e-6,
                               atol=1e-7 * float(grad64.abs().max()))


def test_projection_is_regenerated_identically():
    a = gaussian_factor(3, "visual.proj", "in", 4, 10)
    assert torch.equal(a, gaussian_factor(3, "visual.proj", "in", 4, 10))
    assert not torch.equal(a, gaussian_factor(3, "text_projection", "in", 4, 10))
    assert not torch.equal(a, gaussian_factor(4, "visual.proj", "in", 4, 10))


def test_logra_factors_equal_projected_dense_gradients(setup):
    """The LoGra path (layer inputs x output-gradients) equals projecting full weight gradients."""
    from ecif_core.influence.logra import WeightUseRecorder

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
    # the default theta never takes the dense path: attention in/out projections have factors too
    assert recorded == {name for name, _ in theta}


def test_per_item_path_equals_per_pair_path_with_projection(setup):
    """The B-independent path (per-item projected Jacobians contracted with the cotangents)
    gives the per-pair path's numbers with a real projection, for both neg terms."""
    loaded, theta = setup
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(k_in=3, k_out=5, seed=7))
    images, tokens = random_batch(loaded, 7, seed=9)
    for neg_term in ("exact", "paper"):
        item = per_pair_gradients(loaded.model, params, projector, images, tokens, neg_term, chunk=3, method="per_item")
        pair = per_pair_gradients(loaded.model, params, projector, images, tokens, neg_term, chunk=4, method="per_pair")
        for ours, reference in ((item.pos, pair.pos), (item.neg, pair.neg)):
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_cost_model_counts_min_d_b_plus_one_directions_per_item(setup, monkeypatch):
    """Per item costs min(D, B + 1) backward directions (the cotangent basis), per pair 3B: per
    item whenever every theta weight has factors. The auto choice is the one actually run, and
    the number of batched backwards follows the basis size, not D."""
    from ecif_core.influence import gradients
    from ecif_core.influence.memory import choose_method, item_directions

    assert item_directions(32, 32) == 32 and item_directions(32, 512) == 33 and item_directions(256, 512) == 257
    assert choose_method(32, 32, True) == "per_item"        # tiny CLIP at B = 32: 32 < 96
    assert choose_method(10, 32, True) == "per_item"        # 11 < 30 (D = 32 > 3B: per pair before the basis)
    assert choose_method(32, 512, True) == "per_item"       # ViT-B-32 at B = 32: 33 < 96
    assert choose_method(1, 8, True) == "per_item"          # 2 < 3
    assert choose_method(512, 32, False) == "per_pair"      # a dense theta weight: no per-item factors
    # with flops per direction (memory.direction_flops): a cheap direction (theta = the
    # projections) leaves the per-item coordinate and contraction steps to decide
    assert choose_method(32, 512, True, direction_flops=1.7e4, k=128) == "per_pair"
    assert choose_method(32, 512, True, direction_flops=6.5e6, k=1152) == "per_item"
    assert choose_method(256, 512, True, direction_flops=6.5e6, k=1152) == "per_item"
    loaded, theta = setup
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(k_in=3, k_out=5, seed=7))
    ran, calls = [], []
    real_per_item, real_grad = gradients.per_item_gradients, torch.autograd.grad
    monkeypatch.setattr(gradients, "per_item_gradients", lambda *a, **k: ran.append(1) or real_per_item(*a, **k))
    monkeypatch.setattr(torch.autograd, "grad",  # count the batched backwards through the encoders
                        lambda *a, **k: (k.get("is_grads_batched") and calls.append(1)) or real_grad(*a, **k))
    embed_dim = loaded.model.text_projection.shape[1]      # 8
    for batch, directions in ((6, 7), (2, 3), (9, embed_dim)):
        ran.clear(), calls.clear()
        images, tokens = random_batch(loaded, batch, seed=4)
        per_pair_gradients(loaded.model, params, projector, images, tokens, chunk=1, items=batch)
        assert ran == [1] and len(calls) == directions
    calls.clear()
    per_pair_gradients(loaded.model, params, projector, images, tokens, chunk=1, items=9, method="per_pair")
    assert len(calls) == 3 * 9
    projections = select_theta(loaded.model, ["visual.proj", "text_projection"])
    restrict_grad_to(loaded.model, projections)
    try:  # theta = the projections: auto takes the closed form (head.py), no batched backward at all
        ran.clear(), calls.clear()
        per_pair_gradients(loaded.model, [p for _, p in projections], Projector.for_theta(projections, ProjectionSpec(8, 8, 0)),
                           images, tokens, chunk=1, items=9)
        assert ran == [] and calls == []
    finally:
        restrict_grad_to(loaded.model, theta)


def _tiny_clip(embed_dim: int | None = None):
    """ecif_core/configs/tiny-clip.json (D = 32), random init, float64; another D on request."""
    import json
    from importlib import resources

    from ecif_core.models.factory import load_model

    config = json.loads(resources.files("ecif_core.configs").joinpath("tiny-clip.json").read_text())
    if embed_dim is not None:
        config["embed_dim"] = embed_dim
    loaded = load_model(config=config, seed=3)
    loaded.model.double()
    return loaded


def _tiny_batch(loaded, size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 32, 32, generator=generator, dtype=torch.float64)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return images, loaded.tokenizer([f"a {words[i % 10]} {words[(i * 3 + seed) % 10]}" for i in range(size)])


@pytest.mark.parametrize("embed_dim,batch", [(None, 6), (48, 5), (12, 12)])
@pytest.mark.parametrize("neg_term", ["exact", "first_order"])
def test_basis_path_equals_per_pair_and_dense_in_float64(embed_dim, batch, neg_term):
    """The per-item basis path (min(D, B + 1) directions) gives today's per-pair path, the one-hot
    per-item path and the dense reference to 1e-6 relative in float64: the whole batch at once
    (single pairs) and in slices of items (groups), with D > B + 1 (the basis is smaller than D)
    and B + 1 >= D (it is the identity); C_n too."""
    from ecif_core.influence import gradients

    loaded = _tiny_clip(embed_dim)
    theta = select_theta(loaded.model, BLOCKS)
    restrict_grad_to(loaded.model, theta)
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(None, None))
    images, tokens = _tiny_batch(loaded, batch, seed=batch)
    dim = loaded.model.text_projection.shape[1]
    assert (dim > batch + 1) == (embed_dim != 12)
    run = lambda method, items=None, chunk=16: per_pair_gradients(loaded.model, params, projector, images, tokens,
                                                                  neg_term, chunk=chunk, method=method, items=items)
    references = [run("per_pair"), run("dense")] + ([run("per_item_onehot")] if dim > batch + 1 else [])
    sizes = []
    real = gradients.per_item_gradients
    gradients.per_item_gradients = lambda *a, **k: sizes.append(a[-1][0].size) or real(*a, **k)
    try:
        single, grouped = run("per_item", chunk=64), run("per_item", items=2, chunk=3)
    finally:
        gradients.per_item_gradients = real
    assert sizes[0] == min(dim, batch + 1)
    for reference in references:
        for ours in (single, grouped):
            for name in ("pos", "neg", "clip"):
                want, got = getattr(reference, name).double(), getattr(ours, name).double()
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_basis_without_the_items_own_direction_is_wrong():
    """Item k's cotangents leave the span of the other tower's embeddings through the tangent
    projection (I - u^_k u^_k^T): the basis must keep u^_k's own direction. Without it the
    coordinates no longer rebuild the cotangents, and the gradients differ from per pair."""
    from ecif_core.influence import gradients
    from ecif_core.influence.basis import ItemBasis, item_basis
    from ecif_core.influence.gradients import _all_cotangents

    generator = torch.Generator().manual_seed(0)
    u = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    v = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    v[3] = 2 * v[1]  # the same image twice: a rank-deficient batch keeps an exact basis
    jac_u, jac_v, _ = _all_cotangents(u, v, torch.tensor(20.0, dtype=torch.float64), "exact")
    for own, other, jac in ((u, v, jac_u), (v, u, jac_v)):
        basis = item_basis(own, other)
        assert basis.size == 6
        rows = torch.cat([basis.shared.expand(5, -1, -1), basis.own.unsqueeze(1)], dim=1)  # (items, R, D)
        rebuilt = torch.einsum("tjr,jrd->tjd", basis.coefficients(jac), rows)
        torch.testing.assert_close(rebuilt, jac, rtol=0, atol=1e-12 * float(jac.abs().max()))
        without_own = ItemBasis(basis.shared, None)
        lost = torch.einsum("tjr,rd->tjd", without_own.coefficients(jac), basis.shared)
        assert float((lost - jac).abs().max()) > 1e-3 * float(jac.abs().max())

    loaded = _tiny_clip()
    theta = select_theta(loaded.model, BLOCKS)
    restrict_grad_to(loaded.model, theta)
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(None, None))
    images, tokens = _tiny_batch(loaded, 6, seed=1)
    reference = per_pair_gradients(loaded.model, params, projector, images, tokens, method="per_pair")
    real = gradients.item_basis
    gradients.item_basis = lambda own, other: ItemBasis(real(own, other).shared, None)
    try:
        dropped = per_pair_gradients(loaded.model, params, projector, images, tokens, method="per_item")
    finally:
        gradients.item_basis = real
    error = float((dropped.pos.double() - reference.pos.double()).abs().max())
    assert error > 1e-3 * float(reference.pos.abs().max())


def test_theta_with_a_dense_weight_falls_back_to_the_per_pair_path(setup):
    """A theta parameter without LoGra factors (a LayerNorm weight) makes per item impossible:
    auto runs per pair and still matches autograd; forcing per item is refused."""
    loaded, _ = setup
    theta = select_theta(loaded.model, ["visual.proj", "visual.ln_post.weight"])
    restrict_grad_to(loaded.model, theta)
    try:
        params = [p for _, p in theta]
        projector = Projector.for_theta(theta, ProjectionSpec(None, None))
        images, tokens = random_batch(loaded, 6, seed=5)
        result = per_pair_gradients(loaded.model, params, projector, images, tokens, chunk=4)
        g_pos, g_neg, _, _ = _one_at_a_time(loaded, params, images, tokens, "exact")
        torch.testing.assert_close(result.pos, g_pos, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.neg, g_neg, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="per_item"):
            per_pair_gradients(loaded.model, params, projector, images, tokens, method="per_item")
    finally:
        restrict_grad_to(loaded.model, select_theta(loaded.model, BLOCKS))


def test_recorded_attention_equals_nn_multihead_attention():
    """The recorder's explicit attention (float, bool and causal masks) is nn.MultiheadAttention."""
    from ecif_core.influence.logra import WeightUseRecorder

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(12, 3, batch_first=True)
    x = torch.randn(4, 5, 12)
    float_mask = torch.full((5, 5), float("-inf")).triu(1)
    bool_mask = torch.rand(5, 5) > 0.6
    bool_mask.fill_diagonal_(False)
    for kwargs in ({}, {"attn_mask": float_mask}, {"attn_mask": bool_mask},
                   {"attn_mask": float_mask, "is_causal": True}):
        expected = mha(x, x, x, need_weights=False, **kwargs)[0]
        recorder = WeightUseRecorder([mha.in_proj_weight, mha.out_proj.weight])
        with recorder:
            got = mha(x, x, x, need_weights=False, **kwargs)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert [u.index for u in recorder.uses] == [0, 1] and recorder.uses[0].inputs.shape == (4, 5, 12)


@pytest.mark.parametrize("method", ["per_item", "per_pair"])
def test_paths_match_autograd_in_float64(method):
    """In float64 (unprojected) both paths equal one-at-a-time autograd to 1e-9: the per-item
    contraction and the recorded attention are exact, not approximations."""
    loaded = micro_model(seed=1)
    loaded.model.double()
    theta = select_theta(loaded.model, BLOCKS)
    restrict_grad_to(loaded.model, theta)
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(None, None))
    images, tokens = random_batch(loaded, 6, seed=2)
    images = images.double()
    result = per_pair_gradients(loaded.model, params, projector, images, tokens, chunk=5, method=method)
    g_pos, g_neg, _, _ = _one_at_a_time(loaded, params, images, tokens, "exact")
    torch.testing.assert_close(result.pos.double(), g_pos, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.neg.double(), g_neg, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("neg_term", ["exact", "first_order", "paper"])
def test_closed_form_cotangents_equal_autograd(neg_term):
    """embedding_cotangents (closed form, chunked rows) equals jacrev of the 2B terms: 1e-12 in
    float64, and in float32 it stays as close to the float64 values as jacrev does (a hard
    negative included: A - A p would cancel there)."""
    from ecif_core.influence.cotangents import embedding_cotangents
    from ecif_core.influence.losses import contrastive_terms, pair_logits

    def reference(u, v, scale):
        def terms(u, v):
            values = torch.cat(contrastive_terms(pair_logits(u, v, scale), neg_term))
            return values, values
        return torch.func.jacrev(terms, argnums=(0, 1), has_aux=True)(u, v)

    generator = torch.Generator().manual_seed(5)
    u = torch.randn(9, 6, generator=generator, dtype=torch.float64)
    v = torch.randn(9, 6, generator=generator, dtype=torch.float64)
    v[3] = u[5] * 2.0 + 1e-3  # text 5 is almost image 3: p_53 close to 1
    scale = torch.tensor(60.0, dtype=torch.float64)
    (ref_u, ref_v), ref_values = reference(u, v, scale)
    jac_u, jac_v, values = embedding_cotangents(u, v, scale, neg_term, rows=4)
    torch.testing.assert_close(values, ref_values, rtol=1e-12, atol=1e-12)
    top = float(max(ref_u.abs().max(), ref_v.abs().max()))
    torch.testing.assert_close(jac_u, ref_u, rtol=1e-10, atol=1e-12 * top)
    torch.testing.assert_close(jac_v, ref_v, rtol=1e-10, atol=1e-12 * top)
    if neg_term == "paper":  # 1/p overflows float32 at a hard negative, in both forms
        return
    (f32_u, f32_v), _ = reference(u.float(), v.float(), scale.float())
    ours_u, ours_v, _ = embedding_cotangents(u.float(), v.float(), scale.float(), neg_term)
    autograd_error = float(max((f32_u.double() - ref_u).abs().max(), (f32_v.double() - ref_v).abs().max()))
    ours_error = float(max((ours_u.double() - ref_u).abs().max(), (ours_v.double() - ref_v).abs().max()))
    assert ours_error <= max(4 * autograd_error, 1e-6 * top)


def test_trunk_below_theta_runs_once_per_batch():
    """In slices, the blocks below the first theta block run only in the whole batch's no-grad
    forward (their output is replayed per slice); the theta blocks run once more per slice. The
    numbers equal one unsliced pass. theta = the projections: every block is trunk."""
    loaded = _tiny_clip()
    for patterns, first in ((BLOCKS, 1), (["visual.proj", "text_projection"], 3)):
        theta = select_theta(loaded.model, patterns)
        restrict_grad_to(loaded.model, theta)
        params = [p for _, p in theta]
        projector = Projector.for_theta(theta, ProjectionSpec(None, None))
        images, tokens = _tiny_batch(loaded, 6, seed=2)
        whole = per_pair_gradients(loaded.model, params, projector, images, tokens, items=6)
        runs = {}
        handles = [block.mlp.register_forward_hook(lambda m, a, o, key=(tower, i): runs.update({key: runs.get(key, 0) + 1}))
                   for tower, blocks in (("image", loaded.model.visual.transformer.resblocks),
                                         ("text", loaded.model.transformer.resblocks))
                   for i, block in enumerate(blocks)]
        try:
            sliced = per_pair_gradients(loaded.model, params, projector, images, tokens, items=2)
        finally:
            for handle in handles:
                handle.remove()
        assert runs == {(tower, i): 1 if i < first else 4 for tower in ("image", "text") for i in range(3)}
        for name in ("pos", "neg", "clip"):
            want = getattr(whole, name)
            torch.testing.assert_close(getattr(sliced, name), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
