"""Detection metrics: hand-computed values, ties, edge cases, and sklearn/scipy as oracles."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from ecif_core.metrics import auroc, average_precision, detection_report, precision_at_k, soft_auroc, spearman

SCORES = [0.9, 0.8, 0.7, 0.6]
LABELS = [1, 0, 1, 0]


def test_hand_computed_small_example() -> None:
    # Positives 0.9, 0.7; negatives 0.8, 0.6. Pairs pos > neg: (0.9,0.8) (0.9,0.6) (0.7,0.6) = 3 of 4 -> 0.75.
    assert auroc(SCORES, LABELS) == pytest.approx(0.75)
    # Ranked 1,0,1,0: precision at each positive 1/1 and 2/3 -> AP = (1 + 2/3) / 2 = 0.8333.
    assert average_precision(SCORES, LABELS) == pytest.approx((1 + 2 / 3) / 2)
    # Top 2 are labels 1, 0 -> 0.5; top 1 -> 1.0; top 3 -> 2/3.
    assert precision_at_k(SCORES, LABELS, 2) == pytest.approx(0.5)
    assert precision_at_k(SCORES, LABELS, 1) == pytest.approx(1.0)
    assert precision_at_k(SCORES, LABELS, 3) == pytest.approx(2 / 3)


def test_perfect_and_inverted_rankings() -> None:
    labels = [1, 1, 0, 0, 0]
    perfect = [5.0, 4.0, 3.0, 2.0, 1.0]
    inverted = perfect[::-1]
    assert auroc(perfect, labels) == 1.0
    assert auroc(inverted, labels) == 0.0
    assert average_precision(perfect, labels) == 1.0
    # Inverted: positives at ranks 4 and 5 -> AP = (1/4 + 2/5) / 2 = 0.325.
    assert average_precision(inverted, labels) == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert precision_at_k(perfect, labels, 2) == 1.0
    assert precision_at_k(inverted, labels, 2) == 0.0


def test_ties_count_half_in_auroc_and_one_threshold_in_ap() -> None:
    # All scores equal: every pos/neg pair is a tie -> AUROC 1/2; one threshold -> AP = prevalence 2/5.
    assert auroc([0.3] * 5, [1, 0, 1, 0, 0]) == pytest.approx(0.5)
    assert average_precision([0.3] * 5, [1, 0, 1, 0, 0]) == pytest.approx(0.4)
    # scores [1, 0.5, 0.5, 0]: pos {1, 0.5}, neg {0.5, 0}. Pairs: (1>0.5) (1>0) (0.5=0.5 -> 1/2) (0.5>0)
    # -> (1 + 1 + 0.5 + 1) / 4 = 0.875.
    scores, labels = [1.0, 0.5, 0.5, 0.0], [1, 1, 0, 0]
    assert auroc(scores, labels) == pytest.approx(0.875)
    # Thresholds 1 (P=1, R=1/2), 0.5 (P=2/3, R=1) -> AP = 1/2 * 1 + 1/2 * 2/3 = 0.8333; tie order irrelevant.
    assert average_precision(scores, labels) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision([1.0, 0.5, 0.5, 0.0], [1, 0, 1, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_precision_at_k_breaks_ties_by_order_of_appearance() -> None:
    # Three tied scores; the cut at k=1 takes the first of them in input order.
    assert precision_at_k([0.5, 0.5, 0.5], [0, 1, 1], 1) == 0.0
    assert precision_at_k([0.5, 0.5, 0.5], [1, 0, 0], 1) == 1.0
    assert precision_at_k([0.1, 0.5, 0.5], [1, 1, 0], 1) == 1.0
    assert precision_at_k([0.1, 0.2], [0, 0], 1) == 0.0  # no positives is fine for p@k


def test_spearman_hand_values_and_ties() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # x ranks 1,2,3; y = [1, 1, 2] ranks 1.5,1.5,3. Centred: (-1,0,1), (-.5,-.5,1) -> 1.5/sqrt(2*1.5) = 0.8660.
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(1.5 / np.sqrt(3.0))


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_sklearn_and_scipy_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    labels = rng.random(n) < 0.2
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + labels
    scores[::7] = np.round(scores[::7], 1)  # plant ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    coarse = np.round(scores)  # heavy ties
    assert auroc(coarse, labels) == pytest.approx(roc_auc_score(labels, coarse), abs=1e-12)
    assert average_precision(coarse, labels) == pytest.approx(average_precision_score(labels, coarse), abs=1e-12)
    x, y = np.round(rng.normal(size=n), 1), np.round(rng.normal(size=n) + 0.3 * np.arange(n) / n, 1)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    k = 37
    top = np.argsort(-scores, kind="stable")[:k]
    assert precision_at_k(scores, labels, k) == pytest.approx(labels[top].mean())


def test_detection_report_keys_and_values() -> None:
    report = detection_report(SCORES, LABELS, ks=(1, 2))
    assert set(report) == {"auroc", "ap", "p@1", "p@2", "p@n_pos"}
    assert report["auroc"] == pytest.approx(0.75)
    assert report["ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert report["p@n_pos"] == pytest.approx(0.5)  # n_pos = 2 -> top 2 = labels 1, 0
    rng = np.random.default_rng(0)
    labels = rng.random(100) < 0.3
    default = detection_report(rng.normal(size=100), labels)
    assert set(default) == {"auroc", "ap", "p@10", "p@50", "p@n_pos"}


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: auroc([0.1, 0.2], [1, 0, 1]), "labels"),
        (lambda: auroc([0.1, 0.2], [1, 2]), "labels"),
        (lambda: auroc([0.1, 0.2], [0.5, 1]), "labels"),
        (lambda: auroc([0.1, float("nan")], [1, 0]), "scores"),
        (lambda: auroc([], []), "scores"),
        (lambda: auroc([0.1, 0.2], [0, 0]), "positives"),
        (lambda: auroc([0.1, 0.2], [1, 1]), "negatives"),
        (lambda: average_precision([0.1, 0.2], [0, 0]), "positives"),
        (lambda: average_precision([0.1, 0.2, 0.3], [1, 0]), "labels"),
        (lambda: precision_at_k([0.1, 0.2], [1, 0], 0), "k"),
        (lambda: precision_at_k([0.1, 0.2], [1, 0], 3), "k"),
        (lambda: precision_at_k([0.1, 0.2], [1, 0], 1.5), "k"),
        (lambda: spearman([1, 2, 3], [1, 2]), "y"),
        (lambda: spearman([1, 1, 1], [1, 2, 3]), "x"),
        (lambda: spearman([1], [1]), "x"),
        (lambda: detection_report([0.1, 0.2, 0.3], [1, 0, 1], ks=(10,)), "ks"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()


def test_boolean_and_float_labels_accepted() -> None:
    assert auroc(SCORES, np.array(LABELS, dtype=bool)) == pytest.approx(0.75)
    assert auroc(SCORES, np.array(LABELS, dtype=float)) == pytest.approx(0.75)


def test_soft_auroc_is_the_weighted_pair_count_and_auroc_on_hard_labels() -> None:
    """soft_auroc against the double loop over its definition (pairs i != j weighted p_i (1 - p_j), ties
    half), and equal to auroc when the probabilities are 0/1."""
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=50), 1)          # ties
    p = rng.random(50)
    wins = total = 0.0
    for i in range(50):
        for j in range(50):
            if i != j:
                weight = p[i] * (1 - p[j])
                total += weight
                wins += weight * ((scores[i] > scores[j]) + 0.5 * (scores[i] == scores[j]))
    assert soft_auroc(scores, p) == pytest.approx(wins / total, abs=1e-12)
    labels = rng.random(50) < 0.3
    assert soft_auroc(scores, labels.astype(float)) == pytest.approx(auroc(scores, labels), abs=1e-12)
    with pytest.raises(ValueError, match="positive_probability"):
        soft_auroc(scores, np.full(50, 1.5))
