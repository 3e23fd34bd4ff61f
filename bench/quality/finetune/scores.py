"""Every ranking of one cell as a score where higher = more suspicious, read without the truth.

Product scores: each numeric ranked.csv column that ecif_core.edit.removal.SUSPICION_SIGN orients (+1: larger is
more suspicious, -1: smaller is; columns missing from that table, or empty, are skipped), and, when
ecif_core.stages offers it, every ranking rule of `misalignment_columns(audit_dir)` (already oriented).
Baseline scores are oriented by BASELINE_SIGN. NaN entries (a pair a rule could not score) are ranked least
suspicious, and counted.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ecif_core.edit import removal

# Raw baseline values -> suspicion: low CLIPScore / negCLIPLoss / TracIn are suspicious; high own loss and
# self-TracIn are.
BASELINE_SIGN: dict[str, int] = {"clip_score_audited": -1, "clip_score_reference": -1, "neg_clip_loss_reference": -1,
                                 "clip_score_crossfit": -1, "self_tracin": 1, "tracin": -1, "own_loss": 1}


def ranked_columns(ranked_csv: str | Path, signs: Mapping[str, int] | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
    """(ids in file order, {"ranked:<column>": sign * value}) for every oriented numeric column."""
    signs = removal.SUSPICION_SIGN if signs is None else signs
    with open(ranked_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    ids = [r["id"] for r in rows]
    out: dict[str, np.ndarray] = {}
    for column in (rows[0].keys() if rows else []):
        if column not in signs:
            continue
        values = np.array([_number(r[column]) for r in rows], dtype=np.float64)
        if np.isnan(values).all():
            continue
        out[f"ranked:{column}"] = signs[column] * values
    return ids, out


def _number(text: str) -> float:
    try:
        return float(text) if text not in ("", None) else float("nan")
    except ValueError:
        return float("nan")


def rule_columns(audit_dir: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """{"rank_by:<rule>": score} from ecif_core.stages.misalignment_columns, or nothing when it does not exist."""
    from ecif_core import stages as audit

    fn = getattr(audit, "misalignment_columns", None)
    if fn is None:
        return [], {}
    ids, columns = fn(audit_dir)
    return list(ids), {f"rank_by:{name}": np.asarray(values, dtype=np.float64) for name, values in columns.items()}


def oriented_baselines(raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"baseline:<name>": sign * value} for the baselines in BASELINE_SIGN."""
    return {f"baseline:{name}": BASELINE_SIGN[name] * np.asarray(values, dtype=np.float64)
            for name, values in raw.items()}


def aligned(values: np.ndarray, from_ids: Sequence[str], to_ids: Sequence[str]) -> np.ndarray:
    """`values` (ordered as from_ids) reordered as to_ids; every id of to_ids must be present."""
    position = {pair_id: i for i, pair_id in enumerate(from_ids)}
    return np.asarray(values)[np.array([position[i] for i in to_ids], dtype=np.int64)]


def finite(score: np.ndarray) -> tuple[np.ndarray, int]:
    """NaN / inf -> below every finite value (least suspicious), with the count replaced."""
    score = np.asarray(score, dtype=np.float64)
    bad = ~np.isfinite(score)
    if not bad.any():
        return score, 0
    low = np.min(score[~bad]) - 1.0 if (~bad).any() else 0.0
    return np.where(bad, low, score), int(bad.sum())
