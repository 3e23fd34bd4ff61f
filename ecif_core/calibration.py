"""How many training pairs are misaligned, how likely each one is, and which to flag for a target precision.

The `suspicion` score ranks pairs; it does not say how many are bad. The audit's validation pairs give
the two distributions that turn it into a rate: the clean validation pairs are the null (what an aligned
pair scores), their corrupted copies (evidence.py) the alternative. The training pairs' scores are fitted
as a mixture (1 - pi) f0 + pi f1 of the two. A model scores the pairs it was trained on as more aligned
than unseen ones, and fits them more tightly (memorisation): when the statistic is the audited model's own,
both components are moved by one fitted shift and narrowed by one fitted scale, which absorbs that. The
posterior of the alternative is each pair's `misaligned_probability`; the flag keeps the most probable
pairs while their mean posterior (the expected precision) stays at or above the target
(docs/METHOD.md, "Calibrated estimates").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ecif_core.metrics import auroc, soft_auroc
from ecif_core.densities import kernel_density, robust_sd
from ecif_core.recent import RecentResults
from ecif_core.ranking import (DEFAULT_FLAG_PRECISION, EVIDENCE_RULE, SUSPECT_Z, SUSPICION_SIGN, evidence_terms,
                               suspected_flags)

METHOD = "validation mixture"
MIN_SEPARATION = 0.6           # below this validation AUROC the two components are too alike to estimate
INTERVAL = 0.9                 # two-sided bootstrap interval of the fraction
# The memorisation shift is searched in [-MAX_SHIFT, MAX_SHIFT / 4] null spreads: a trained model scores its own
# pairs as more aligned, rarely less; a wider range lets "every pair is a shifted alternative" fit a clean set.
MAX_SHIFT = 2.0
# A reference model this good on the validation evidence (mean AUROC) is the estimate's statistic alone: it
# never saw the training pairs, so neither memorisation nor a consistently mislearned name can hide one. The
# memorisation check below holds it to that: a reference trained on the audited pairs is refused.
REFERENCE_COMPETENT = 0.7
ALONE = "reference_clip_score alone"   # summary.json's details.statistic when the reference is the statistic alone
# A model fits the pairs it was trained on more tightly than unseen ones: the audited model's statistic is
# fitted with the validation distributions narrowed by a scale in this grid (1 = no memorisation; 0.3 =
# training pairs three times tighter than unseen ones, beyond anything measured). Steps of 0.1: the kernel
# density of a few hundred validation pairs is itself about 5% wider than their distribution, and a finer grid
# fits that smoothing as memorisation (a clean synthetic set then read 0.24 for 0.21).
MEMORISATION_SCALES = tuple(np.round(np.linspace(0.3, 1.0, 8), 2))
# Below this fitted scale the audited model memorised its pairs: the misaligned ones, which only memorisation
# fits, moved further than any narrowing of unseen pairs predicts, and the count is noise (digits trained 30
# epochs from scratch: scales 0.45-0.75, estimates 0.02-0.20 for a true 0.20). No estimate then. At 0.85 the
# fit recovers the truth where a shift alone reads half of it (tests/core/test_calibration.py).
MIN_MEMORISATION_SCALE = 0.8
# Log-likelihood gain a narrowing must bring over none to be fitted: half the 95% quantile of chi-square with one
# degree of freedom (a likelihood-ratio test of the one extra parameter), so a model that did not memorise keeps 1.
SCALE_EVIDENCE = 1.92
# Memorisation check of a reference, on the aligned end where misaligned pairs are rare: for a model that never
# saw the training pairs at least a quarter of the clean validation pairs score below the training pairs'
# first quartile (more when some training pairs are misaligned). Below MIN_BELOW_QUARTILE the reference scores
# the training pairs, misaligned ones included, as more aligned than unseen ones: it was trained on them.
MIN_BELOW_QUARTILE = 0.175
# The kernel densities' bandwidth for a competent reference's statistic, in units of Silverman's rule.
# Silverman's bandwidth suits the bulk of a density; a few hundred validation pairs then give the null a tail
# lighter than the clean training pairs', and the fit read the difference as misaligned pairs (+0.02 to +0.04
# at every fraction, clean sets too). Chosen on the fine-tuning benchmark's development seeds (36 cells; mean
# abs error of the fraction 0.036, 0.030, 0.026, 0.026, 0.025 at 1, 1.25, 1.5, 1.75, 2): the smallest factor
# within 0.001 of the best. The audited model's statistic keeps Silverman's (1): a wider kernel widens the
# null, and the memorisation scale then fits that widening as memorisation (a clean synthetic set read 0.25
# for 0.21).
REFERENCE_KERNEL_WIDTH = 1.5
# How far towards aligned (robust sds) the null may move for a competent reference's statistic. The reference saw
# neither the training nor the validation pairs, so nothing moves the training pairs towards aligned beyond
# sampling and a small domain difference (its fitted shifts on bench.fix's cells: +0.08 to +0.14). The audited
# model's MAX_SHIFT there let an alternative moved back by two sds stand in for the null: a clean set whose
# corruptions sit two or three sds from it read as 100% misaligned (tests/core/test_calibration.py). The
# bound is MAX_SHIFT / 4, the one the shift already has towards unaligned.
REFERENCE_ALIGNED_SHIFT = MAX_SHIFT / 4
BOOTSTRAP = 100
GRID = 512                     # density grid points
# The validation model each ranking term's training column is compared with.
TERM_MODEL = {"clip_score_loo": "clip_score", "clip_score": "clip_score", "reference_clip_score": "reference_clip_score"}


@dataclass(frozen=True)
class Calibration:
    """The estimate, the per-pair posterior and the flags of one audit."""

    estimable: bool
    reason: str | None                    # why not, when not estimable
    probability: np.ndarray               # misaligned_probability per training pair (NaN when not estimable)
    flags: np.ndarray                     # the `suspected` flag per training pair
    target_precision: float
    fraction: float | None = None
    interval: tuple[float, float] | None = None
    flag_precision: float | None = None   # estimated precision of the flag set
    flag_recall: float | None = None      # estimated recall of the flag set
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """summary.json's fields (also the status API's and the report's)."""
        flagged = int(self.flags.sum())
        rule = (f"posterior ranking, estimated precision >= {self.target_precision:g}" if self.estimable
                else f"suspicion > {SUSPECT_Z:g} (no estimate)")
        return {"estimable": self.estimable, "reason": self.reason, "method": METHOD if self.estimable else None,
                "pairs": int(len(self.flags)), "estimated_misaligned_fraction": _round(self.fraction),
                "estimated_misaligned_pairs": None if self.fraction is None else int(round(self.fraction * len(self.flags))),
                "interval": None if self.interval is None else [_round(v) for v in self.interval],
                "interval_level": INTERVAL if self.interval is not None else None,
                "flag_rule": rule, "flag_target_precision": self.target_precision, "flagged": flagged,
                "estimated_flag_precision": _round(self.flag_precision),
                "estimated_flag_recall": _round(self.flag_recall), "details": self.details}


