"""The ranking rules: one table of every `rank_by` rule and of the `suspected` flag.

Each rule says what it needs besides the training gradients (a validation set, a reference
model), how its score is computed from the ranked.csv columns, and its orientation (every rule's
score is higher = more likely misaligned; a single-column rule gets there by the column's sign in
SUSPICION_SIGN). The manifest's checks, the audit's finalize stage, the report, the API schema and
README's table of rules all read this table (docs/METHOD.md, "Ranking rules and the suspected flag").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

Scores = Mapping[str, torch.Tensor]
Evidence = Mapping[str, Mapping[str, float]]

VALIDATION, REFERENCE = "validation", "reference"  # what a rule can need
NEED_TEXT = {VALIDATION: "a validation set", REFERENCE: "a reference model"}

# +1: a larger value is more suspicious; -1: a smaller one is. One table for every ranked.csv
# column a ranking, a removal spec or a benchmark orients (docs/METHOD.md, "Influence").
SUSPICION_SIGN: dict[str, int] = {
    "suspicion": 1, "self_influence": 1, "self_influence_clip": 1, "leave_own_out": 1,
    "influence": -1, "influence_pos": -1, "influence_neg": -1, "influence_per_example": -1,
    "clip_score": -1, "clip_score_loo": -1, "reference_clip_score": -1, "reference_negclip": -1, "rank": -1}

# The evidence rule (chosen on the fine-tuning benchmark's development seeds, bench/RESULTS.md):
# the robust z-score of the audited model's leave-own-out CLIP score (clip_score_loo, the seed's
# Algorithm 3) and of the reference model's score (REFERENCE_TERM), averaged with weights 2 AUROC - 1 from
# the evidence (evidence.py; model_auroc); the reference's alone where it judges the audited model's training
# pairs (reference_judges). It is also the statistic the `suspected` flag's fallback thresholds.
EVIDENCE_RULE = ("clip_score_loo", 1.0, "z")  # (audited column, weight power, scale)
# The reference's term in that rule: its negCLIPLoss averaged over random batches (models/reference.py), which
# ranked misaligned pairs better than its CLIP score in 16 of 18 groups of the fine-tuning benchmark
# (bench/RESULTS.md, "Calibration, every fraction and LoRA"); weighted by the reference's validation evidence
# (measured on cosines). An audit without it uses `reference_clip_score`.
REFERENCE_TERM = "reference_negclip"

# The flag: suspected = the default rule's score (the `suspicion` column) above SUSPECT_Z, a
# threshold chosen on the benchmark's development seeds for a precision of at least 0.8 on
# shuffled captions (README gives the precision by corruption type).
SUSPECT_Z = 3.0
SUSPICION_COLUMN = "suspicion"
# With a validation set the flag follows a precision target instead: the most probable pairs
# (misaligned_probability, calibration.py) while their mean probability stays >= this. SUSPECT_Z is the
# fallback when nothing can be estimated (no validation set, or models that did not learn the domain).
DEFAULT_FLAG_PRECISION = 0.9


@dataclass(frozen=True)
class RankingRule:
    """One `rank_by` value: what it needs, how its score (higher = more likely misaligned) is made."""

    name: str
    needs: tuple[str, ...]            # VALIDATION and/or REFERENCE; () = the training data alone
    score: str                        # how the score is computed, in words (README's table)
    compute: Callable[[Scores, Evidence | None], torch.Tensor]
    column: str | None = None         # the one ranked.csv column a single-column rule orders by

    @property
    def orientation(self) -> str:
        """Which end of the input column is suspicious (README's table)."""
        if self.column is None:
            return "higher score"
        return "higher" if SUSPICION_SIGN[self.column] > 0 else "lower"


def _single(column: str, need: str | None = None, what: str = "") -> RankingRule:
    def compute(scores: Scores, evidence: Evidence | None) -> torch.Tensor:
        values = scores[column].to(torch.float64)
        if torch.isnan(values).all():
            raise ValueError(f"rank_by={column!r} needs {NEED_TEXT[need] if need else 'its column'} "
                             "(the column is empty)")
        return SUSPICION_SIGN[column] * values
    return RankingRule(column, (need,) if need else (), what or f"`{column}`", compute, column)


def _evidence(scores: Scores, evidence: Evidence | None) -> torch.Tensor:
    return evidence_weighted(scores, *EVIDENCE_RULE, evidence)


def _combined(scores: Scores, evidence: Evidence | None) -> torch.Tensor:
    if torch.isnan(scores["influence"]).all():
        raise ValueError("rank_by='combined' needs a validation set (the influence column is empty)")
    return _rank_average(scores["self_influence"].to(torch.float64), -scores["influence"].to(torch.float64))


RULES: tuple[RankingRule, ...] = (
    RankingRule("evidence", (),
                "robust z-scores of `clip_score_loo` and `reference_negclip`, averaged with weights "
                "2 AUROC - 1 from the validation evidence (a model at chance on this domain gets weight 0; "
                "with a reference that knows the domain and never saw the training pairs, `reference_negclip` "
                "alone; without a reference, `clip_score_loo` alone; without a validation set, equal weights); "
                "this score is the `suspicion` column", _evidence),
    _single("self_influence"), _single("self_influence_clip"), _single("clip_score"), _single("clip_score_loo"),
    _single("influence", VALIDATION), _single("influence_per_example", VALIDATION),
    _single("reference_clip_score", REFERENCE), _single("reference_negclip", REFERENCE),
    RankingRule("combined", (VALIDATION,), "mean normalised rank of `self_influence` and of -`influence`",
                _combined),
)
RULE: dict[str, RankingRule] = {rule.name: rule for rule in RULES}
RANK_BY: tuple[str, ...] = tuple(RULE)
DEFAULT_RANK_BY = RULES[0].name
# Rankings by one column; what each needs besides the training gradients (None: nothing).
SINGLE_RANKINGS: dict[str, str | None] = {r.name: (r.needs[0] if r.needs else None) for r in RULES if r.column}
RankBy = str


def needs_of(rank_by: RankBy) -> tuple[str, ...]:
    """What the rule needs besides the training data (the manifest refuses it without them)."""
    return RULE[rank_by].needs


def misalignment_score(scores: Scores, rank_by: RankBy, evidence: Evidence | None = None) -> torch.Tensor:
    """Higher = more likely misaligned, for the chosen ranking rule. `evidence`: the validation
    stage's AUROC per model ({"clip_score": {"mean": ...}, "reference_clip_score": {...}})."""
    if rank_by not in RULE:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    return RULE[rank_by].compute(scores, evidence)


def suspicion(scores: Scores, evidence: Evidence | None) -> torch.Tensor:
    """The `suspicion` column: the default rule's score, which the `suspected` flag thresholds."""
    return misalignment_score(scores, DEFAULT_RANK_BY, evidence)


def suspected_flags(suspicion: np.ndarray, z: float = SUSPECT_Z) -> np.ndarray:
    """Pairs whose `suspicion` (the evidence-weighted robust z-score, the default ranking's score)
    is above SUSPECT_Z. Flags are pairs to review, not verdicts; re-threshold the `suspicion`
    column for another trade-off."""
    return np.nan_to_num(suspicion, nan=-np.inf) > z


def ranking(misalignment: torch.Tensor) -> torch.Tensor:
    """Row order, most suspicious first; ties keep the input order (stable)."""
    return torch.argsort(-misalignment.to(torch.float64), stable=True)


def model_auroc(evidence: Mapping[str, float]) -> float | None:
    """The AUROC a model's term is weighted by: its validation evidence (`mean`, how well it tells clean from
    corrupted unseen pairs)."""
    value = evidence.get("mean")
    return value if value is not None and value == value else None


def reference_judges(evidence: Evidence | None) -> bool:
    """A reference that knows the domain and never saw the training pairs judged the audited model's own
    training pairs (finalize.ranking_evidence records that AUROC as the audited model's `training` evidence,
    calibration.training_evidence, only then; NaN when the reference's posterior has nothing to judge by). The
    default ranking then reads the reference alone: a fine-tune scores the misaligned pairs it learned as
    aligned, which no unseen pair shows (docs/METHOD.md, "Ranking rules and the suspected flag")."""
    return ((evidence or {}).get("clip_score") or {}).get("training") is not None


def evidence_weight(auroc: float | None, power: float = 1.0) -> float:
    """(2 AUROC - 1)^power clipped at 0: 0 for a model at chance on this domain, 1 for a perfect one."""
    if auroc is None or auroc != auroc:
        return 1.0  # no validation set: no evidence either way, equal weights
    return max(0.0, 2.0 * auroc - 1.0) ** power


@dataclass(frozen=True)
class EvidenceTerm:
    """One term of an evidence-weighted score: `weight` x `values`, divided by the terms' total weight."""

    column: str                 # the ranked.csv column the term is computed from
    auroc: float | None         # that model's validation AUROC (model_auroc; None: no validation set)
    weight: float               # evidence_weight(auroc); 0 for the audited term when reference_judges; 1 for every
                                # term when all are 0; not yet normalised
    values: torch.Tensor        # the column oriented and normalised (rank or robust z): higher = more suspicious


def evidence_terms(scores: Scores, audited: str, power: float, how: str,
                   evidence: Evidence | None, reference_column: str = REFERENCE_TERM) -> list[EvidenceTerm]:
    """The terms of `evidence_weighted`: the audited model's `audited` column and, when the audit
    has one, the reference's `reference_column` (`reference_clip_score` where that one is empty), each
    weighted by its model's evidence on this data."""
    evidence = evidence or {}
    found = [(audited, "clip_score", SUSPICION_SIGN[audited] * scores[audited].to(torch.float64))]
    for column in dict.fromkeys((reference_column, "reference_clip_score")):
        reference = scores.get(column)
        if reference is not None and not torch.isnan(reference).all():
            found.append((column, "reference_clip_score", SUSPICION_SIGN[column] * reference.to(torch.float64)))
            break
    aurocs = [model_auroc(evidence.get(model, {})) for _, model, _ in found]
    weights = [evidence_weight(auroc, power) for auroc in aurocs]
    if len(found) > 1 and reference_judges(evidence):
        weights[0] = 0.0
    if sum(weights) == 0:  # both at chance: nothing to weigh by, equal weights
        weights = [1.0] * len(found)
    normalise = _normalised_rank if how == "rank" else _robust_z
    return [EvidenceTerm(column, auroc, weight, normalise(values))
            for (column, _, values), auroc, weight in zip(found, aurocs, weights)]


def evidence_weighted(scores: Scores, audited: str, power: float, how: str, evidence: Evidence | None) -> torch.Tensor:
    """Weighted mean of the normalised ranks (or robust z-scores) of the audited model's `audited`
    column and the reference's CLIP score, weighted by each model's evidence on this data. Without a
    reference it is the audited column alone (same order as ranking by it)."""
    terms = evidence_terms(scores, audited, power, how, evidence)
    return sum(term.weight * term.values for term in terms) / sum(term.weight for term in terms)


def _normalised_rank(column: torch.Tensor) -> torch.Tensor:
    """Rank in [0, 1] (NaN lowest)."""
    column = torch.nan_to_num(column, nan=-float("inf"))
    return torch.argsort(torch.argsort(column, stable=True)).to(torch.float64) / max(len(column) - 1, 1)


def _robust_z(column: torch.Tensor) -> torch.Tensor:
    """(x - median) / (1.4826 MAD), NaN lowest; a column with MAD 0 contributes its ranks instead."""
    finite = column[~torch.isnan(column)]
    median = torch.quantile(finite, 0.5)                    # the midpoint of the middle two for even counts
    mad = 1.4826 * torch.quantile((finite - median).abs(), 0.5)
    if float(mad) == 0.0:
        return _normalised_rank(column)
    return torch.nan_to_num((column - median) / mad, nan=float(((finite - median) / mad).min()))


def _rank_average(*columns: torch.Tensor) -> torch.Tensor:
    """Mean of the normalised ranks of the columns."""
    return torch.stack([_normalised_rank(c) for c in columns]).mean(dim=0)


def markdown_table() -> str:
    """README's table of ranking rules and of the flag (tests/core/test_ranking.py keeps them equal)."""
    lines = ["| `rank_by` | needs | score (higher = more likely misaligned) |", "| --- | --- | --- |"]
    for rule in RULES:
        needs = " and ".join(NEED_TEXT[n] for n in rule.needs) or "nothing more"
        score = rule.score if rule.column is None else f"{rule.orientation} `{rule.column}` first"
        default = " (default)" if rule.name == DEFAULT_RANK_BY else ""
        lines.append(f"| `\"{rule.name}\"`{default} | {needs} | {score} |")
    lines.append(f"\n`suspected`, whatever `rank_by` is: with a validation set, the pairs of highest `misaligned_probability` "
                 f"while their mean stays >= `options.flag_precision` (default {DEFAULT_FLAG_PRECISION:g}); when nothing can be "
                 f"estimated (no validation set, or models at chance on it), `{SUSPICION_COLUMN}` > {SUSPECT_Z:g}.")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m ecif_core.ranking: print README's table
    print(markdown_table())
