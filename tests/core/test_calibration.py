"""The calibration (ecif_core/calibration.py) against synthetic mixtures whose truth is known."""
from __future__ import annotations

import numpy as np
import pytest

from ecif_core import calibration
from ecif_core.calibration import MIN_SEPARATION, calibrate, fit_mixture, flags_for_target, statistic
from ecif_core.ranking import SUSPECT_Z


@pytest.fixture(autouse=True)
def fewer_bootstrap_draws(monkeypatch):
    """30 bootstrap fits instead of 100: the interval's percentiles stay meaningful, the tests 3x faster."""
    monkeypatch.setattr(calibration, "BOOTSTRAP", 30)


def _mixture(rng, n, fraction, shift, alt_mean=3.0):
    """Statistic values of n training pairs: (1 - fraction) N(shift, 1) + fraction N(alt_mean + shift, 1)."""
    bad = rng.random(n) < fraction
    return np.where(bad, rng.normal(alt_mean, 1.0, n), rng.normal(0.0, 1.0, n)) + shift, bad


def _validation(rng, m=400, alt_mean=3.0):
    return rng.normal(0.0, 1.0, m), rng.normal(alt_mean, 1.0, 2 * m)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
def test_fit_recovers_the_fraction_and_the_memorisation_shift(fraction):
    rng = np.random.default_rng(1)
    train, _ = _mixture(rng, 4000, fraction, shift=-0.5)
    null, alternative = _validation(rng)
    fit = fit_mixture(train, null, [alternative])
    # 400 + 800 validation pairs: the estimate's seed-to-seed sd is about 0.013 (kernel smoothing biases it
    # about 0.01 low at 30%); 0.04 is three of them
    assert abs(fit.fraction - fraction) < 0.04
    assert abs(fit.shift - (-0.5)) < 0.2


def test_a_clean_training_set_is_estimated_clean_and_null_and_alternative_are_not_interchangeable():
    """A training set drawn from the null alone: about 0 misaligned. Were the null and the alternative
    swapped anywhere, the same data would read as about all misaligned."""
    rng = np.random.default_rng(2)
    train, _ = _mixture(rng, 3000, 0.0, shift=0.0)
    null, alternative = _validation(rng)
    assert fit_mixture(train, null, [alternative]).fraction <= 0.02
    assert fit_mixture(train, alternative, [null]).fraction >= 0.9


def _calibrated(rng, fraction, target=0.9, n=3000):
    """calibrate() on ranked.csv-like columns: clip_score_loo = -statistic (lower cosine = suspicious)."""
    values, bad = _mixture(rng, n, fraction, shift=-0.1)  # a fine-tune's small memorisation shift
    null, alternative = _validation(rng)
    scores = {"clip_score_loo": -values, "reference_clip_score": np.full(n, np.nan)}
    cosines = {"clip_score": {"clean": -null, "shuffle": -alternative[::2], "word_swap": -alternative[1::2]}}
    # suspicion is the robust z of -clip_score_loo: monotone in `values`, as in the audit
    return calibrate(scores, None, cosines, values, target), bad


def test_posteriors_are_calibrated_and_the_flag_keeps_its_precision_target():
    rng = np.random.default_rng(3)
    cal, bad = _calibrated(rng, 0.2)
    p = cal.probability
    bins = np.minimum((p * 10).astype(int), 9)
    ece = sum((bins == b).mean() * abs(p[bins == b].mean() - bad[bins == b].mean()) for b in range(10) if (bins == b).any())
    assert ece < 0.05
    assert abs(cal.fraction - bad.mean()) < 0.03
    assert cal.interval[0] <= bad.mean() <= cal.interval[1]
    measured = bad[cal.flags].mean()
    assert cal.flag_precision >= 0.9 and measured >= 0.85
    assert abs(cal.flag_precision - measured) < 0.05
    assert abs(cal.flag_recall - bad[cal.flags].sum() / bad.sum()) < 0.08


