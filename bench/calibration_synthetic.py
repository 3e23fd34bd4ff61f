"""`python -m bench.calibration_synthetic`: the calibration on clean synthetic sets whose cosines have a long
low tail (a centred Gamma(3), as CLIP cosines of aligned pairs have), with corrupted validation pairs two to
three sds below the clean ones. Prints the estimated misaligned share of each draw (the truth is 0):

- through a competent reference, with its shift towards aligned bounded (REFERENCE_ALIGNED_SHIFT, the rule)
  and with the audited model's range instead (the rule before it);
- through the audited model's own score, when it memorised nothing (no reference): a known overestimate,
  reported in bench/RESULTS.md, "A competent reference's shift bounded".

Seconds on one core; no model is trained.
"""
from __future__ import annotations

import numpy as np

from ecif_core import calibration
from ecif_core.calibration import calibrate

N_TRAIN, N_VALIDATION = 3000, 300


def _cosines(rng: np.random.Generator, count: int, lower: float = 0.0, centre: float = 0.6) -> np.ndarray:
    """Cosines around `centre - lower`, sd 0.05 x sqrt(3), a long low tail."""
    return centre - lower - 0.05 * (rng.gamma(3.0, 1.0, count) - 3.0)


def through_reference(seed: int, bounded: bool) -> float:
    """The estimate of a clean set read through a competent reference (the test's draws)."""
    rng = np.random.default_rng(seed)
    reference = _cosines(rng, N_TRAIN)
    scores = {"clip_score_loo": rng.normal(0.8, 0.05, N_TRAIN), "reference_clip_score": reference}
    validation = {"clip_score": {"clean": rng.normal(0.8, 0.05, N_VALIDATION),
                                 "shuffle": rng.normal(0.6, 0.05, N_VALIDATION),
                                 "word_swap": rng.normal(0.65, 0.05, N_VALIDATION)},
                  "reference_clip_score": {"clean": _cosines(rng, N_VALIDATION),
                                           "shuffle": _cosines(rng, N_VALIDATION, 0.2),
                                           "word_swap": _cosines(rng, N_VALIDATION, 0.16)}}
    evidence = {"clip_score": {"mean": 0.99}, "reference_clip_score": {"mean": 0.95}}
    kept = calibration.REFERENCE_ALIGNED_SHIFT
    calibration.REFERENCE_ALIGNED_SHIFT = kept if bounded else calibration.MAX_SHIFT
    try:
        return calibrate(scores, evidence, validation, -(reference - np.median(reference)), interval=False).fraction
    finally:
        calibration.REFERENCE_ALIGNED_SHIFT = kept


def through_audited_model(seed: int, lower: float) -> float | None:
    """The estimate of a clean set read through the audited model's own score (no reference); None when
    the calibration finds it not estimable."""
    rng = np.random.default_rng(seed)
    own = _cosines(rng, N_TRAIN, centre=0.8)
    scores = {"clip_score_loo": own, "reference_clip_score": np.full(N_TRAIN, np.nan)}
    validation = {"clip_score": {"clean": _cosines(rng, N_VALIDATION, centre=0.8),
                                 "shuffle": _cosines(rng, N_VALIDATION, lower, centre=0.8),
                                 "word_swap": _cosines(rng, N_VALIDATION, lower * 0.8, centre=0.8)}}
    found = calibrate(scores, None, validation, -(own - np.median(own)), interval=False)
    return found.fraction if found.estimable else None


def main() -> None:
    seeds = range(16)
    for bounded in (True, False):
        values = [through_reference(seed, bounded) for seed in seeds]
        label = "bounded (the rule)" if bounded else "the audited model's range"
        print(f"reference, shift {label}: {sum(v > 0.5 for v in values)} of 16 draws read > 0.5; "
              f"range {min(values):.3f}-{max(values):.3f}")
    for lower in (0.2, 0.3):
        values = [through_audited_model(seed, lower) for seed in range(12)]
        read = [v for v in values if v is not None]
        print(f"audited model, corruptions {lower} below: {len(read)} of 12 estimable, "
              f"range {min(read):.3f}-{max(read):.3f}, mean {np.mean(read):.3f}")


if __name__ == "__main__":
    main()
