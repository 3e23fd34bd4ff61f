"""The trainer is deterministic, optimises the documented objective and writes its sidecar."""
import json

import pytest
import torch

from ecif_core.batching import partition
from ecif_core.sources import read_pairs
from ecif_core.datasets.digits import build_digits
from ecif_core.train import TrainConfig, train
from tests.core.helpers import MICRO_CONFIG

CFG = TrainConfig(epochs=2, batch_size=8, lr=1e-3, weight_decay=0.05, seed=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("train"), fraction=0.2, seed=2, n_train=40, n_val=8, n_test=8)


def test_same_seed_same_weights_and_sidecar(data, tmp_path):
    first = train(data.train, MICRO_CONFIG, tmp_path / "a.pt", CFG)
    second = train(data.train, MICRO_CONFIG, tmp_path / "b.pt", CFG)
    a, b = torch.load(first.checkpoint), torch.load(second.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    side = json.loads(first.sidecar.read_text())
    assert (side["batch_size"], side["seed"], side["weight_decay"], side["epochs"]) == (8, 4, 0.05, 2)
    assert side["model_config"] == MICRO_CONFIG and side["pairs_used"] == 40 and len(side["data_hash"]) == 64
    other = train(data.train, MICRO_CONFIG, tmp_path / "c.pt", TrainConfig(**{**CFG.__dict__, "seed": 5}))
    c = torch.load(other.checkpoint)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_exclude_is_recorded_and_unknown_ids_are_refused(data, tmp_path):
    """(That the remaining batches are unchanged is checked end to end in test_audit.)"""
    from ecif_core.errors import ConfigError

    pairs, _, ids = read_pairs(data.train)
    dropped = [partition(ids, 8, 4)[0][0], partition(ids, 8, 4)[3][2]]
    result = train(data.train, MICRO_CONFIG, tmp_path / "x.pt", TrainConfig(**{**CFG.__dict__, "exclude": dropped}))
    side = json.loads(result.sidecar.read_text())
    assert side["excluded"] == sorted(dropped) and side["pairs_used"] == 38
    with pytest.raises(ConfigError, match="exclude"):
        train(data.train, MICRO_CONFIG, tmp_path / "y.pt", TrainConfig(**{**CFG.__dict__, "exclude": ["typo-id"]}))


def test_training_lowers_the_loss(data, tmp_path):
    short = train(data.train, MICRO_CONFIG, tmp_path / "s.pt", TrainConfig(**{**CFG.__dict__, "epochs": 1, "lr": 1e-6}))
    longer = train(data.train, MICRO_CONFIG, tmp_path / "l.pt", TrainConfig(**{**CFG.__dict__, "epochs": 6, "lr": 3e-3}))
    assert longer.final_loss < short.final_loss
