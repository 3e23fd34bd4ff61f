"""bench.quality: its metric, baseline and oracle code against hand-computed values and autograd, and a
reduced end-to-end run (`--quick`) whose outputs must exist and hold numbers in range."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.quality import baselines, report, scoring
from bench.quality.detection import METHODS, suspicion
from bench.quality.feature_cache import FeatureObjective, fit, projection_weights, tower_features
from bench.quality.fidelity import lds
from bench.quality.removal import removal_order
from bench.quality.tensors import Batch
from ecif_core.data.batching import hash_seed, rebatch_within
from ecif_core.influence.gradients import embed
from ecif_core.influence.losses import batch_loss, contrastive_terms, pair_logits
from ecif_core.models.factory import load_model, select_theta
from ecif_core.influence.projection import ProjectionSpec
from tests.core.helpers import MICRO_CONFIG, micro_model, random_batch

PROJECTIONS = ["visual.proj", "text_projection"]


# ---------------------------------------------------------------- metrics (scoring)

def test_roc_points_of_a_known_ranking_and_their_area_is_auroc() -> None:
    # Ranked labels 1, 0, 1, 0: after each threshold (tp, fp) = (1, 0), (1, 1), (2, 1), (2, 2).
    fpr, tpr = scoring.roc_points([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)  # the hand-computed AUROC (3 of 4 pos/neg pairs)
    # Tie between a positive and a negative at 0.5: one threshold, a diagonal step, area 0.875.
    fpr, tpr = scoring.roc_points([1.0, 0.5, 0.5, 0.0], [1, 1, 0, 0])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.875)
    # On the grid: the top of the vertical rise at FPR 0, the flat stretch at 0.25, the top again at 0.5.
    grid = np.array([0.0, 0.25, 0.5, 1.0])
    assert scoring.tpr_at([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], grid).tolist() == [0.5, 0.5, 1.0, 1.0]


def test_evaluate_a_known_ranking_by_hand(tmp_path: Path) -> None:
    # 10 pairs, the corrupted ones (a, c, f) ranked 1st, 3rd and 6th by the score.
    truth = tmp_path / "truth.csv"
    rows = ["id,split,label,caption_label,corrupted"] + [f"{i},train,0,0,{int(i in 'acf')}" for i in "abcdefghij"]
    rows.append("v1,val,0,0,0")
    truth.write_text("\n".join(rows) + "\n")
    ids = list("jihgfedcba")  # any order: labels follow ids
    labels = scoring.truth_labels(truth, ids)
    assert labels.tolist() == [0, 0, 0, 0, 1, 0, 0, 1, 0, 1]
    rank = {c: r for r, c in enumerate("abcdefghij", start=1)}
    scores = np.array([11.0 - rank[i] for i in ids])
    report_ = scoring.evaluate({"m": scores}, labels, ks=[2, 5, 50])["m"]
    # Negatives below each positive: a 7, c 6, f 4 -> AUROC (7 + 6 + 4) / (3 * 7).
    assert report_["auroc"] == pytest.approx(17 / 21)
    assert report_["ap"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 6) / 3)
    assert report_["p@2"] == 0.5 and report_["p@5"] == pytest.approx(2 / 5)
    assert report_["p@n_pos"] == pytest.approx(2 / 3)  # top 3 = a, b, c
    assert "p@50" not in report_  # k larger than the number of pairs is left out
    assert scoring.corrupted_share(truth, ["a", "b"]) == 0.5
    with pytest.raises(ValueError, match="no train row"):
        scoring.truth_labels(truth, ["v1"])


def test_scores_are_oriented_so_higher_is_more_suspicious() -> None:
    columns = {"clip_score": np.array([0.9, 0.1, 0.5, 0.2]), "self_influence": np.array([1.0, 3.0, 2.0, 4.0]),
               "influence": np.array([0.5, -2.0, 0.1, -1.0])}
    labels = [0, 1, 0, 1]
    for method in ("clip_score", "ecif_self_is", "ecif_is"):
        assert scoring.evaluate({method: suspicion(columns, method)}, np.array(labels), [1])[method]["auroc"] == 1.0
    assert suspicion(columns, "tracin_is") is None  # a column the run did not compute
    assert removal_order("ecif_is", columns, 0).tolist() == [1, 3, 2, 0]       # most negative IS first
    assert removal_order("valuable", columns, 0).tolist() == [0, 2, 3, 1]      # highest IS first
    assert sorted(removal_order("random", columns, 0).tolist()) == [0, 1, 2, 3]


def test_mean_sd_and_lds_spearman_on_known_vectors() -> None:
    assert scoring.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert scoring.mean_sd([0.5]) == (0.5, None)  # no spread from one value
    # ranks of y: 1, 2, 3.5, 5, 3.5 -> centred x (-2..2), y (-2, -1, .5, 2, .5): 8 / sqrt(10 * 9.5)
    out = lds({"ecif_is_sum": [1, 2, 3, 4, 5], "reversed": [5, 4, 3, 2, 1]}, np.array([5.0, 6, 7, 8, 7]))
    assert out["ecif_is_sum"]["spearman"] == pytest.approx(8 / math.sqrt(95))
    assert out["reversed"]["spearman"] == pytest.approx(-8 / math.sqrt(95))


# ---------------------------------------------------------------- baselines

def test_neg_clip_loss_matches_the_formula() -> None:
    # One batch holding both pairs, tau = 1: 1 - (1/2)(2 log(e + 1)) = 1 - log(1 + e).
    value = baselines.neg_clip_loss(torch.eye(2, dtype=torch.float64), tau=1.0, batch_size=2, repeats=1, seed=0)
    assert value == pytest.approx([1 - math.log(1 + math.e)] * 2)
    # Random batches: each pair's value is the formula on its own batch, averaged over the repeats.
    s = torch.tensor([[0.9, 0.1, -0.2, 0.3, 0.0], [0.2, 0.8, 0.1, -0.1, 0.4], [0.0, 0.3, 0.7, 0.2, -0.3],
                      [0.1, -0.2, 0.4, 0.6, 0.2], [0.3, 0.1, 0.0, 0.2, 0.5]], dtype=torch.float64)
    tau, expected = 0.1, np.zeros(5)
    for r in range(3):
        for group in rebatch_within(list(range(5)), 2, seed=hash_seed(4, r)):
            for i in group:
                row = sum(math.exp(s[i, k] / tau) for k in group)
                col = sum(math.exp(s[k, i] / tau) for k in group)
                expected[i] += (s[i, i].item() - tau / 2 * (math.log(row) + math.log(col))) / 3
    assert baselines.neg_clip_loss(s, tau, batch_size=2, repeats=3, seed=4) == pytest.approx(expected, rel=1e-12)


def test_checkpoint_weights_sum_the_trainers_learning_rates() -> None:
    # 2 epochs of 3 steps, no warm-up: lr(s) = lr * (1 + cos(pi s / 6)) / 2 (the trainer's cosine).
    lr_at = [1e-2 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]
    weights = baselines.checkpoint_weights(epochs=2, count=2, steps_per_epoch=3, lr=1e-2, warmup=0)
    assert weights == pytest.approx([sum(lr_at[:3]) / 3, sum(lr_at[3:]) / 3])


def _batches(model, sizes: list[int], seed: int) -> list[Batch]:
    out = []
    for b, size in enumerate(sizes):
        images, tokens = random_batch(model, size, seed=seed + b)
        out.append(Batch([f"p{seed}-{b}-{i}" for i in range(size)], [""] * size, images, tokens))
    return out


def test_tracin_equals_autograd_dot_products(tmp_path: Path) -> None:
    """Unprojected: sum_c w_c (grad Pos(n) + grad Neg(n)) . grad L' and sum_c w_c |grad Pos(n)|^2, by autograd."""
    checkpoints = []
    for c in range(2):
        path = tmp_path / f"c{c}.pt"
        torch.save(micro_model(seed=c).model.state_dict(), path)
        checkpoints.append(path)
    shapes = micro_model()
    train, val = _batches(shapes, [4, 3], seed=0), _batches(shapes, [4], seed=10)
    weights = [0.3, 0.7]
    result = baselines.tracin_scores(MICRO_CONFIG, checkpoints, weights, PROJECTIONS, ProjectionSpec(None, None, 0),
                                     train, val)
    tracin, self_tracin = np.zeros(7), np.zeros(7)
    for path, w in zip(checkpoints, weights):
        model = load_model(config=MICRO_CONFIG, checkpoint=path).model
        params = [p for _, p in select_theta(model, PROJECTIONS)]
        scale = model.logit_scale.detach().exp()

        def flat(value: torch.Tensor) -> torch.Tensor:
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params, retain_graph=True)]).double()

        val_grad = flat(batch_loss(pair_logits(*embed(model, val[0].images, val[0].tokens), scale))) / 4
        row = 0
        for b in train:
            for n in range(len(b.ids)):
                pos, neg = contrastive_terms(pair_logits(*embed(model, b.images, b.tokens), scale))
                tracin[row] += w * float(flat(pos[n] + neg[n]) @ val_grad)
                self_tracin[row] += w * float(flat(pos[n]).square().sum())
                row += 1
    assert result.ids == [i for b in train for i in b.ids]
    assert result.tracin == pytest.approx(tracin, rel=1e-4, abs=1e-9)
    assert result.self_tracin == pytest.approx(self_tracin, rel=1e-4)