def test_the_flag_follows_its_target():
    """A stricter target flags fewer pairs at a higher precision; each set's mean posterior meets its
    target, and one more pair would break it (recall is maximised under the target)."""
    rng = np.random.default_rng(4)
    cal, bad = _calibrated(rng, 0.2)
    sets = {t: flags_for_target(cal.probability, t) for t in (0.7, 0.9, 0.97)}
    counts = [int(sets[t].sum()) for t in (0.7, 0.9, 0.97)]
    assert counts[0] > counts[1] > counts[2] > 0
    order = np.argsort(-cal.probability, kind="stable")
    for target, flags in sets.items():
        assert cal.probability[flags].mean() >= target
        k = int(flags.sum())
        assert cal.probability[order[:k + 1]].mean() < target
    assert np.array_equal(cal.flags, sets[0.9])
    assert bad[sets[0.97]].mean() > bad[sets[0.7]].mean()


def test_a_clean_control_flags_almost_nothing():
    rng = np.random.default_rng(5)
    cal, _ = _calibrated(rng, 0.0)
    assert cal.fraction <= 0.02
    assert cal.flags.mean() <= 0.01


def test_without_a_validation_set_nothing_is_estimated_and_the_flag_falls_back_to_the_z_threshold():
    suspicion = np.array([0.0, 3.5, 2.9, np.nan, 10.0])
    cal = calibrate({"clip_score_loo": -suspicion}, None, None, suspicion)
    summary = cal.summary()
    assert summary["estimable"] is False and "validation set" in summary["reason"]
    assert summary["estimated_misaligned_fraction"] is None and summary["interval"] is None
    assert cal.flags.tolist() == (np.nan_to_num(suspicion, nan=-np.inf) > SUSPECT_Z).tolist()
    assert np.isnan(cal.probability).all()


def test_models_that_cannot_tell_clean_from_corrupted_make_no_estimate():
    rng = np.random.default_rng(6)
    n = 1000
    values = rng.normal(size=n)
    same = rng.normal(size=300)
    cosines = {"clip_score": {"clean": -same, "shuffle": -rng.normal(size=300), "word_swap": -rng.normal(size=300)}}
    cal = calibrate({"clip_score_loo": -values}, None, cosines, values)
    assert not cal.estimable and str(MIN_SEPARATION) in cal.reason


def test_validation_values_go_through_the_training_columns_transform():
    """A validation pair with the same cosines as a training pair gets the same statistic."""
    rng = np.random.default_rng(7)
    loo, reference = rng.normal(0.8, 0.05, 200), rng.normal(0.6, 0.1, 200)
    scores = {"clip_score_loo": loo, "reference_clip_score": reference}
    cosines = {"clip_score": {"clean": loo, "shuffle": loo[::-1]},
               "reference_clip_score": {"clean": reference, "shuffle": reference[::-1]}}
    evidence = {"clip_score": {"mean": 0.9}, "reference_clip_score": {"mean": 0.7}}
    train, null, alternative, weights = statistic(scores, evidence, cosines)
    np.testing.assert_allclose(null, train, atol=1e-12)
    np.testing.assert_allclose(alternative["shuffle"], train[::-1], atol=1e-12)
    assert weights == {"clip_score_loo": pytest.approx(0.8 / 1.2, abs=1e-4),
                       "reference_clip_score": pytest.approx(0.4 / 1.2, abs=1e-4)}


