"""Detection metrics of a cell's scores against its truth file: the only code here that reads the truth.

A cell computes and saves every score (scores.npz) before this module opens truth.csv, so no ranking can
depend on it; the test suite checks that truth.csv is opened for reading from nowhere else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .. import scoring
from .scores import finite


def truth_labels(truth_csv: str | Path, ids: Sequence[str]) -> np.ndarray:
    """1 = corrupted caption, per id of `ids` (bench.quality.scoring's reader of the same file format)."""
    return scoring.truth_labels(truth_csv, ids)


def detection(scores: Mapping[str, np.ndarray], labels: np.ndarray, ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """auroc, ap, p@k (for ks <= n) and p@n_pos per score (higher = more suspicious), plus non-finite counts;
    none for a clean control (no corrupted pair to detect)."""
    out: dict[str, dict[str, float]] = {}
    if not labels.any():
        return out
    usable = [k for k in ks if k <= len(labels)]
    for name, values in scores.items():
        score, replaced = finite(values)
        report = scoring.evaluate({name: score}, labels, usable)[name]
        if replaced:
            report["non_finite"] = replaced
        out[name] = report
    return out


def evaluate_cell(scores: Mapping[str, np.ndarray], ids: Sequence[str], truth_csv: str | Path,
                  ks: Sequence[int]) -> tuple[dict[str, dict[str, float]], int]:
    """(metrics per score, number of corrupted pairs among `ids`)."""
    labels = truth_labels(truth_csv, ids)
    return detection(scores, labels, ks), int(labels.sum())


def flag_metrics(cell_folder: str | Path) -> dict[str, float]:
    """The audit's `suspected` flags against the truth: flagged fraction, precision and recall."""
    import csv

    folder = Path(cell_folder)
    with (folder / "audit" / "ranked.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    labels = truth_labels(folder / "truth.csv", [r["id"] for r in rows])
    flagged = np.array([r["suspected"] == "true" for r in rows])
    hits = float(labels[flagged].sum())
    return {"flagged": float(flagged.mean()), "precision": hits / flagged.sum() if flagged.any() else float("nan"),
            "recall": hits / max(float(labels.sum()), 1.0)}