def describe(summary: dict[str, Any]) -> str:
    """summary.json in one or two sentences, for the terminal."""
    if not summary["estimable"]:
        return (f"How many pairs are misaligned cannot be estimated: {summary['reason']}. "
                f"Flagged {summary['flagged']} pairs by {summary['flag_rule']}.")
    bounds = "" if summary["interval"] is None else (
        f"; {summary['interval_level']:.0%} interval {summary['interval'][0]:.1%} to {summary['interval'][1]:.1%}")
    text = (f"Estimated misaligned: {summary['estimated_misaligned_fraction']:.1%} of {summary['pairs']} pairs "
            f"(about {summary['estimated_misaligned_pairs']}{bounds}). ")
    if (summary.get("details") or {}).get("caveat"):
        text += "This is a lower bound: no reference model knows this domain (summary.json, details.caveat). "
    if not summary["flagged"]:
        return text + f"No pair reaches the flag's precision target ({summary['flag_target_precision']:g})."
    return text + (f"Flagged {summary['flagged']}: estimated precision {summary['estimated_flag_precision']:.2f} "
                   f"(target {summary['flag_target_precision']:g}), estimated recall "
                   f"{summary['estimated_flag_recall']:.2f}.")


def next_step(summary: dict[str, Any], audit_dir: str) -> str | None:
    """What to do with the audit, in one sentence (measured on bench.fix: retraining without the pairs the
    audit estimates are misaligned gained most; the edit is for a model that cannot be retrained)."""
    count = summary.get("estimated_misaligned_pairs") if summary["estimable"] else None
    if count:
        return (f"Next: retrain without the {count} pairs it estimates are misaligned (the first {count} rows of "
                f"ranked.csv): ecif train --remove estimated --audit-dir {audit_dir} ...; ecif edit is for a model "
                "you cannot retrain.")
    if summary["flagged"]:
        return (f"Next: retrain without the {summary['flagged']} flagged pairs (suspected=true in ranked.csv): "
                f"ecif train --remove suspected --audit-dir {audit_dir} ...; ecif edit is for a model you cannot "
                "retrain.")
    return None