def test_a_reference_that_knows_the_domain_is_the_estimate_alone():
    """The audited model learned its misaligned pairs (they look aligned to it: systematic mislearning)
    while the reference, which never saw them, still sees them. With the reference competent on the
    validation evidence the estimate uses it alone and finds the truth; mixing in the audited model's
    scores would hide most of the misaligned pairs."""
    rng = np.random.default_rng(8)
    n, m = 3000, 400
    bad = rng.random(n) < 0.2
    reference = np.where(bad, rng.normal(0.4, 0.05, n), rng.normal(0.6, 0.05, n))   # cosines: low = misaligned
    audited = rng.normal(0.8, 0.05, n)                                             # learned: all look aligned
    scores = {"clip_score_loo": audited, "reference_clip_score": reference}
    cosines = {"clip_score": {"clean": rng.normal(0.8, 0.05, m), "shuffle": rng.normal(0.6, 0.05, m),
                              "word_swap": rng.normal(0.65, 0.05, m)},
               "reference_clip_score": {"clean": rng.normal(0.6, 0.05, m), "shuffle": rng.normal(0.4, 0.05, m),
                                        "word_swap": rng.normal(0.45, 0.05, m)}}
    evidence = {"clip_score": {"mean": 0.99}, "reference_clip_score": {"mean": 0.98}}
    suspicion = -(audited - np.median(audited))
    cal = calibrate(scores, evidence, cosines, suspicion)
    assert cal.details["statistic"] == "reference_clip_score alone" and cal.details["caveat"] is None
    assert abs(cal.fraction - bad.mean()) < 0.04
    assert bad[cal.flags].mean() >= 0.85
    weak = {"clip_score": {"mean": 0.99}, "reference_clip_score": {"mean": 0.65}}   # below REFERENCE_COMPETENT
    mixed = calibrate(scores, weak, cosines, suspicion)
    assert mixed.details["statistic"] == "suspicion" and "lower bound" in mixed.details["caveat"]