# ---------------------------------------------------------------- the fidelity oracle

def test_feature_cache_objective_equals_the_real_models_loss_and_group_gradient() -> None:
    loaded = micro_model(seed=3)
    model = loaded.model
    batches = _batches(loaded, [4, 4, 3], seed=20)  # unequal sizes: the cache pads the last batch
    scale = float(model.logit_scale.detach().exp())
    image, text = tower_features(model, batches)
    rows = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    objective = FeatureObjective(image, text, rows, scale)
    with torch.no_grad():
        real = sum(float(batch_loss(pair_logits(*embed(model, b.images, b.tokens), scale))) for b in batches)
    weights = projection_weights(model)
    assert float(objective(*weights)) == pytest.approx(real, rel=1e-6)
    # Group form = L_full - L_without(E), so its gradient is that of the masked objective's difference.
    members = {0: [1, 3], 2: [0]}
    without = objective.without([[0, 2], [4, 5, 6, 7], [9, 10]])
    w = [t.clone().requires_grad_(True) for t in weights]
    expected = torch.autograd.grad(objective(*w) - without(*w), w)
    got = objective.group_gradient(members, *weights)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-12)


def test_fit_reaches_a_stationary_point_of_the_anchored_objective() -> None:
    loaded = micro_model(seed=4)
    batches = _batches(loaded, [4, 4], seed=30)
    image, text = tower_features(loaded.model, batches)
    objective = FeatureObjective(image, text, [[0, 1, 2, 3], [4, 5, 6, 7]], float(loaded.model.logit_scale.detach().exp()))
    anchor = projection_weights(loaded.model)
    result = fit(objective, anchor, anchor, l2=10.0)
    w = [t.clone().requires_grad_(True) for t in result.weights]
    value = objective(*w) + 5.0 * sum(((a - b) ** 2).sum() for a, b in zip(w, anchor))
    assert max(float(g.abs().max()) for g in torch.autograd.grad(value, w)) < 1e-6
    assert result.loss <= float(objective(*anchor))


