"""The evidence behind each pair's `suspicion`, as the report shows it: the robust z-score of each
model's CLIP score and its weight, so that suspicion = sum(weight x z) can be read off a card.

The terms are ecif_core.ranking's own (`evidence_terms`, the ones `evidence_weighted` sums for the
default rule), never a copy of the weighting: the parts add up to the stored `suspicion` column
(tests/services/test_review_page.py checks it)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ecif_core.ranking import EVIDENCE_RULE, evidence_terms

AUDITED = EVIDENCE_RULE[0]
LABELS = {AUDITED: "audited model's leave-own-out CLIP score",
          "reference_clip_score": "reference model's CLIP score",
          "reference_negclip": "reference model's negCLIPLoss"}


@dataclass(frozen=True)
class EvidencePart:
    """One term of suspicion: `weight` x `z` (z per pair, in the rows' order)."""

    label: str        # what the z-score is of, in words
    column: str       # the ranked.csv column it is computed from
    auroc: float | None   # the model's AUROC (ranking.model_auroc; None: no validation set)
    weight: float     # normalised: the parts' weights sum to 1
    z: np.ndarray


def evidence_parts(columns: dict[str, np.ndarray], evidence: dict | None) -> list[EvidencePart]:
    """The parts of `suspicion` for every scored pair; [] when the audit has no `clip_score_loo`
    (rows of an audit older than the evidence rule)."""
    audited = columns.get(AUDITED)
    if audited is None or np.isnan(audited).all():
        return []
    scores = {name: torch.from_numpy(np.asarray(values, dtype=np.float64)) for name, values in columns.items()
              if name in LABELS}
    terms = evidence_terms(scores, *EVIDENCE_RULE, evidence)
    total = sum(term.weight for term in terms)
    return [EvidencePart(LABELS[term.column], term.column, term.auroc, term.weight / total, term.values.numpy())
            for term in terms]