def _unmemorised(seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """A training set's statistic with 15% misaligned pairs as a model that never saw them scores it, which
    the caller narrows and shifts, and the validation cosines (clean, shuffled, word-swapped)."""
    rng = np.random.default_rng(seed)
    values, bad = _mixture(rng, 3000, 0.15, shift=0.0)
    null, alternative = _validation(rng)
    return values, bad, {"clip_score": {"clean": -null, "shuffle": -alternative[::2], "word_swap": -alternative[1::2]}}


def test_a_mildly_narrowed_model_is_counted_through_the_fitted_scale():
    """The audited model fits its training pairs, misaligned ones included, somewhat tighter and more aligned
    than unseen pairs (scale 0.85). The fit narrows both validation components by one fitted scale, so the
    count is right; the single-shift fit of the last round, on the same data, reads half of it."""
    values, bad, cosines = _unmemorised(seed=9)
    narrowed = 0.85 * values - 0.3
    cal = calibrate({"clip_score_loo": -narrowed}, None, cosines, narrowed)
    assert cal.estimable and abs(cal.fraction - bad.mean()) < 0.03
    assert cal.interval[0] <= bad.mean() <= cal.interval[1]
    assert 0.8 <= cal.details["memorisation_scale"] <= 0.9 and "lower bound" in cal.details["caveat"]
    train, null_z, alternatives, _ = statistic({"clip_score_loo": -narrowed}, None, cosines)
    assert fit_mixture(train, null_z, list(alternatives.values())).fraction < bad.mean() - 0.04


def test_a_model_that_memorised_its_pairs_makes_no_estimate():
    """Training pairs, misaligned ones included, score far tighter and more aligned than any unseen pair (a
    model trained to memorisation, no reference; digits from scratch: fitted scales 0.45-0.75): no number,
    and the reason says why and asks for a reference. The same pairs unmemorised are estimated."""
    values, bad, cosines = _unmemorised(seed=9)
    memorised = 0.45 * values - 1.0
    cal = calibrate({"clip_score_loo": -memorised}, None, cosines, memorised)
    assert not cal.estimable and "memorised" in cal.reason and "reference" in cal.reason
    assert cal.details["memorisation_scale"] < calibration.MIN_MEMORISATION_SCALE
    assert cal.flags.sum() == (memorised > SUSPECT_Z).sum()      # the fallback flag
    honest = calibrate({"clip_score_loo": -values}, None, cosines, values)
    assert honest.estimable and abs(honest.fraction - bad.mean()) < 0.04
    assert honest.details["memorisation_scale"] >= 0.95


def test_a_reference_trained_on_the_audited_pairs_makes_no_estimate():
    """The reference memorised the training pairs (an earlier checkpoint of the same fine-tune, as in
    bench.edit, where it read 20% shuffled captions as 0.0 with the interval [0, 0]): its scores of the
    training pairs, misaligned ones too, sit above every unseen pair's, so no number, and the reason
    names the reference; the same reference on pairs it never saw gives the estimate alone."""
    rng = np.random.default_rng(10)
    n, m = 3000, 400
    bad = rng.random(n) < 0.2
    unseen = np.where(bad, rng.normal(0.4, 0.05, n), rng.normal(0.6, 0.05, n))
    seen = np.where(bad, rng.normal(0.68, 0.03, n), rng.normal(0.7, 0.03, n))   # memorised: all above clean unseen
    cosines = {"clip_score": {"clean": rng.normal(0.8, 0.05, m), "shuffle": rng.normal(0.6, 0.05, m),
                              "word_swap": rng.normal(0.65, 0.05, m)},
               "reference_clip_score": {"clean": rng.normal(0.6, 0.05, m), "shuffle": rng.normal(0.4, 0.05, m),
                                        "word_swap": rng.normal(0.45, 0.05, m)}}
    evidence = {"clip_score": {"mean": 0.99}, "reference_clip_score": {"mean": 0.98}}
    audited = rng.normal(0.8, 0.05, n)
    suspicion = -(audited - np.median(audited))
    refused = calibrate({"clip_score_loo": audited, "reference_clip_score": seen}, evidence, cosines, suspicion)
    assert not refused.estimable and "reference model" in refused.reason and "trained on" in refused.reason
    assert refused.details["validation_below_training_quartile"] < calibration.MIN_BELOW_QUARTILE
    fine = calibrate({"clip_score_loo": audited, "reference_clip_score": unseen}, evidence, cosines, suspicion)
    assert fine.estimable and abs(fine.fraction - bad.mean()) < 0.04


def test_next_step_names_the_measured_action_for_what_the_audit_knows() -> None:
    """With an estimate: retrain without `estimated` (bench.fix's recommendation); without one but with flags:
    without `suspected`; with neither: nothing to say."""
    from ecif_core.calibration import next_step

    estimated = {"estimable": True, "estimated_misaligned_pairs": 178, "flagged": 97}
    step = next_step(estimated, "out/audit")
    assert "178 pairs" in step and "ecif train --remove estimated --audit-dir out/audit" in step
    flagged_only = {"estimable": False, "estimated_misaligned_pairs": None, "flagged": 12}
    assert "ecif train --remove suspected --audit-dir out/audit" in next_step(flagged_only, "out/audit")
    assert next_step({"estimable": True, "estimated_misaligned_pairs": 0, "flagged": 0}, "a") is None
    assert next_step({"estimable": False, "estimated_misaligned_pairs": None, "flagged": 0}, "a") is None


def test_without_the_interval_the_flags_posteriors_and_estimate_are_the_same(monkeypatch):
    """Selecting pairs (edit, train --remove, preview) skips the bootstrap; nothing it selects by moves."""
    calls = []
    real = calibration._interval
    monkeypatch.setattr(calibration, "_interval", lambda *a, **k: calls.append(1) or real(*a, **k))
    values, _ = _mixture(np.random.default_rng(7), 2000, 0.2, shift=-0.1)
    null, alternative = _validation(np.random.default_rng(8))
    scores = {"clip_score_loo": -values, "reference_clip_score": np.full(2000, np.nan)}
    cosines = {"clip_score": {"clean": -null, "shuffle": -alternative[::2]}}
    full = calibrate(scores, None, cosines, values)
    quick = calibrate(scores, None, cosines, values, interval=False)
    assert calls == [1] and full.interval is not None and quick.interval is None
    np.testing.assert_array_equal(quick.flags, full.flags)
    np.testing.assert_array_equal(quick.probability, full.probability)
    assert quick.fraction == full.fraction and quick.summary()["estimated_misaligned_pairs"] == full.summary()["estimated_misaligned_pairs"]
    assert "interval" not in calibration.describe(quick.summary()) and "interval" in calibration.describe(full.summary())


def test_the_monotone_posterior_fit_equals_scikit_learns_isotonic_regression():
    """calibration._isotonic (scipy's pool adjacent violators, ties pooled) against scikit-learn's
    IsotonicRegression, the reference implementation, on data with ties and NaNs."""
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(12)
    values = np.round(rng.normal(size=2000), 1)      # many ties
    values[::9] = np.nan
    raw = np.clip(rng.normal(0.5, 0.3, 2000), 0, 1)
    finite = np.isfinite(values)
    expected = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True).fit_transform(values[finite], raw[finite])
    got = calibration._isotonic(values, raw)
    np.testing.assert_allclose(got[finite], expected, atol=1e-12)
    assert np.isnan(got[~finite]).all()


