"""The closed-form projections path (influence/head.py) equals one-at-a-time autograd and the
per-pair path, in float64, for every Neg form, projected and not, whole batch and slices, and where
an off-diagonal softmax is within 1e-12 of 1 (where a subtraction would cancel)."""
import json
from importlib import resources

import pytest
import torch

from ecif_core.influence import gradients
from ecif_core.influence.gradients import embed, per_pair_gradients
from ecif_core.influence.losses import contrastive_terms, pair_logits
from ecif_core.influence.projection import Projector, ProjectionSpec
from ecif_core.models.factory import load_model, restrict_grad_to, select_theta

PROJECTIONS = ["visual.proj", "text_projection"]


def _model(embed_dim: int | None = None, logit_scale: float | None = None):
    config = json.loads(resources.files("ecif_core.configs").joinpath("tiny-clip.json").read_text())
    if embed_dim is not None:
        config["embed_dim"] = embed_dim
    loaded = load_model(config=config, seed=5)
    loaded.model.double()
    if logit_scale is not None:
        with torch.no_grad():
            loaded.model.logit_scale.fill_(float(torch.tensor(logit_scale).log()))
    theta = select_theta(loaded.model, PROJECTIONS)
    restrict_grad_to(loaded.model, theta)
    return loaded, theta


def _batch(loaded, size: int, seed: int, duplicate: bool = False):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 32, 32, generator=generator, dtype=torch.float64)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    captions = [f"a {words[i % 10]} {words[(i * 3 + seed) % 10]}" for i in range(size)]
    if duplicate:  # pair 1 is pair 0 again: p[0, 1] and p[1, 0] sit at 1/2, their partners near 0
        images[1], captions[1] = images[0], captions[0]
    return images, loaded.tokenizer(captions)


def _autograd(loaded, params, images, tokens, neg_term):
    """Reference: one autograd call per Pos(n), Neg(n) and 1 - cos(u_n, v_n), unprojected."""
    u, v = embed(loaded.model, images, tokens)
    pos, neg = contrastive_terms(pair_logits(u, v, loaded.model.logit_scale.exp().detach()), neg_term)
    cos = torch.nn.functional.cosine_similarity(u, v, dim=-1)
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])
    grads = lambda terms: torch.stack([flat(torch.autograd.grad(t, params, retain_graph=True)) for t in terms])
    return grads(pos), grads(neg), grads(1 - cos)


def _close(got, want, tolerance: float = 1e-6):
    torch.testing.assert_close(got.double(), want.double(), rtol=tolerance, atol=tolerance * float(want.abs().max()))


@pytest.mark.parametrize("neg_term", ["exact", "first_order", "paper"])
@pytest.mark.parametrize("embed_dim,batch", [(None, 6), (12, 12)])
def test_head_path_equals_autograd_unprojected(neg_term, embed_dim, batch):
    loaded, theta = _model(embed_dim)
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(None, None))
    images, tokens = _batch(loaded, batch, seed=batch)
    want = _autograd(loaded, params, images, tokens, neg_term)
    for items in (None, 4):
        got = per_pair_gradients(loaded.model, params, projector, images, tokens, neg_term, method="head", items=items)
        for ours, reference in zip((got.pos, got.neg, got.clip), want):
            _close(ours, reference)


@pytest.mark.parametrize("neg_term", ["exact", "paper"])
def test_head_path_equals_per_pair_path_projected(neg_term):
    """With LoGra factors (float32, as audits run): the per-pair path's numbers to float32 tolerance."""
    loaded, theta = _model()
    loaded.model.float()
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(k_in=5, k_out=4, seed=3))
    images, tokens = _batch(loaded, 7, seed=1, duplicate=True)
    images = images.float()
    reference = per_pair_gradients(loaded.model, params, projector, images, tokens, neg_term, method="per_pair")
    for items in (None, 3):
        ours = per_pair_gradients(loaded.model, params, projector, images, tokens, neg_term, method="head", items=items)
        for name in ("pos", "neg", "clip", "pos_terms", "neg_terms", "clip_score"):
            _close(getattr(ours, name), getattr(reference, name), 1e-4)


def test_head_path_holds_where_an_off_diagonal_softmax_is_nearly_one():
    """At a sharp temperature a random model's captions each match one image far better than the
    rest, most often another pair's: an off-diagonal p[k, n] within 1e-6 of 1 and the Neg coefficient
    A = p / (1 - p) above 1e6. The difference p[k] @ w - p[k, n] w_n would cancel there; the path sums that row again without the column."""
    loaded, theta = _model(logit_scale=2000.0)
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(None, None))
    images, tokens = _batch(loaded, 5, seed=4)
    u, v = embed(loaded.model, images, tokens)
    p = torch.softmax(pair_logits(u, v, loaded.model.logit_scale.exp().detach()), dim=1)
    off = (p - torch.diag(torch.diagonal(p))).detach()
    assert float(1 - off.max()) < 1e-6, "the test needs an off-diagonal softmax near 1"
    want = _autograd(loaded, params, images, tokens, "exact")
    got = per_pair_gradients(loaded.model, params, projector, images, tokens, "exact", method="head")
    for ours, reference in zip((got.pos, got.neg, got.clip), want):
        _close(ours, reference)


def test_auto_takes_the_head_path_only_for_the_projections():
    """method "auto" runs the closed form for theta = the projections and never for a theta with a block."""
    calls = []
    real = gradients.HeadGradients.add
    gradients.HeadGradients.add = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    try:
        loaded, theta = _model()
        loaded.model.float()
        params = [p for _, p in theta]
        images, tokens = _batch(loaded, 4, seed=0)
        images = images.float()
        per_pair_gradients(loaded.model, params, Projector.for_theta(theta, ProjectionSpec(4, 4)), images, tokens)
        assert calls == [1]
        blocks = select_theta(loaded.model, ["transformer.resblocks.2.mlp.c_fc.weight", *PROJECTIONS])
        restrict_grad_to(loaded.model, blocks)
        per_pair_gradients(loaded.model, [p for _, p in blocks], Projector.for_theta(blocks, ProjectionSpec(4, 4)),
                           images, tokens)
        assert calls == [1]
        with pytest.raises(ValueError, match="head path"):
            per_pair_gradients(loaded.model, [p for _, p in blocks], Projector.for_theta(blocks, ProjectionSpec(4, 4)),
                               images, tokens, method="head")
    finally:
        gradients.HeadGradients.add = real
