"""The certificate an edit carries (edit.json, `ecif edit`, the API's edit status): the numbers that
say whether the Newton step can be trusted, and a verdict read from them by a rule fixed in advance.

Why a verdict: an edit is a prediction (one Newton step stands in for retraining), and it can fail
silently: a fine-tune far from a minimum, negative curvature, CG stopped early. The only measured
evidence is the held-out validation loss, whose first-order change the step predicts; an edit whose
measured change contradicts that prediction is not a stand-in for retraining.
"""
from __future__ import annotations

import math

# The rule (docs/METHOD.md, "The edit's certificate"): a measured change of the opposite sign to the
# prediction, or of the same sign but under this share of it, contradicts the prediction.
CONTRADICTION_SHARE = 1 / 3
# lambda / (curvature along the removal gradient + lambda) at or above this share: the step along the removal
# gradient is at most half the undamped Newton step, so the edit does less than retraining even when its
# own prediction holds (a heavily damped step predicts its small change correctly).
MAX_DAMPING_SHARE = 0.5
# Reported as warnings, never as the verdict: CG stopped above this relative residual, or the
# fine-tune's objective gradient is above this share of the removal gradient (not at a minimum).
RESIDUAL_WARNING = 0.1
STATIONARITY_WARNING = 0.5

OK, RETRAIN, UNVERIFIED = "ok", "retrain recommended", "unverified"


def contradicts(predicted: float, measured: float) -> bool:
    """True when `measured` contradicts `predicted` (opposite sign, or under CONTRADICTION_SHARE of it)."""
    if predicted * measured < 0:
        return True
    return abs(measured) < CONTRADICTION_SHARE * abs(predicted)


def _finite(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def damping_share(damping: float | None, curvature: float | None) -> float | None:
    """lambda / (c + lambda), c the curvature along the removal gradient: the share by which damping
    shortens the step along that gradient (0: the Newton step; 1: no step)."""
    damping, curvature = _finite(damping), _finite(curvature)
    if damping is None or curvature is None or damping + curvature <= 0:
        return None
    return damping / (curvature + damping)


def certificate(relative_residual: float | None, stationarity: float | None, validation: dict | None,
                damping: float | None = None, removal_curvature: float | None = None, method: str = "newton") -> dict:
    """The certificate of one edit: its residual, stationarity, damping share, predicted and measured
    validation change, the verdict (`ok`, `retrain recommended`, or `unverified` without a validation
    set) and one sentence saying why and what to do."""
    residual, stationary = _finite(relative_residual), _finite(stationarity)
    shortened = damping_share(damping, removal_curvature)
    warnings = []
    if residual is not None and residual > RESIDUAL_WARNING:
        warnings.append(f"CG stopped at relative residual {residual:.2g} (above {RESIDUAL_WARNING:g}): raise "
                        "--max-iterations or --max-seconds, or raise the damping")
    if stationary is not None and stationary > STATIONARITY_WARNING and method == "newton":
        warnings.append(f"the model is not at a minimum of its training objective (stationarity {stationary:.2g}, "
                        f"above {STATIONARITY_WARNING:g}): the step also moves it towards that minimum")
    base = {"cg_relative_residual": residual, "stationarity": stationary, "damping_share": shortened,
            "warnings": warnings,
            "rule": (f"retrain recommended when the measured validation change has the opposite sign to the "
                     f"predicted one or is under {CONTRADICTION_SHARE:.3g} of it") if method == "replay" else
                    f"retrain recommended when the damping shortens the step along the removal gradient by "
                    f"{MAX_DAMPING_SHARE:g} or more, or when the measured validation change has the opposite sign "
                    f"to the predicted one or is under {CONTRADICTION_SHARE:.3g} of it"}
    predicted = None if validation is None else _finite(validation.get("predicted_change"))
    measured = None if validation is None else _finite(validation.get("actual_change"))
    base.update(predicted_validation_change=predicted, measured_validation_change=measured)
    if shortened is not None and shortened >= MAX_DAMPING_SHARE and method == "newton":
        return {**base, "verdict": RETRAIN,
                "reason": f"the damping ({_finite(damping):.4g}) is {shortened:.0%} of the curvature plus damping along "
                          "the removal gradient: the step is at most about half the Newton step, so the edit does "
                          "less than retraining would; retrain without the set, or give a smaller --damping"}
    if validation is None:
        return {**base, "verdict": UNVERIFIED,
                "reason": "the audit has no validation set to measure the edit on: add one to the manifest and "
                          "audit again, or retrain to be sure"}
    if predicted is None or measured is None:
        return {**base, "verdict": RETRAIN,
                "reason": "the validation loss change is not a finite number: retrain without the set instead"}
    if contradicts(predicted, measured):
        how = "the opposite sign" if predicted * measured < 0 else f"under {CONTRADICTION_SHARE:.3g} of it"
        return {**base, "verdict": RETRAIN,
                "reason": f"the validation loss changed by {measured:+.4g} where the edit predicted {predicted:+.4g} "
                          f"({how}): the step does not stand in for retraining; retrain without the set"}
    reason = f"the validation loss changed by {measured:+.4g}, as predicted ({predicted:+.4g})"
    if method == "replay":  # measured on bench.fix: a replay that holds its prediction can still do much less
        reason += (": the edit did what it predicted; retraining without the set, which moves every weight, can "
                   'do more (docs/METHOD.md, "The replay edit")')
    return {**base, "verdict": OK, "reason": reason}
