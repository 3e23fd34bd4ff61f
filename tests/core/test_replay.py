"""The replay edit (ecif_core.edit.replay) against the trainer itself: its parameter change is the
difference of two real training runs from the audited model, with and without the set."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ecif_core.data.batching import training_batches
from ecif_core.data.images import load_batch
from ecif_core.data.sources import read_pairs
from ecif_core.datasets.digits import build_digits
from ecif_core.edit.certificate import certificate
from ecif_core.edit.replay import Recipe, recipe_of, replay_parameters
from ecif_core.edit.solver import LeaveOutObjective, TrainingBatch
from ecif_core.errors import ConfigError
from ecif_core.models.factory import ready_model
from ecif_core.train import TrainConfig, train
from tests.core.helpers import MICRO_CONFIG

PROJECTIONS = ["visual.proj", "text_projection"]
BATCH, SEED, WD = 8, 3, 1e-2


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory) -> Path:
    """Digits (48 pairs), a micro CLIP trained 2 epochs: a model stopped well before a minimum."""
    root = tmp_path_factory.mktemp("replay")
    data = build_digits(root / "data", fraction=0.25, seed=2, n_train=48, n_val=8, n_test=8)
    (root / "cfg.json").write_text(json.dumps(MICRO_CONFIG))
    train(data.train, root / "cfg.json", root / "model.pt", TrainConfig(epochs=2, batch_size=BATCH, lr=2e-3,
                                                                          weight_decay=WD, seed=SEED))
    return root


def _objective(root: Path, chosen: set[str], action: str = "remove") -> tuple[LeaveOutObjective, list[str]]:
    ready = ready_model(config=root / "cfg.json", checkpoint=root / "model.pt", theta=PROJECTIONS, device="cpu")
    pairs, _, ids = read_pairs(root / "data" / "train.jsonl")
    by_id = {p.id: p for p in pairs}
    batches, _ = training_batches(ids, BATCH, SEED)
    made = [TrainingBatch(*load_batch([by_id[i] for i in b], ready.loaded.preprocess, ready.loaded.tokenizer),
                          torch.tensor([i in chosen for i in b])) for b in batches]
    return LeaveOutObjective(ready.model, ready.theta, made, WD, action=action), [b[0] for b in batches]


def _trained_theta(root: Path, out: Path, **acted) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(epochs=2, batch_size=BATCH, lr=1e-3, weight_decay=WD, seed=SEED, train_only=PROJECTIONS, **acted)
    train(root / "data" / "train.jsonl", root / "cfg.json", out, cfg, init=root / "model.pt")
    state = torch.load(out, weights_only=True)
    return {name: state[name] for name in PROJECTIONS}


@pytest.mark.parametrize("action", ["remove", "demote"])
def test_the_replay_is_the_difference_of_two_trainer_runs_from_the_audited_model(fine_tune, tmp_path, action):
    """theta_hat + A(without E) - A(with E), A the trainer's own recipe (order, warm-up, decay, L2 share) on
    theta: computed by ecif_core.train twice. Returning A(without E) - theta_hat instead (the drift kept),
    another batch order or another schedule fails here."""
    objective, first_ids = _objective(fine_tune, set(), action)
    chosen = set(first_ids[:3])  # one pair from each of three batches: no batch falls below two pairs
    for b, first in zip(objective.batches, first_ids):
        b.chosen = torch.tensor([first in chosen and k == 0 for k in range(len(b.chosen))])
    before = [p.detach().clone() for p in objective.params]
    result = replay_parameters(objective, Recipe(epochs=2, lr=1e-3, seed=SEED))
    for p, q in zip(objective.params, before):
        assert torch.equal(p.detach(), q)  # the audited model is left as it was
    acted = {"exclude": tuple(chosen)} if action == "remove" else {"demote": tuple(chosen)}
    without = _trained_theta(fine_tune, tmp_path / "without.pt", **acted)
    with_set = _trained_theta(fine_tune, tmp_path / "with.pt")
    for name in PROJECTIONS:
        expected = without[name] - with_set[name]
        assert float(expected.norm()) > 1e-4  # the set changes the run: the comparison has something to match
        torch.testing.assert_close(result.delta[name], expected, rtol=1e-3, atol=2e-6)
    delta = torch.cat([result.delta[n].flatten() for n in PROJECTIONS])
    drift = torch.cat([(without[n] - dict(objective.theta)[n].detach()).flatten() for n in PROJECTIONS])
    assert float((drift - delta).norm()) > 0.5 * float(delta.norm())  # the run without E alone: another answer
    assert result.method == "replay" and result.iterations == result.steps == 2 * len(objective.batches)
    assert result.summary()["steps_done"] == result.iterations and "damping" not in result.summary()


def test_a_batch_demoted_whole_still_takes_the_trainers_weight_decay_step(fine_tune, tmp_path):
    """A batch whose every pair is demoted has no loss left, but the trainer still steps on it (its share of
    the L2 term, and AdamW's moments move): the replay's run without the set does the same."""
    objective, _ = _objective(fine_tune, set(), "demote")
    whole = objective.batches[1]
    whole.chosen = torch.ones_like(whole.chosen)
    ids = _batch_ids(fine_tune)[1]
    result = replay_parameters(objective, Recipe(epochs=2, lr=1e-3, seed=SEED))
    without = _trained_theta(fine_tune, tmp_path / "without.pt", demote=tuple(ids))
    with_set = _trained_theta(fine_tune, tmp_path / "with.pt")
    for name in PROJECTIONS:
        torch.testing.assert_close(result.delta[name], without[name] - with_set[name], rtol=1e-3, atol=2e-6)


def _batch_ids(root: Path) -> list[list[str]]:
    _, _, ids = read_pairs(root / "data" / "train.jsonl")
    return training_batches(ids, BATCH, SEED)[0]


def test_a_time_budget_stops_both_runs_after_the_same_step(fine_tune):
    objective, first_ids = _objective(fine_tune, set())
    objective.batches[0].chosen = torch.tensor([True] + [False] * (len(objective.batches[0].chosen) - 1))
    seen = []
    result = replay_parameters(objective, Recipe(epochs=50, lr=1e-3, seed=SEED),
                               progress=lambda unit, done, total, **d: seen.append((done, total, d.get("eta_s"))),
                               max_seconds=1e-9)
    steps = 50 * len(objective.batches)
    assert result.stopped == "time budget" and result.iterations == 1 and [s[:2] for s in seen] == [(0, steps), (1, steps)]
    assert seen[1][2] > 0  # an ETA for the steps left


def test_the_recipe_comes_from_the_settings_or_the_sidecar_or_is_refused():
    assert recipe_of({"epochs": 3, "lr": 1e-3}, 7, None, None) == Recipe(3, 1e-3, 7)
    assert recipe_of({"epochs": 3, "lr": 1e-3}, 7, 5, 2e-3) == Recipe(5, 2e-3, 7)
    with pytest.raises(ConfigError, match="replay-epochs and --replay-lr") as caught:
        recipe_of({}, 0, None, 1e-3)
    assert caught.value.field == "replay_epochs"
    with pytest.raises(ConfigError, match="positive"):
        recipe_of({"epochs": 0, "lr": 1e-3}, 0, None, None)


def test_the_replays_certificate_judges_by_the_validation_change_alone():
    """No CG, no damping rule, no stationarity warning (the replay cancels the pull to the minimum)."""
    agreeing = {"predicted_change": -0.1, "actual_change": -0.08}
    replay = certificate(float("nan"), 3.0, agreeing, 0.0, None, method="replay")
    assert replay["verdict"] == "ok" and replay["warnings"] == []
    assert "retraining without the set" in replay["reason"] and "can do more" in replay["reason"]
    newton = certificate(1e-5, 3.0, agreeing, 0.0, None)
    assert newton["verdict"] == "ok" and "not at a minimum" in newton["warnings"][0]
    assert certificate(float("nan"), 0.1, {"predicted_change": -0.1, "actual_change": 0.01}, 0.0, None,
                       method="replay")["verdict"] == "retrain recommended"
