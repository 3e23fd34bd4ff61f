"""The evidence behind each pair's `suspicion`, as the report shows it: the robust z-score of each
model's CLIP score and its weight, so that suspicion = sum(weight x z) can be read off a card.

The numbers come from ecif_core.ranking's own functions (evidence_weighted for the z-scores,
evidence_weight for the weights), never a copy of the formula: the parts add up to the stored
`suspicion` column (tests/services/test_report.py checks it)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ecif_core.ranking import EVIDENCE_RULE, SUSPICION_SIGN, evidence_weight, evidence_weighted

AUDITED, POWER, SCALE = EVIDENCE_RULE
REFERENCE = "reference_clip_score"
# Both parts are oriented the same way (a low CLIP score is suspicious), so each is the robust z of
# one column computed as the single-part rule on the audited column's name.
assert SUSPICION_SIGN[AUDITED] == SUSPICION_SIGN[REFERENCE]


@dataclass(frozen=True)
class EvidencePart:
    """One term of suspicion: `weight` x `z` (z per pair, in the rows' order)."""

    label: str        # what the z-score is of, in words
    column: str       # the ranked.csv column it is computed from
    auroc: float | None   # the model's AUROC on the validation evidence (None: no validation set)
    weight: float     # normalised: the parts' weights sum to 1
    z: np.ndarray


def evidence_parts(columns: dict[str, np.ndarray], evidence: dict | None) -> list[EvidencePart]:
    """The parts of `suspicion` for every scored pair; [] when the audit has no `clip_score_loo`
    (rows of an audit older than the evidence rule)."""
    evidence = evidence or {}
    audited = columns.get(AUDITED)
    if audited is None or np.isnan(audited).all():
        return []
    found = [("audited model's leave-own-out CLIP score", AUDITED, audited, "clip_score")]
    reference = columns.get(REFERENCE)
    if reference is not None and not np.isnan(reference).all():
        found.append(("reference model's CLIP score", REFERENCE, reference, REFERENCE))
    aurocs = [evidence.get(key, {}).get("mean") for *_, key in found]
    weights = [evidence_weight(a, POWER) for a in aurocs]
    total = sum(weights)
    if total == 0:  # both at chance: the rule falls back to equal weights
        weights, total = [1.0] * len(found), float(len(found))
    return [EvidencePart(label, column, auroc, weight / total, _z(values))
            for (label, column, values, _), auroc, weight in zip(found, aurocs, weights)]


def _z(values: np.ndarray) -> np.ndarray:
    """The robust z-score (higher = more suspicious) the rule gives this column on its own."""
    return evidence_weighted({AUDITED: torch.from_numpy(values.astype(np.float64))}, AUDITED, POWER, SCALE,
                             None).numpy()