def _systematic(rng, n=3000, m=400, fraction=0.2, learned_wrongly=0.6):
    """Scores of a fine-tune that learned a share of its misaligned pairs as aligned (a name learned wrongly,
    consistently), and of a competent reference that never saw them."""
    bad = rng.random(n) < fraction
    hidden = bad & (rng.random(n) < learned_wrongly)
    reference = np.where(bad, rng.normal(0.45, 0.05, n), rng.normal(0.6, 0.05, n))
    audited = np.where(bad & ~hidden, rng.normal(0.55, 0.05, n), rng.normal(0.8, 0.05, n))
    cosines = {"clip_score": {"clean": rng.normal(0.75, 0.05, m), "shuffle": rng.normal(0.5, 0.05, m),
                              "word_swap": rng.normal(0.55, 0.05, m)},
               "reference_clip_score": {"clean": rng.normal(0.6, 0.05, m), "shuffle": rng.normal(0.45, 0.05, m),
                                        "word_swap": rng.normal(0.47, 0.05, m)}}
    evidence = {"clip_score": {"mean": 0.99}, "reference_clip_score": {"mean": 0.97}}
    return {"clip_score_loo": audited, "reference_clip_score": reference}, evidence, cosines, bad


def test_a_judging_reference_ranks_alone_and_the_audited_models_training_auroc_is_measured():
    """A fine-tune that learned 60% of its misaligned pairs as aligned ranks its training pairs badly, which its
    validation evidence (0.99) cannot show; the reference's posterior can. training_evidence measures it
    (a little below the truth, reported), and where a competent reference judges, the default ranking reads the
    reference alone (ranking.reference_judges): on the benchmark's development cells its worst group was 0.007
    AUROC below the best single baseline, against 0.027 with the audited term weighed by its training AUROC
    (systematic swaps). It fails when the audited term keeps any weight. Without a competent reference there
    is no judge (None)."""
    import torch

    from ecif_core.metrics import auroc
    from ecif_core.ranking import _robust_z, suspicion

    rng = np.random.default_rng(13)
    scores, evidence, cosines, bad = _systematic(rng)
    training = calibration.training_evidence(scores, evidence, cosines)
    truth = auroc(-scores["clip_score_loo"], bad)
    # soft labels pull the estimate towards 0.5 where the posterior is unsure: a conservative (lower) value
    assert truth - 0.1 < training <= truth + 0.02 and training < 0.8
    tensors = {k: torch.as_tensor(v) for k, v in scores.items()}
    validation_only = suspicion(tensors, evidence).numpy()
    judged = suspicion(tensors, {**evidence, "clip_score": {"mean": 0.99, "training": training}}).numpy()
    np.testing.assert_allclose(judged, _robust_z(-tensors["reference_clip_score"]).numpy(), atol=1e-12)
    assert auroc(judged, bad) > auroc(validation_only, bad) + 0.01
    weak = {**evidence, "reference_clip_score": {"mean": 0.65}}
    assert calibration.training_evidence(scores, weak, cosines) is None
    assert calibration.training_evidence(scores, evidence, None) is None


def test_the_final_ranking_fits_a_competent_references_mixture_once(monkeypatch):
    """finalize weighs the audited model by the reference's judgement (training_evidence), then estimates with
    the same reference statistic: one mixture fit serves both, and the estimate is the one a fresh fit gives."""
    scores, evidence, cosines, _ = _systematic(np.random.default_rng(14))
    fresh = calibrate(scores, evidence, cosines, np.zeros(len(scores["clip_score_loo"])), interval=False)
    calibration.forget_remembered_fits()
    fits = []
    real = calibration.fit_mixture
    monkeypatch.setattr(calibration, "fit_mixture", lambda *a, **k: fits.append(1) or real(*a, **k))
    training = calibration.training_evidence(scores, evidence, cosines)
    final = calibrate(scores, {**evidence, "clip_score": {"mean": 0.99, "training": training}}, cosines,
                      -scores["clip_score_loo"], interval=False)
    assert len(fits) == 1 and final.details["statistic"] == calibration.ALONE
    np.testing.assert_array_equal(final.probability, fresh.probability)
    assert final.fraction == fresh.fraction
    monkeypatch.setattr(calibration, "SCALE_EVIDENCE", 0.0)   # a changed rule is never served a remembered fit
    calibrate(scores, evidence, cosines, np.zeros(len(scores["clip_score_loo"])), interval=False)
    assert len(fits) == 2