def calibrate(scores: Mapping[str, np.ndarray], evidence: Mapping[str, Mapping[str, float]] | None,
              cosines: Mapping[str, Mapping[str, np.ndarray]] | None, suspicion: np.ndarray,
              target_precision: float = DEFAULT_FLAG_PRECISION, seed: int = 0,
              missing: str = "needs a validation set: its clean pairs are the yardstick of an aligned pair",
              interval: bool = True) -> Calibration:
    """The audit's calibration from its ranked.csv columns (`scores`), its validation evidence and the
    validation cosines (clean and corrupted, per model); `suspicion` is the default rule's score;
    `missing`: why there are no cosines, when there are none. `interval`: False leaves the bootstrap
    interval out (None; the flags, posteriors and estimate are the same), for callers that only select pairs."""
    n = len(suspicion)
    if cosines is None:
        return _not_estimable(n, suspicion, target_precision, missing)
    alone = _reference_alone(evidence, cosines)
    used = {**evidence, "clip_score": {"mean": 0.5}} if alone else evidence  # 0.5: the audited term's weight 0
    train, null, alternative, weights = statistic(scores, used, cosines)
    separation = auroc(np.concatenate([null, np.concatenate(list(alternative.values()))]),
                       np.concatenate([np.zeros(len(null)), np.ones(sum(len(a) for a in alternative.values()))]))
    details = {"statistic": ALONE if alone else "suspicion",
               "caveat": None if alone else (
                   "no reference model that knows this domain (validation AUROC >= "
                   f"{REFERENCE_COMPETENT}): misaligned pairs the audited model learned consistently (a concept "
                   "named wrongly everywhere) or memorised look aligned to it and are not counted, so the estimate "
                   "is a lower bound"),
               "validation_separation_auroc": _round(separation), "term_weights": weights,
               "audited_training_auroc": _round(((evidence or {}).get("clip_score") or {}).get("training"))}
    if not separation >= MIN_SEPARATION:
        return _not_estimable(n, suspicion, target_precision,
                              f"the models barely tell clean from corrupted validation pairs (AUROC {separation:.2f} "
                              f"< {MIN_SEPARATION}): they did not learn this domain well enough to count", details)
    below = float((null < np.quantile(train, 0.25)).mean())
    details["validation_below_training_quartile"] = _round(below)
    if alone and below < MIN_BELOW_QUARTILE:
        return _not_estimable(n, suspicion, target_precision,
                              f"the reference model scores the training pairs as more aligned than unseen pairs (only "
                              f"{below:.0%} of the clean validation pairs score below the training pairs' first "
                              f"quartile, 25% or more for a model that never saw them): it was trained on these pairs, "
                              "misaligned ones too, so it cannot count them; give as `reference` a model that was not "
                              "trained on the audited pairs (for example the pretrained base, not an earlier "
                              "checkpoint of this fine-tune)", details)
    # a reference never saw the training pairs: nothing to narrow; the audited model may have memorised its own
    scales, width, reach = ((1.0,), REFERENCE_KERNEL_WIDTH, REFERENCE_ALIGNED_SHIFT) if alone else \
        (MEMORISATION_SCALES, 1.0, MAX_SHIFT)
    fit = _remembered_fit(train, null, list(alternative.values()), scales, width, reach)
    details.update({"memorisation_shift": _round(fit.shift), "memorisation_scale": _round(fit.scale)})
    if fit.scale < MIN_MEMORISATION_SCALE:
        return _not_estimable(n, suspicion, target_precision,
                              f"the audited model fits its training pairs {1 / fit.scale:.1f}x tighter than unseen "
                              f"pairs (fitted memorisation scale {fit.scale:.2f} < {MIN_MEMORISATION_SCALE}): it "
                              "memorised them, misaligned ones too, so unseen pairs are no yardstick for them; add a "
                              "reference model that knows this domain (the manifest's `reference`) for an estimate",
                              details)
    probability = fit.posterior(train)
    flags = flags_for_target(probability, target_precision)
    bounds = _interval(train, null, list(alternative.values()), seed, fit.scale, scales, width, reach) \
        if interval else None
    expected = probability.sum()
    details.update({"corruption_shares": {k: _round(w) for k, w in zip(alternative, fit.weights[1:])}})
    return Calibration(True, None, probability, flags, target_precision, fit.fraction,
                       None if bounds is None else (min(bounds[0], fit.fraction), max(bounds[1], fit.fraction)),
                       float(probability[flags].mean()) if flags.any() else None,
                       float(probability[flags].sum() / expected) if expected > 0 else None, details)


