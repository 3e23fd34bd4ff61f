"""The terms against autograd (docs/METHOD.md, "What is checked") and the documented behaviour of the
three Neg forms."""
import math

import pytest
import torch

from ecif_core.influence.losses import batch_loss, contrastive_terms, group_terms, neg_terms, pos_terms


def _without(logits: torch.Tensor, removed: list[int]) -> torch.Tensor:
    keep = [i for i in range(logits.shape[0]) if i not in removed]
    return logits[keep][:, keep]


@pytest.mark.parametrize("seed,size,spread", [(0, 7, 3.0), (1, 12, 10.0), (2, 3, 1.0)])
def test_exact_identity_every_pair_float64(seed, size, spread):
    logits = torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * spread
    full = batch_loss(logits)
    pos, neg = contrastive_terms(logits, "exact")
    for n in range(size):
        assert float(full - pos[n] - neg[n]) == pytest.approx(float(batch_loss(_without(logits, [n]))), abs=1e-10)


def test_pos_terms_sum_to_batch_loss():
    logits = torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4
    assert float(pos_terms(logits).sum()) == pytest.approx(float(batch_loss(logits)), abs=1e-12)


@pytest.mark.parametrize("members", [[0], [1, 3], [0, 2, 5, 6], [4, 7, 8]])
def test_group_identity_and_not_additive(members):
    logits = torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3
    pos, neg = group_terms(logits, members)
    expected = batch_loss(_without(logits, members))
    assert float(batch_loss(logits) - pos - neg) == pytest.approx(float(expected), abs=1e-10)
    if len(members) > 1:
        single = neg_terms(logits)[members].sum()
        assert abs(float(single - neg)) > 1e-6  # group influence is not the sum of single ones


def test_group_of_whole_batch_has_no_negative_part():
    logits = torch.randn(4, 4, dtype=torch.float64)
    pos, neg = group_terms(logits, [0, 1, 2, 3])
    assert float(neg) == 0.0 and float(pos) == pytest.approx(float(batch_loss(logits)))


def test_hard_negative_stays_finite_and_exact_in_both_precisions():
    logits = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    logits[0, 3] = 60.0  # p_03 rounds to 1 even in float64
    logits[2, 2] = 80.0
    for dtype in (torch.float64, torch.float32):
        s = logits.to(dtype).detach().requires_grad_(True)
        neg = neg_terms(s)
        assert torch.isfinite(neg).all()
        neg.sum().backward()
        assert torch.isfinite(s.grad).all()
    full, (pos, neg) = batch_loss(logits), contrastive_terms(logits)
    for n in range(6):
        assert float(full - pos[n] - neg[n]) == pytest.approx(float(batch_loss(_without(logits, [n]))), abs=1e-9)
    # float32 agrees with float64 to float32 precision even at the hard negative
    assert torch.allclose(neg_terms(logits.float()).double(), neg, rtol=1e-4)


def test_first_order_is_linearisation_and_paper_is_inverse():
    logits = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    p, q = logits.softmax(dim=1), logits.softmax(dim=0)
    expected_first = torch.tensor([sum(p[k, n] + q[n, k] for k in range(5) if k != n) for n in range(5)])
    expected_paper = torch.tensor([sum(1 / p[k, n] + 1 / q[n, k] for k in range(5) if k != n) for n in range(5)])
    assert torch.allclose(neg_terms(logits, "first_order"), expected_first.double())
    assert torch.allclose(neg_terms(logits, "paper"), expected_paper.double())
    # the exact term is >= its linearisation (-log(1-p) >= p) and close when p is small
    assert (neg_terms(logits, "exact") >= neg_terms(logits, "first_order") - 1e-12).all()
    small = logits * 0.01
    assert torch.allclose(neg_terms(small, "exact"), neg_terms(small, "first_order"), rtol=0.25)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="square"):
        batch_loss(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="neg_term"):
        neg_terms(torch.zeros(3, 3), "published")
    with pytest.raises(ValueError, match="members"):
        group_terms(torch.zeros(3, 3), [5])


def _demoted_loss_by_loop(logits: torch.Tensor, demoted: set[int]) -> float:
    """docs/METHOD.md, "Demotion", term by term in plain Python: sum over the pairs i NOT demoted of
    -log p_ii - log q_ii, with every pair (demoted ones too) in each softmax's denominator."""
    s = logits.tolist()
    size, total = len(s), 0.0
    for i in range(size):
        if i in demoted:
            continue
        row = sum(math.exp(s[i][j]) for j in range(size))   # caption i over all images
        col = sum(math.exp(s[k][i]) for k in range(size))   # image i over all captions
        total += -math.log(math.exp(s[i][i]) / row) - math.log(math.exp(s[i][i]) / col)
    return total


@pytest.mark.parametrize("seed,size,demoted", [(0, 6, {2}), (1, 9, {0, 4, 8}), (2, 5, {0, 1, 2, 3}),
                                               (3, 4, {0, 1, 2, 3})])
def test_demoted_loss_matches_a_loop_over_the_definition(seed, size, demoted):
    logits = torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3
    mask = torch.tensor([i in demoted for i in range(size)])
    assert float(batch_loss(logits, demoted=mask)) == pytest.approx(_demoted_loss_by_loop(logits, demoted), abs=1e-10)
    # the demoted pairs' own terms are what is dropped (the identity with pos_terms)
    assert float(batch_loss(logits, demoted=mask)) == pytest.approx(float(pos_terms(logits)[~mask].sum()), abs=1e-10)
    if len(demoted) < size:  # not the loss without those pairs: they stay as in-batch negatives
        assert abs(float(batch_loss(logits, demoted=mask)) - float(batch_loss(_without(logits, sorted(demoted))))) > 1e-6
        s = logits.clone().requires_grad_(True)
        batch_loss(s, demoted=mask).backward()
        d = sorted(demoted)[0]
        others = [k for k in range(size) if k not in demoted]
        assert float(s.grad[others, d].abs().sum()) > 0  # other captions still push image d away
        assert float(s.grad[d, d]) == 0.0  # its own match score is no longer pulled up


def test_demoting_nothing_is_the_plain_loss():
    logits = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 2
    assert float(batch_loss(logits, demoted=torch.zeros(7, dtype=torch.bool))) == float(batch_loss(logits))
    assert float(batch_loss(logits)) == pytest.approx(_demoted_loss_by_loop(logits, set()), abs=1e-10)
    with pytest.raises(ValueError, match="demoted"):
        batch_loss(logits, demoted=torch.zeros(6, dtype=torch.bool))
