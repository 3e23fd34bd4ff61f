"""IS, self-IS, Gram entries and relative-IS against direct linear algebra (torch.linalg.solve)."""
import numpy as np
import pytest
import torch

from ecif_core.influence.curvature import DampedInverse, default_damping, eigendecompose, fisher_sum
from ecif_core.data.manifest import AuditOptions
from ecif_core.influence.projection import Block
from ecif_core.influence.scores import pair_scores, relative_is
from ecif_core.ranking import misalignment_score, ranking


def _problem(seed: int = 0, n: int = 30, k: int = 12):
    g = torch.Generator().manual_seed(seed)
    g_pos, g_neg = torch.randn(n, k, generator=g, dtype=torch.float64), torch.randn(n, k, generator=g, dtype=torch.float64)
    return g_pos, g_neg, torch.randn(k, generator=g, dtype=torch.float64)


def test_pair_scores_match_direct_solves():
    g_pos, g_neg, val = _problem()
    eigvals, eigvecs = eigendecompose(fisher_sum([g_pos], g_pos.shape[1]))
    shift = 0.7
    h = g_pos.T @ g_pos + shift * torch.eye(g_pos.shape[1], dtype=torch.float64)
    scores = pair_scores(g_pos, g_neg, DampedInverse(eigvals, eigvecs, shift), val)
    d_pos, d_neg = torch.linalg.solve(h, g_pos.T).T, torch.linalg.solve(h, g_neg.T).T
    torch.testing.assert_close(scores["influence_pos"], d_pos @ val)
    torch.testing.assert_close(scores["influence_neg"], d_neg @ val)
    torch.testing.assert_close(scores["influence"], (d_pos + d_neg) @ val)
    torch.testing.assert_close(scores["self_influence"], (g_pos * (d_pos + d_neg)).sum(1))
    torch.testing.assert_close(scores["gram_pos_neg"], (d_pos * d_neg).sum(1))
    torch.testing.assert_close(scores["gram_neg_neg"], (d_neg * d_neg).sum(1))


def test_without_validation_influence_is_nan_and_self_influence_ranks():
    g_pos, g_neg, _ = _problem(1)
    eigvals, eigvecs = eigendecompose(fisher_sum([g_pos], g_pos.shape[1]))
    damping = default_damping(eigvals, AuditOptions().damping_per_mean_eigenvalue)
    scores = pair_scores(g_pos, g_neg, DampedInverse(eigvals, eigvecs, damping), None)
    assert torch.isnan(scores["influence"]).all()
    order = ranking(misalignment_score(scores, "self_influence"))
    assert torch.equal(order, torch.argsort(scores["self_influence"], descending=True, stable=True))


def test_relative_is_is_length_of_projection_onto_the_two_directions():
    g_pos, g_neg, test = _problem(2)
    eigvals, eigvecs = eigendecompose(fisher_sum([g_pos], g_pos.shape[1]))
    inverse = DampedInverse(eigvals, eigvecs, 0.3)
    scores = pair_scores(g_pos, g_neg, inverse, test)
    got = relative_is(scores["influence_pos"], scores["influence_neg"], scores["gram_pos_pos"],
                      scores["gram_pos_neg"], scores["gram_neg_neg"])
    d_pos, d_neg = inverse.apply(g_pos), inverse.apply(g_neg)
    for n in range(len(g_pos)):
        basis = torch.stack([d_pos[n], d_neg[n]], dim=1)
        coef = torch.linalg.lstsq(basis, test.unsqueeze(1)).solution
        assert abs(float(got[n] - (basis @ coef).norm())) < 1e-8


def test_relative_is_parallel_directions_take_the_documented_fallback():
    direction = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    test = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)
    for d_neg in (3.0 * direction, torch.zeros(3, dtype=torch.float64)):  # parallel, and one zero direction
        a = torch.stack([test @ direction, test @ d_neg]).unsqueeze(1)
        got = relative_is(a[0], a[1], (direction @ direction).reshape(1), (direction @ d_neg).reshape(1),
                          (d_neg @ d_neg).reshape(1))
        expected = abs(float(test @ direction)) / float(direction.norm())
        assert abs(float(got[0]) - expected) < 1e-12