def training_evidence(scores: Mapping[str, np.ndarray], evidence: Mapping[str, Mapping[str, float]] | None,
                      cosines: Mapping[str, Mapping[str, np.ndarray]] | None) -> float | None:
    """How well the audited model's own column (EVIDENCE_RULE's) ranks its training pairs, judged by a competent
    reference's posterior (soft AUROC): NaN where that posterior puts every pair in one class, None without such
    a reference. Validation pairs cannot show a name the fine-tune learned wrongly and consistently (it scores
    those training pairs as aligned, an unseen pair with that name as misaligned); a reference that never saw
    the pairs can. Where there is such a judge the default ranking reads the reference alone
    (ranking.reference_judges); this AUROC is reported (summary.json, details.audited_training_auroc)."""
    audited = SUSPICION_SIGN[EVIDENCE_RULE[0]] * np.asarray(scores[EVIDENCE_RULE[0]], dtype=np.float64)
    # the reference's own calibration, its checks included (a reference trained on the pairs is no judge)
    judged = calibrate(scores, evidence, cosines, np.zeros(len(audited)), interval=False)
    if not judged.estimable or judged.details["statistic"] != ALONE:
        return None
    probability = judged.probability
    usable = np.isfinite(audited) & np.isfinite(probability)
    p = probability[usable]
    if not usable.any() or p.sum() <= 0 or (1 - p).sum() <= 0:
        return float("nan")  # a judge with nothing to judge by: still the ranking's judge
    return soft_auroc(audited[usable], p)


def _reference_alone(evidence: Mapping[str, Mapping[str, float]] | None,
                     cosines: Mapping[str, Mapping[str, np.ndarray]]) -> bool:
    """The estimate's statistic is the reference's CLIP score alone: it knows the domain (REFERENCE_COMPETENT)."""
    reference = ((evidence or {}).get("reference_clip_score") or {}).get("mean")
    return "reference_clip_score" in cosines and reference is not None and reference >= REFERENCE_COMPETENT


def statistic(scores: Mapping[str, np.ndarray], evidence: Mapping[str, Mapping[str, float]] | None,
              cosines: Mapping[str, Mapping[str, np.ndarray]]
              ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """The `suspicion` statistic for the training pairs and, on the same scale, for the clean and the
    corrupted validation pairs: each term's validation cosines go through the training column's robust
    z-score (its median and MAD) and the same evidence weights."""
    import torch
    tensors = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in scores.items()}
    # the reference's CLIP score, not the ranking's negCLIPLoss: the validation pairs are kept as cosines
    terms = evidence_terms(tensors, EVIDENCE_RULE[0], EVIDENCE_RULE[1], EVIDENCE_RULE[2], evidence,
                           reference_column="reference_clip_score")
    total = sum(t.weight for t in terms)
    train = sum(t.weight * t.values.numpy() for t in terms) / total
    kinds = [k for k in next(iter(cosines.values())) if k != "clean"]
    null = np.zeros(len(cosines[TERM_MODEL[terms[0].column]]["clean"]))
    alternative = {k: np.zeros_like(null) for k in kinds}
    for term in terms:
        column = np.asarray(scores[term.column], dtype=np.float64)
        finite = column[np.isfinite(column)]
        median = np.median(finite)
        mad = 1.4826 * np.median(np.abs(finite - median)) or np.std(finite) or 1.0
        sign = SUSPICION_SIGN[term.column]
        model = cosines[TERM_MODEL[term.column]]
        null += term.weight * sign * (model["clean"] - median) / mad / total
        for kind in kinds:
            alternative[kind] += term.weight * sign * (model[kind] - median) / mad / total
    return train, null, alternative, {t.column: round(t.weight / total, 4) for t in terms}


