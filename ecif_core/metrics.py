"""Detection metrics for ranking misaligned pairs, in plain numpy.

Convention everywhere: a higher score means "more likely a positive" (label 1, e.g. a corrupted
pair). Inputs are validated strictly (lengths, 0/1 labels, finite scores, both classes present
where a metric needs them) so a benchmark fails loudly instead of reporting a wrong number.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike


def _scores(values: ArrayLike, name: str) -> np.ndarray:
    """1-D, non-empty, finite float64 copy of `values`; `name` goes in the error."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, found {int(np.sum(~np.isfinite(array)))} NaN/inf value(s)")
    return array


def _scored_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels as bool) after checking equal length and labels in {0, 1}."""
    score_array = _scores(scores, "scores")
    label_array = np.asarray(labels)
    if label_array.ndim != 1 or len(label_array) != len(score_array):
        raise ValueError(f"labels must be 1-D with the length of scores ({len(score_array)}), got shape {label_array.shape}")
    if label_array.dtype != bool:
        try:
            numeric = label_array.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"labels must be 0/1, got dtype {label_array.dtype}") from None
        bad = ~np.isin(numeric, (0.0, 1.0))
        if np.any(bad):
            raise ValueError(f"labels must be 0/1, got {np.unique(label_array[bad])[:5].tolist()}")
        label_array = numeric == 1.0
    return score_array, label_array


def _require_both_classes(labels: np.ndarray) -> None:
    """AUROC and AP are undefined without positives (and AUROC without negatives)."""
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise ValueError("labels contain no positives (label 1)")
    if n_pos == len(labels):
        raise ValueError("labels contain no negatives (label 0)")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts) - 1
    bounds = np.r_[np.flatnonzero(starts), len(values)]  # group g spans ordered[bounds[g]:bounds[g+1]]
    ranks = np.empty(len(values))
    ranks[order] = 0.5 * (bounds[group] + bounds[group + 1] + 1)
    return ranks


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 1/2 P(tie) (Mann-Whitney U / n+ n-)."""
    score_array, label_array = _scored_labels(scores, labels)
    _require_both_classes(label_array)
    n_pos = int(label_array.sum())
    n_neg = len(label_array) - n_pos
    u = _average_ranks(score_array)[label_array].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def soft_auroc(scores: ArrayLike, positive_probability: ArrayLike) -> float:
    """AUROC against soft labels: the pair (i, j), i != j, counts with weight p_i (1 - p_j), scoring 1 when
    score_i > score_j and 1/2 on a tie. With 0/1 probabilities it is `auroc`. Used to judge a model on its
    own training pairs against another model's posterior (calibration.training_evidence)."""
    score_array = _scores(scores, "scores")
    p = np.asarray(positive_probability, dtype=np.float64)
    if p.shape != score_array.shape or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"positive_probability must be in [0, 1] with the length of scores ({len(score_array)})")
    q = 1.0 - p
    order = np.argsort(score_array, kind="stable")
    ordered, p, q = score_array[order], p[order], q[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts) - 1
    group_q = np.bincount(group, weights=q)
    below = np.r_[0.0, np.cumsum(group_q)[:-1]][group]            # negatives' weight strictly below
    wins = (p * (below + 0.5 * (group_q[group] - q))).sum()        # ties: half, never the pair with itself
    total = (p * (q.sum() - q)).sum()
    if total <= 0:
        raise ValueError("positive_probability must hold both positive and negative weight")
    return float(wins / total)


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """sum_t (R_t - R_{t-1}) P_t over distinct score thresholds t, descending (as sklearn).

    Tied scores form one threshold, so their order never matters.
    """
    score_array, label_array = _scored_labels(scores, labels)
    _require_both_classes(label_array)
    order = np.argsort(-score_array, kind="stable")
    ordered, hits = score_array[order], label_array[order]
    last_of_tie = np.r_[ordered[1:] != ordered[:-1], True]
    true_pos = np.cumsum(hits)[last_of_tie]
    seen = (np.flatnonzero(last_of_tie) + 1).astype(np.float64)
    recall_step = np.diff(np.r_[0, true_pos]) / true_pos[-1]
    return float(np.sum(recall_step * (true_pos / seen)))


def precision_at_k(scores: ArrayLike, labels: ArrayLike, k: int) -> float:
    """Share of positives among the k highest scores.

    Ties at the cut are broken by order of appearance (a stable sort on descending score): of
    equal scores, the earlier one in `scores` ranks higher. Needs no positives: 0.0 is valid.
    """
    score_array, label_array = _scored_labels(scores, labels)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(score_array):
        raise ValueError(f"k must be an integer in [1, {len(score_array)}] (the number of scores), got {k!r}")
    top = np.argsort(-score_array, kind="stable")[: int(k)]
    return float(label_array[top].mean())


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties share a rank)."""
    x_array, y_array = _scores(x, "x"), _scores(y, "y")
    if len(x_array) != len(y_array):
        raise ValueError(f"y must have the length of x ({len(x_array)}), got {len(y_array)}")
    if len(x_array) < 2:
        raise ValueError(f"x must hold at least 2 values, got {len(x_array)}")
    centred = []
    for name, values in (("x", x_array), ("y", y_array)):
        ranks = _average_ranks(values)
        ranks -= ranks.mean()
        if not np.any(ranks):
            raise ValueError(f"{name} is constant, so its rank correlation is undefined")
        centred.append(ranks)
    rx, ry = centred
    value = float(np.dot(rx, ry) / np.sqrt(np.dot(rx, rx) * np.dot(ry, ry)))
    return min(1.0, max(-1.0, value))


def detection_report(scores: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    """auroc, ap, p@k for each k in ks, and p@n_pos (R-precision: k = number of positives)."""
    score_array, label_array = _scored_labels(scores, labels)
    n = len(score_array)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n]
    if bad:
        raise ValueError(f"ks must hold integers in [1, {n}] (the number of scores), got {list(bad)!r}")
    report = {"auroc": auroc(score_array, label_array), "ap": average_precision(score_array, label_array)}
    for k in ks:
        report[f"p@{int(k)}"] = precision_at_k(score_array, label_array, int(k))
    report["p@n_pos"] = precision_at_k(score_array, label_array, int(label_array.sum()))
    return report