def test_block_curvature_is_block_diagonal():
    g_pos, _, _ = _problem(3, k=6)
    fisher = fisher_sum([g_pos], 6)
    blocks = [Block("a", 0, 2), Block("b", 2, 6)]
    eigvals, eigvecs = eigendecompose(fisher, blocks)
    rebuilt = eigvecs @ torch.diag(eigvals) @ eigvecs.T
    expected = torch.zeros_like(fisher)
    expected[:2, :2], expected[2:, 2:] = fisher[:2, :2], fisher[2:, 2:]
    torch.testing.assert_close(rebuilt, expected)


def test_damping_is_applied_at_use_time():
    g_pos, g_neg, val = _problem(4)
    eigvals, eigvecs = eigendecompose(fisher_sum([g_pos], g_pos.shape[1]))
    weak = pair_scores(g_pos, g_neg, DampedInverse(eigvals, eigvecs, 0.01), val)["influence"]
    strong = pair_scores(g_pos, g_neg, DampedInverse(eigvals, eigvecs, 100.0), val)["influence"]
    assert weak.abs().mean() > strong.abs().mean()


def test_leverage_and_its_leave_own_out_form_match_direct_solves():
    from ecif_core.influence.scores import leave_own_out_leverage, robust_outliers

    g_pos, g_neg, _ = _problem(5, n=20, k=8)
    shift = 0.5
    eigvals, eigvecs = eigendecompose(fisher_sum([g_pos], 8))
    scores = pair_scores(g_pos, g_neg, DampedInverse(eigvals, eigvecs, shift), None)
    h = g_pos.T @ g_pos + shift * torch.eye(8, dtype=torch.float64)
    for n in range(len(g_pos)):
        g = g_pos[n]
        assert abs(float(scores["leverage"][n]) - float(torch.dot(g, torch.linalg.solve(h, g)))) < 1e-10
        others = h - torch.outer(g, g)  # the curvature without pair n's own term
        expected = float(torch.dot(g, torch.linalg.solve(others, g)))
        assert abs(float(leave_own_out_leverage(scores["leverage"][n:n + 1])[0]) - expected) < 1e-8 * max(1, expected)
    assert ((scores["leverage"] >= 0) & (scores["leverage"] < 1)).all()
    values = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 9.0])
    assert robust_outliers(values, 3.5).tolist() == [False] * 6 + [True]
    assert not robust_outliers(torch.ones(5), 3.5).any()


def test_self_influence_clip_and_per_example_influence_match_direct_solves():
    """self_influence_clip = C^T H^-1 (g_pos + g_neg); per-example influence: z_ni = v_i^T H^-1 g(n) / s_i,
    s_i^2 = (H^-1 v_i)^T F (H^-1 v_i) / N, aggregated as mean(min(z, 0)), mean(z) and min(z)."""
    g_pos, g_neg, _ = _problem(4)
    gen = torch.Generator().manual_seed(9)
    g_clip = torch.randn(g_pos.shape, generator=gen, dtype=torch.float64)
    examples = torch.randn(7, g_pos.shape[1], generator=gen, dtype=torch.float64)
    fisher = g_pos.T @ g_pos
    eigvals, eigvecs = eigendecompose(fisher)
    shift = 0.3
    h = fisher + shift * torch.eye(g_pos.shape[1], dtype=torch.float64)
    scores = pair_scores(g_pos, g_neg, DampedInverse(eigvals, eigvecs, shift), examples.mean(0), g_clip=g_clip,
                         validation_examples=examples, pairs=len(g_pos))
    g = g_pos + g_neg
    torch.testing.assert_close(scores["self_influence_clip"], (g_clip * torch.linalg.solve(h, g.T).T).sum(1))
    d = torch.linalg.solve(h, examples.T).T                               # (m, k) H^-1 v_i
    spread = ((d @ fisher) * d).sum(1).div(len(g_pos)).sqrt()
    z = (g @ d.T) / spread
    torch.testing.assert_close(scores["influence_per_example"], z.clamp_max(0).mean(1))
    torch.testing.assert_close(scores["influence_per_example_mean"], z.mean(1))
    torch.testing.assert_close(scores["influence_per_example_min"], z.min(1).values)
    # without validation examples or C: NaN, never zeros that would rank
    bare = pair_scores(g_pos, g_neg, DampedInverse(eigvals, eigvecs, shift), None)
    assert torch.isnan(bare["self_influence_clip"]).all() and torch.isnan(bare["influence_per_example"]).all()