@dataclass(frozen=True)
class MixtureFit:
    weights: np.ndarray            # mixing weights: the null first, then each alternative
    shift: float                   # where the null's centre moved (memorisation: towards aligned)
    grid: np.ndarray
    densities: list[np.ndarray]    # the null's, then each alternative's, on the grid (unscaled)
    scale: float = 1.0             # how much narrower the training pairs' components are (1: not at all)
    centre: float = 0.0            # the point the scale narrows towards (the null's median)

    @property
    def fraction(self) -> float:
        return float(1.0 - self.weights[0])

    def posterior(self, values: np.ndarray) -> np.ndarray:
        """P(misaligned | value), made non-decreasing in the value (a more suspicious score is never
        less likely misaligned; kernel tails alone could say otherwise)."""
        at = _unscaled(values, self.shift, self.scale, self.centre)
        parts = [w * np.interp(at, self.grid, d) for w, d in zip(self.weights, self.densities)]
        mixed = sum(parts)
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = np.where(mixed > 0, 1.0 - parts[0] / mixed, self.fraction)
        return _isotonic(values, raw)


def fit_mixture(train: np.ndarray, null: np.ndarray, alternatives: Sequence[np.ndarray],
                shifts: int = 81, iterations: int = 300, scales: Sequence[float] = (1.0,),
                kernel_width: float = 1.0, aligned_shift: float = MAX_SHIFT) -> MixtureFit:
    """Maximum likelihood weights, shift and scale of train ~ w0 g0 + sum_k wk gk, where gk is component k's
    kernel density (the null's, then each alternative's: each simulated corruption, so the real one may be any
    mix of them) narrowed by `scale` towards the null's median and moved by `shift`. Weights by EM (the
    likelihood is concave in them), the shift and the scale on a grid: `shifts` points from -MAX_SHIFT to
    MAX_SHIFT / 4 robust sds of the null, those at least -`aligned_shift` tried (a subset of the same grid)."""
    spread, centre = robust_sd(null), float(np.median(null))
    everything = np.concatenate([null, *alternatives])
    grid = np.linspace(everything.min() - 8 * spread, everything.max() + 8 * spread, GRID)
    densities = [kernel_density(sample, grid, kernel_width) for sample in (null, *alternatives)]
    counts, edges = np.histogram(train, bins=GRID * 2, range=(train.min() - 1e-9, train.max() + 1e-9))
    centres, counts = (edges[:-1] + edges[1:]) / 2, counts.astype(np.float64)
    keep = counts > 0
    centres, counts = centres[keep], counts[keep]
    moves = np.linspace(-MAX_SHIFT, MAX_SHIFT / 4, shifts)
    moves = moves[moves >= -aligned_shift - 1e-9] * spread
    candidates = [(b, s) for b in scales for s in moves]
    # component density at every bin centre, per candidate (scale, shift): (candidates, components, bins)
    table = np.stack([np.stack([np.interp(_unscaled(centres, s, b, centre), grid, d) / b
                                for d in densities]) for b, s in candidates]) + 1e-300
    weights = np.full(table.shape[:2], 1.0 / len(densities))
    for _ in range(iterations):
        mixed = np.einsum("sk,skb->sb", weights, table)
        weights = weights * np.einsum("skb,sb,b->sk", table, 1.0 / mixed, counts) / counts.sum()
    likelihood = (counts * np.log(np.einsum("sk,skb->sb", weights, table))).sum(axis=1)
    best = int(np.argmax(likelihood))
    unscaled = [i for i, (b, _) in enumerate(candidates) if b == 1.0]
    if unscaled:  # the scale is one more parameter: kept only where it beats no narrowing by a likelihood-ratio test
        plain = max(unscaled, key=lambda i: likelihood[i])
        if likelihood[best] - likelihood[plain] < SCALE_EVIDENCE:
            best = plain
    scale, shift = candidates[best]
    return MixtureFit(weights[best], float(shift), grid, densities, float(scale), centre)


