"""The edit's certificate: the verdict follows the rule fixed in advance (opposite sign, or under a
third of the prediction, recommends retraining), and says `unverified` without a validation set."""
from __future__ import annotations

import math

import pytest

from ecif_core.edit.certificate import OK, RETRAIN, UNVERIFIED, certificate, contradicts, damping_share


def _validation(predicted: float, measured: float) -> dict:
    return {"predicted_change": predicted, "actual_change": measured, "loss_before": 1.0, "loss_after": 1.0 + measured}


@pytest.mark.parametrize("predicted, measured, expected", [
    (-0.047, 0.024, RETRAIN),     # the case a user met: predicted a fall, the loss rose
    (-0.047, -0.015, RETRAIN),    # the right sign, under a third of the prediction
    (-0.047, -0.016, OK),         # just over a third
    (-0.047, -0.2, OK),           # more than predicted is not a contradiction
    (0.03, 0.02, OK),             # a predicted rise that happened
    (0.03, -0.02, RETRAIN),
    (0.0, 0.0, OK),
])
def test_verdict_follows_the_rule(predicted, measured, expected):
    record = certificate(0.01, 0.2, _validation(predicted, measured))
    assert record["verdict"] == expected and contradicts(predicted, measured) == (expected == RETRAIN)
    assert record["predicted_validation_change"] == predicted and record["measured_validation_change"] == measured
    assert record["warnings"] == [] and ("retrain" in record["reason"]) == (expected == RETRAIN)


def test_without_a_validation_set_the_edit_is_unverified():
    record = certificate(0.01, 0.2, None)
    assert record["verdict"] == UNVERIFIED and "validation set" in record["reason"]
    assert record["predicted_validation_change"] is None and record["measured_validation_change"] is None


def test_a_non_finite_change_recommends_retraining():
    assert certificate(0.01, 0.2, _validation(-0.05, math.nan))["verdict"] == RETRAIN


def test_residual_and_stationarity_warn_without_deciding():
    record = certificate(0.38, 0.7, _validation(-0.05, -0.04))
    assert record["verdict"] == OK and len(record["warnings"]) == 2
    assert "--max-iterations" in record["warnings"][0] and "not at a minimum" in record["warnings"][1]
    assert certificate(None, None, _validation(-0.05, -0.04))["warnings"] == []


@pytest.mark.parametrize("damping, curvature, expected", [
    (0.1, 1.0, OK),        # the default: lambda = 0.1 x the curvature along the removal gradient, share 1/11
    (1.0, 1.0, RETRAIN),   # one damping escalation after negative curvature: half the Newton step
    (10.0, 1.0, RETRAIN),  # a heavily damped step predicts its own small change correctly, yet does little
])
def test_a_step_shortened_by_damping_recommends_retraining(damping, curvature, expected):
    record = certificate(0.01, 0.2, _validation(-0.05, -0.05), damping, curvature)  # the prediction held
    assert record["damping_share"] == pytest.approx(damping / (damping + curvature))
    assert record["verdict"] == expected and (("smaller --damping" in record["reason"]) == (expected == RETRAIN))
    assert damping_share(0.0, 0.0) is None and damping_share(None, 1.0) is None
    without_validation = certificate(0.01, 0.2, None, damping, curvature)  # the damping rule needs no validation set
    assert without_validation["verdict"] == (RETRAIN if expected == RETRAIN else UNVERIFIED)