# ---------------------------------------------------------------- report

def test_targets_compare_the_right_numbers() -> None:
    cell = {"methods": {"ecif_self_is": {"auroc": [0.96, 0.01], "p@50": [0.85, 0.0]},
                        "clip_score": {"auroc": [0.90, 0.0]}, "neg_clip_loss": {"auroc": [0.97, 0.0]}}}
    by_percent = lambda acc: {"0.1": {"zero_shot_accuracy": [acc, 0.0]}}  # noqa: E731
    results = {"settings": {"removal_seeds": [0]}, "detection": {"summary": {"shuffle": {"0.2": cell}}},
               "removal": {"summary": {"none": {"zero_shot_accuracy": [0.70, 0.0]},
                                       "methods": {"ecif_self_is": by_percent(0.75), "random": by_percent(0.72),
                                                   "valuable": by_percent(0.60)}}},
               "fidelity": {"projections": {"8": {"methods": {"ecif_is_sum": {"label": "sum", "spearman": 0.65},
                                                              "ecif_is_group": {"label": "group", "spearman": 0.55}}}}}}
    met = [t["met"] for t in report.targets(results)]
    # AUROC 0.96 >= 0.95; P@50 0.85 < 0.9; loses to negCLIPLoss; removal beats none and random; brittle;
    # LDS 0.65 >= 0.6, group 0.55 < 0.6.
    assert met == [True, False, False, True, True, True, False]