_RECENT_FITS: RecentResults[MixtureFit] = RecentResults(kept=4)  # ecif_core.recent


def _remembered_fit(train: np.ndarray, null: np.ndarray, alternatives: Sequence[np.ndarray],
                    scales: Sequence[float], kernel_width: float, aligned_shift: float = MAX_SHIFT) -> MixtureFit:
    """fit_mixture, remembered by its inputs and this module's rule constants (a changed rule is refit): the
    final ranking fits a competent reference's statistic to weigh the audited model (training_evidence), then
    the same statistic for the estimate; the second is the first (MixtureFit is only read)."""
    rule = np.array([kernel_width, SCALE_EVIDENCE, MAX_SHIFT, aligned_shift, GRID, *scales], dtype=np.float64)
    return _RECENT_FITS.get_or_compute((train, null, *alternatives, rule), lambda: fit_mixture(
        train, null, alternatives, scales=scales, kernel_width=kernel_width, aligned_shift=aligned_shift))


def forget_remembered_fits() -> None:
    """Drop the remembered fits (benchmarks timing a fresh ranking; tests)."""
    _RECENT_FITS.clear()


def _unscaled(values: np.ndarray, shift: float, scale: float, centre: float) -> np.ndarray:
    """Where a training value lands on the validation scale: the shift undone, then the narrowing."""
    return (values - shift - centre) / scale + centre


def flags_for_target(probability: np.ndarray, target: float) -> np.ndarray:
    """The largest set of most-probable pairs whose mean posterior (expected precision) is >= target."""
    order = np.argsort(-probability, kind="stable")
    running = np.cumsum(probability[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(running >= target)
    flags = np.zeros(len(probability), dtype=bool)
    if len(ok):
        flags[order[:ok[-1] + 1]] = True
    return flags


def _interval(train: np.ndarray, null: np.ndarray, alternatives: Sequence[np.ndarray], seed: int,
              scale: float = 1.0, scales: Sequence[float] = (1.0,), kernel_width: float = 1.0,
              aligned_shift: float = MAX_SHIFT) -> tuple[float, float]:
    """Bootstrap percentile interval of the fraction: training pairs, validation pairs and each
    corrupted copy resampled, the whole fit repeated (on a coarser shift grid, and with the scales next to
    the fitted `scale` only: the whole grid would cost 8x)."""
    rng = np.random.default_rng(seed)
    step = max(np.diff(sorted(scales)).min(), 1e-9) if len(scales) > 1 else 1.0
    near = [b for b in scales if abs(b - scale) <= step * 1.01]
    estimates = [fit_mixture(rng.choice(train, len(train)), rng.choice(null, len(null)),
                             [rng.choice(a, len(a)) for a in alternatives], shifts=21, iterations=150,
                             scales=near, kernel_width=kernel_width, aligned_shift=aligned_shift).fraction
                 for _ in range(BOOTSTRAP)]
    tail = (1 - INTERVAL) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    return float(low), float(high)


def _isotonic(values: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit of raw against values (pool adjacent violators, scipy's; equal values
    share one fitted value, the weighted mean of their raw values). scipy.optimize rather than scikit-learn:
    the same fit, and a fresh `ecif edit` or audit imports 0.47 s instead of 0.8-0.9 s for it (after open_clip,
    idle machine, bench/RESULTS.md)."""
    from scipy.optimize import isotonic_regression
    finite = np.isfinite(values)
    out = np.full(len(values), np.nan)
    if finite.any():
        distinct, inverse, counts = np.unique(values[finite], return_inverse=True, return_counts=True)
        means = np.bincount(inverse, weights=raw[finite]) / counts
        fitted = isotonic_regression(means, weights=counts.astype(np.float64), increasing=True).x
        out[finite] = np.clip(fitted, 0.0, 1.0)[inverse]
    return out


def _not_estimable(n: int, suspicion: np.ndarray, target: float, reason: str,
                   details: dict[str, Any] | None = None) -> Calibration:
    flags = suspected_flags(suspicion)
    return Calibration(False, reason, np.full(n, np.nan), flags, target, details=details or {})


def _round(value: float | None) -> float | None:
    return None if value is None or value != value else round(float(value), 4)
