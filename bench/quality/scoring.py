"""Detection metrics against the ground truth: the only code of the benchmark that reads truth.csv.

Every score passed here follows "higher = more likely corrupted". The metrics themselves are
ecif_core.metrics (AUROC, AP, precision@k); this module adds ROC curves and mean/sd summaries.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ecif_core.datasets.digits import read_truth
from ecif_core.metrics import detection_report

FPR_GRID = np.linspace(0.0, 1.0, 101)


def truth_labels(truth_csv: str | Path, ids: Sequence[str]) -> np.ndarray:
    """0/1 per id (1 = corrupted caption), in the order of `ids`."""
    truth = read_truth(truth_csv)
    missing = [i for i in ids if i not in truth]
    if missing:
        raise ValueError(f"{len(missing)} ids have no train row in {truth_csv}: {missing[:3]}")
    return np.array([int(truth[i]) for i in ids])


def corrupted_share(truth_csv: str | Path, ids: Sequence[str]) -> float:
    """Share of corrupted pairs among `ids` (e.g. the pairs a method removed); NaN for none."""
    return float(truth_labels(truth_csv, ids).mean()) if len(ids) else float("nan")


def roc_points(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0) to (1, 1), one point per distinct score threshold (descending).

    Tied scores are one threshold, so the curve crosses a tie diagonally and its trapezoid area
    equals AUROC with ties counted 1/2.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if not (y.any() and (~y).any()):
        raise ValueError("ROC needs positives and negatives")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def tpr_at(scores: Sequence[float], labels: Sequence[int], grid: np.ndarray = FPR_GRID) -> np.ndarray:
    """The ROC curve's TPR at each FPR of `grid`; where the curve rises vertically, the top of the rise."""
    fpr, tpr = roc_points(scores, labels)
    xs, first = np.unique(fpr, return_index=True)
    bottom, top = tpr[first], np.maximum.reduceat(tpr, first)  # entering and leaving each distinct FPR
    j = np.clip(np.searchsorted(xs, grid, side="right") - 1, 0, len(xs) - 1)
    nxt = np.minimum(j + 1, len(xs) - 1)
    span = np.where(nxt > j, xs[nxt] - xs[j], 1.0)
    t = np.clip((grid - xs[j]) / span, 0.0, 1.0)
    return np.where(grid == xs[j], top[j], top[j] + t * (bottom[nxt] - top[j]))


def evaluate(methods: Mapping[str, np.ndarray], labels: np.ndarray, ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """detection_report (auroc, ap, p@k for ks, p@n_pos) per method; ks larger than n are left out."""
    usable = [k for k in ks if k <= len(labels)]
    return {name: detection_report(scores, labels, usable) for name, scores in methods.items()}


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    values = [float(v) for v in values]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None