# ---------------------------------------------------------------- end to end (reduced)

def test_quick_run_writes_every_output_with_numbers_in_range(tmp_path: Path, monkeypatch) -> None:
    """`python -m bench.quality --quick`; every audit runs with the run's truth.csv moved away."""
    from bench.quality import __main__ as cli
    from bench.quality import runs

    audits = []
    real_run_audit = runs.run_audit

    def audit_without_truth(manifest_path, folder):
        manifest = json.loads(Path(manifest_path).read_text())
        truth = Path(manifest["train"]).parent / "truth.csv"
        hidden = truth.with_name("hidden.csv")
        truth.rename(hidden)
        try:
            assert "truth" not in json.dumps(manifest)
            return real_run_audit(manifest_path, folder)
        finally:
            hidden.rename(truth)
            audits.append(folder)

    monkeypatch.setattr(runs, "run_audit", audit_without_truth)
    out = tmp_path / "quality"
    cli.main(["--quick", "--out", str(out)])
    assert len(audits) >= 4  # exact, first-order, paper, and the fidelity audits
    results = json.loads((out / "results.json").read_text())
    for name in ("RESULTS.md", "roc_shuffle.png", "removal_accuracy.png", "fidelity_k8.png"):
        assert (out / name).stat().st_size > 0
    assert "| target | measured | met |" in (out / "RESULTS.md").read_text()
    cell = results["detection"]["summary"]["shuffle"]["0.2"]
    assert len(cell["methods"]) == len(METHODS)
    for metrics in cell["methods"].values():
        for key in ("auroc", "ap", "p@10", "p@50", "p@n_pos"):
            assert 0.0 <= metrics[key][0] <= 1.0
    for by_percent in results["removal"]["summary"]["methods"].values():
        assert 0.0 <= by_percent["0.1"]["zero_shot_accuracy"][0] <= 1.0
        assert by_percent["0.1"]["test_loss"][0] > 0
    fidelity = results["fidelity"]
    for m in fidelity["projections"]["8"]["methods"].values():
        assert -1.0 <= m["spearman"] <= 1.0
    assert fidelity["checks"]["objective_vs_forward"]["relative_difference"] < 1e-5
    floor = fidelity["checks"]["noise_floor"]
    assert floor["refit_from_perturbed_abs_change"] < 0.01 * floor["actual_std"]  # refits converge far below the signal
    checks = fidelity["projections"]["8"]["checks"]
    assert checks["pair_gradient_max_relative_error"] < 1e-3
    assert checks["val_loss_cached"] == pytest.approx(checks["val_loss_audit"], rel=1e-5)
    assert 0 < results["cost"]["audit_over_train"][0] < 10