def test_a_narrowing_that_barely_beats_none_is_not_fitted(monkeypatch):
    """SCALE_EVIDENCE: the memorisation scale is one more parameter, kept only where it beats no narrowing by a
    likelihood-ratio test. On this draw (a model that memorised nothing, 15% misaligned, 200 clean validation
    pairs) a narrowing to 0.9 fits the kernel density's own widening a little better, by less than the test asks:
    the rule keeps scale 1 and counts the truth; without the rule the count reads 0.03 high."""
    rng = np.random.default_rng(4)
    n, m = 1000, 200
    bad = rng.random(n) < 0.15
    train = np.where(bad, rng.normal(3.0, 1.0, n), rng.normal(0.0, 1.0, n))
    null, alternative = rng.normal(0.0, 1.0, m), rng.normal(3.0, 1.0, 2 * m)
    fit = fit_mixture(train, null, [alternative], scales=calibration.MEMORISATION_SCALES)
    assert fit.scale == 1.0 and abs(fit.fraction - bad.mean()) < 0.01
    monkeypatch.setattr(calibration, "SCALE_EVIDENCE", 0.0)   # the witness: without the test the narrowing wins
    free = fit_mixture(train, null, [alternative], scales=calibration.MEMORISATION_SCALES)
    assert free.scale < 1.0 and free.fraction - bad.mean() > 0.02


@pytest.mark.parametrize("seed", [1, 2, 7])
def test_a_clean_set_read_through_a_competent_reference_stays_clean(seed, monkeypatch):
    """REFERENCE_ALIGNED_SHIFT: a competent reference (validation AUROC about 0.95) whose corrupted validation
    pairs score two to three sds below the clean ones, with the long low tail cosines have. On 6 of 16 such
    draws (these three among them) the audited model's shift range, two sds towards aligned, let the corrupted
    component, moved back, stand in for the null: the clean set read as 100% misaligned. A reference saw
    neither set, so its shift is bounded, and the clean set reads clean (the issue's clean-control bar: at
    most 0.02)."""
    rng = np.random.default_rng(seed)
    n, m = 3000, 300

    def cosines(k, lower=0.0):   # 0.6 - lower, sd 0.05 x sqrt(3), a long low tail (Gamma(3), centred)
        return 0.6 - lower - 0.05 * (rng.gamma(3.0, 1.0, k) - 3.0)

    reference = cosines(n)
    scores = {"clip_score_loo": rng.normal(0.8, 0.05, n), "reference_clip_score": reference}
    validation = {"clip_score": {"clean": rng.normal(0.8, 0.05, m), "shuffle": rng.normal(0.6, 0.05, m),
                                 "word_swap": rng.normal(0.65, 0.05, m)},
                  "reference_clip_score": {"clean": cosines(m), "shuffle": cosines(m, 0.2),
                                           "word_swap": cosines(m, 0.16)}}
    evidence = {"clip_score": {"mean": 0.99}, "reference_clip_score": {"mean": 0.95}}
    suspicion = -(reference - np.median(reference))
    cal = calibrate(scores, evidence, validation, suspicion, interval=False)
    assert cal.details["statistic"] == calibration.ALONE
    assert cal.fraction <= 0.02 and cal.flags.mean() <= 0.01
    monkeypatch.setattr(calibration, "REFERENCE_ALIGNED_SHIFT", calibration.MAX_SHIFT)   # the witness
    assert calibrate(scores, evidence, validation, suspicion, interval=False).fraction > 0.5