def test_every_ranking_rule_is_oriented_by_the_suspicion_table():
    """A single-column rule ranks by sign x column: high self-influence first, low cosine first, the most
    negative influence first. Flipping a sign in SUSPICION_SIGN (or in misalignment_score) fails here."""
    from ecif_core.ranking import SINGLE_RANKINGS, SUSPICION_SIGN

    expected = {"self_influence": 1, "self_influence_clip": 1, "influence": -1, "influence_per_example": -1,
                "clip_score": -1, "clip_score_loo": -1, "reference_clip_score": -1, "reference_negclip": -1}
    assert {name: SUSPICION_SIGN[name] for name in SINGLE_RANKINGS} == expected
    columns = {name: torch.tensor([0.1, 0.5, -0.2], dtype=torch.float64) for name in SINGLE_RANKINGS}
    columns["influence_pos"] = columns["influence_neg"] = columns["influence"]
    for name, sign in expected.items():
        first = int(ranking(misalignment_score(columns, name))[0])
        assert first == (1 if sign > 0 else 2), name


def test_evidence_ranking_is_the_evidence_weighted_mean_of_robust_z_scores():
    """The default rule: z(-clip_score_loo) weighted by 2 AUROC_audited - 1 and z(-reference_negclip) (or
    z(-reference_clip_score) where the audit has no negCLIPLoss) by 2 AUROC_reference - 1 (robust z = (x - median) / 1.4826 MAD); without a reference, the audited part
    alone; a model at chance gets weight 0. Swapping the column, the sign or the weights fails here."""
    from ecif_core.ranking import DEFAULT_RANK_BY, EVIDENCE_RULE

    gen = torch.Generator().manual_seed(3)
    loo = torch.rand(40, generator=gen, dtype=torch.float64)
    ref = torch.rand(40, generator=gen, dtype=torch.float64)
    cols = {"clip_score_loo": loo, "reference_clip_score": ref}
    evidence = {"clip_score": {"mean": 0.8}, "reference_clip_score": {"mean": 0.95}}

    def z(x):  # numpy's median (the midpoint of the middle two of 40 values), independent of torch's
        med = float(np.median(x.numpy()))
        return (x - med) / (1.4826 * float(np.median((x - med).abs().numpy())))

    expected = (0.6 * z(-loo) + 0.9 * z(-ref)) / 1.5
    assert DEFAULT_RANK_BY == "evidence" and EVIDENCE_RULE == ("clip_score_loo", 1.0, "z")
    torch.testing.assert_close(misalignment_score(cols, "evidence", evidence), expected)
    blind = {"clip_score": {"mean": 0.8}, "reference_clip_score": {"mean": 0.45}}   # below chance: weight 0
    torch.testing.assert_close(misalignment_score(cols, "evidence", blind), z(-loo))
    alone = {"clip_score_loo": loo, "reference_clip_score": torch.full_like(ref, float("nan"))}
    torch.testing.assert_close(misalignment_score(alone, "evidence", evidence), z(-loo))
    # an audit with the reference's negCLIPLoss (every audit since it is averaged over batches) uses it instead
    negclip = torch.rand(40, generator=gen, dtype=torch.float64)
    both = {**cols, "reference_negclip": negclip}
    torch.testing.assert_close(misalignment_score(both, "evidence", evidence), (0.6 * z(-loo) + 0.9 * z(-negclip)) / 1.5)


def test_combined_ranking_is_the_mean_normalised_rank_of_self_influence_and_negative_influence():
    cols = {"self_influence": torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64),
            "influence": torch.tensor([-0.5, 0.4, 0.1], dtype=torch.float64)}
    # ranks / (n - 1): self_influence (1, 0, 0.5); -influence (1, 0, 0.5)
    torch.testing.assert_close(misalignment_score(cols, "combined"), torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    cols["influence"] = torch.full((3,), float("nan"), dtype=torch.float64)   # no validation: refused (ranking.RULES)
    with pytest.raises(ValueError, match="needs a validation set"):
        misalignment_score(cols, "combined")
