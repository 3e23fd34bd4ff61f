"""Bounded memory: item slices give the same gradients; the budget picks items and chunk."""
import pytest
import torch

from ecif_core.errors import ConfigError
from ecif_core.influence.gradients import per_pair_gradients
from ecif_core.influence.memory import BACKWARD, FORWARD, item_bytes, parse_bytes, plan_chunks
from ecif_core.models.factory import restrict_grad_to, select_theta
from ecif_core.influence.projection import Projector, ProjectionSpec
from tests.core.helpers import micro_model, random_batch

BLOCKS = ["blocks:2"]  # the last two blocks + the projections: the paths through blocks


@pytest.fixture(scope="module")
def setup():
    loaded = micro_model(seed=3)
    theta = select_theta(loaded.model, BLOCKS)
    restrict_grad_to(loaded.model, theta)
    return loaded, [p for _, p in theta], Projector.for_theta(theta, ProjectionSpec(k_in=3, k_out=4, seed=2))


@pytest.mark.parametrize("method", ["per_item", "per_pair"])
def test_item_slices_sum_to_the_whole_batch(setup, method):
    """Both paths are sums over items: slices of 2 and 3 items equal the one-pass result."""
    loaded, params, projector = setup
    images, tokens = random_batch(loaded, 7, seed=6)
    whole = per_pair_gradients(loaded.model, params, projector, images, tokens, chunk=5, method=method)
    for items in (2, 3):
        part = per_pair_gradients(loaded.model, params, projector, images, tokens, chunk=3, method=method, items=items)
        for ours, reference in ((part.pos, whole.pos), (part.neg, whole.neg)):
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
        torch.testing.assert_close(part.pos_terms, whole.pos_terms)
        torch.testing.assert_close(part.clip_score, whole.clip_score)


def test_plan_chunks_shrinks_items_first_then_chunk():
    a, batch, dim = 1000, 32, 8
    cot = 2 * 3 * batch * batch * dim * 4  # d[Pos, Neg, 1 - cos] / d(u, v)
    roomy = 10 * cot + 100 * a * (FORWARD + 16 * BACKWARD)
    assert plan_chunks(roomy, 0, batch, dim, a, 16, 64) == (32, 16)          # everything fits
    assert plan_chunks(roomy, 0, batch, dim, a, 99, 12) == (32, 12)          # chunk <= passes
    tight = cot + 5 * a * (FORWARD + 16 * BACKWARD)
    assert plan_chunks(tight, 0, batch, dim, a, 16, 64) == (5, 16)           # fewer items per forward
    tighter = cot + a * (FORWARD + 3 * BACKWARD)
    assert plan_chunks(tighter, 0, batch, dim, a, 16, 64) == (1, 3)          # then a smaller chunk
    assert plan_chunks(tighter + 10**6, 10**6, batch, dim, a, 16, 64) == (1, 3)  # resident memory counts
    with pytest.raises(ConfigError, match="memory_limit"):
        plan_chunks(cot, 0, batch, dim, a, 16, 64)


def test_memory_limit_runs_in_slices_with_the_same_numbers(setup, monkeypatch):
    from ecif_core.influence import memory

    loaded, params, projector = setup
    images, tokens = random_batch(loaded, 6, seed=7)
    per_item, dim = item_bytes(loaded.model, params, images[:1], tokens[:1])
    assert per_item > 0 and dim == 8
    monkeypatch.setattr(memory, "resident_bytes", lambda device: 0)
    limit = 2 * 18 * 6 * dim * 4 + int(2 * per_item * (FORWARD + 2 * BACKWARD))  # 3B = 18 cotangent sets; 2 items, chunk 2
    seen = []
    real = memory.plan_chunks
    monkeypatch.setattr(memory, "plan_chunks", lambda *a: seen.append(real(*a)) or seen[-1])
    limited = per_pair_gradients(loaded.model, params, projector, images, tokens, chunk=2, memory_limit=limit)
    whole = per_pair_gradients(loaded.model, params, projector, images, tokens, chunk=8)
    assert seen == [(2, 2)]
    torch.testing.assert_close(limited.pos, whole.pos, rtol=1e-4, atol=1e-5 * float(whole.pos.abs().max()))
    torch.testing.assert_close(limited.neg, whole.neg, rtol=1e-4, atol=1e-5 * float(whole.neg.abs().max()))


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 << 30 and parse_bytes("512 MiB") == 512 << 20 and parse_bytes(1000) == 1000
    assert parse_bytes(None) is None and parse_bytes("1.5g") == 3 << 29
    with pytest.raises(ConfigError, match="memory_limit"):
        parse_bytes("lots")


def test_cpu_slices_bound_the_backward_width(setup, monkeypatch):
    """On CPU a batch runs in slices of about CPU_SLICE_BYTES / (A x min(chunk, passes)) items
    (cache-sized backwards, one item for ViT-B-32), with the same numbers as one slice."""
    from ecif_core.influence import gradients
    from ecif_core.influence.gradients import CPU_SLICE_BYTES, cpu_items

    assert cpu_items(128, 32, 64, 1 << 10) == CPU_SLICE_BYTES // (32 << 10)   # per item: D passes
    assert cpu_items(16, 512, 64, 1 << 10) == CPU_SLICE_BYTES // (17 << 10)   # per item: B + 1 passes
    assert cpu_items(256, 512, 8, 1 << 10) == CPU_SLICE_BYTES // (8 << 10)    # chunk narrower than passes
    assert cpu_items(256, 512, 64, int(9.5 * 2**20)) == 1                     # ViT-B-32
    loaded, params, projector = setup
    images, tokens = random_batch(loaded, 6, seed=8)
    per_item, _ = item_bytes(loaded.model, params, images[:1], tokens[:1])
    whole = per_pair_gradients(loaded.model, params, projector, images, tokens, chunk=4, items=6)
    monkeypatch.setattr(gradients, "CPU_SLICE_BYTES", 2 * 4 * per_item)     # 2 items x 4 cotangents
    forwards = []
    real = loaded.model.encode_text
    monkeypatch.setattr(loaded.model, "encode_text", lambda t: forwards.append(len(t)) or real(t))
    sliced = per_pair_gradients(loaded.model, params, projector, images, tokens, chunk=4)
    assert forwards == [1, 6, 2, 2, 2]                     # probe, one no-grad forward, then 3 slices
    torch.testing.assert_close(sliced.pos, whole.pos, rtol=1e-4, atol=1e-5 * float(whole.pos.abs().max()))


def test_slices_are_balanced(setup, monkeypatch):
    loaded, params, projector = setup
    images, tokens = random_batch(loaded, 6, seed=9)
    forwards = []
    real = loaded.model.encode_text
    monkeypatch.setattr(loaded.model, "encode_text", lambda t: forwards.append(len(t)) or real(t))
    per_pair_gradients(loaded.model, params, projector, images, tokens, chunk=4, items=5)
    assert forwards == [6, 3, 3]  # not 5 + 1
