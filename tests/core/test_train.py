"""The trainer is deterministic, optimises the documented objective and writes its sidecar."""
import json

import pytest
import torch

from ecif_core.data.batching import partition
from ecif_core.data.sources import read_pairs
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


def test_validation_metrics_per_epoch_match_an_independent_computation(data, tmp_path):
    """--validation: per epoch the mean contrastive loss of the validation batches and image-to-text
    retrieval accuracy, printed through progress and stored in the sidecar; the last epoch's
    numbers equal a recomputation with the saved model."""
    from ecif_core.data.batching import training_batches
    from ecif_core.data.images import load_batch
    from ecif_core.influence.losses import batch_loss, pair_logits
    from ecif_core.models.factory import load_model

    seen = []
    result = train(data.train, MICRO_CONFIG, tmp_path / "v.pt", CFG, validation=data.validation,
                   progress=lambda e, n, loss, metrics: seen.append((e, metrics)))
    side = json.loads(result.sidecar.read_text())
    assert [h["epoch"] for h in side["validation"]] == [1, 2] == [e for e, _ in seen]
    assert seen[-1][1] == {k: side["validation"][-1][k] for k in ("loss", "image_to_text_accuracy")}
    loaded = load_model(config=MICRO_CONFIG, checkpoint=result.checkpoint)
    pairs, _, ids = read_pairs(data.validation)
    by_id = {p.id: p for p in pairs}
    batches, _ = training_batches(ids, CFG.batch_size, CFG.seed)
    loss, texts, images = 0.0, [], []
    with torch.no_grad():
        for batch in batches:
            im, tok = load_batch([by_id[i] for i in batch], loaded.preprocess, loaded.tokenizer)
            u, v = loaded.model.encode_text(tok), loaded.model.encode_image(im)
            loss += float(batch_loss(pair_logits(u, v, loaded.model.logit_scale.exp())))
            texts += list(torch.nn.functional.normalize(u, dim=-1))
            images += list(torch.nn.functional.normalize(v, dim=-1))
    sims = torch.stack(images) @ torch.stack(texts).T
    accuracy = sum(int(sims[i].argmax()) == i for i in range(len(sims))) / len(sims)
    assert side["validation"][-1]["loss"] == pytest.approx(loss / len(ids), rel=1e-5)
    assert side["validation"][-1]["image_to_text_accuracy"] == pytest.approx(accuracy)


def test_sidecar_paths_are_relative_so_a_moved_model_folder_keeps_its_reference(data, tmp_path):
    from ecif_core.data.manifest import load_manifest

    folder = tmp_path / "models"
    train(data.train, MICRO_CONFIG, folder / "base.pt", CFG)
    result = train(data.train, MICRO_CONFIG, folder / "tuned.pt", TrainConfig(**{**CFG.__dict__, "checkpoints": 2}),
                   init=folder / "base.pt")
    side = json.loads(result.sidecar.read_text())
    assert side["base_checkpoint"] == "base.pt" and side["checkpoints"] == ["tuned.epoch1.pt", "tuned.epoch2.pt"]
    moved = tmp_path / "moved"
    folder.rename(moved)
    manifest = load_manifest({"model": {"checkpoint": str(moved / "tuned.pt")}, "train": str(data.train)})
    assert manifest.reference["checkpoint"] == str((moved / "base.pt").resolve())


def test_the_l2_term_is_part_of_the_objective_the_trainer_steps_on(data, tmp_path):
    """The trained model must be a stationary point of loss + (delta/2)|theta|^2 (what ECIF
    differentiates), so the L2 term is in the loss, not AdamW's decoupled decay. With one batch and
    one step, Adam's first update is lr x sign(gradient) per entry; with a huge delta the L2 term
    dominates the gradient, so every weight larger than the step moves towards zero. Dropping the
    L2 term (or passing it to AdamW as decoupled decay with its lr factor) fails here."""
    from ecif_core.models.factory import load_model

    init = train(data.train, MICRO_CONFIG, tmp_path / "init.pt", TrainConfig(epochs=1, batch_size=40, lr=1e-6, seed=4))
    cfg = TrainConfig(epochs=1, batch_size=40, lr=1e-4, weight_decay=1e9, seed=4, warmup_steps=1)
    stepped = train(data.train, MICRO_CONFIG, tmp_path / "step.pt", cfg, init=init.checkpoint)
    before = dict(load_model(config=MICRO_CONFIG, checkpoint=init.checkpoint).model.named_parameters())
    after = dict(load_model(config=MICRO_CONFIG, checkpoint=stepped.checkpoint).model.named_parameters())
    moved = total = 0
    for name, value in before.items():
        if name == "logit_scale":  # the temperature is not in the L2 term
            continue
        big = value.abs() > 2e-4
        total += int(big.sum())
        moved += int((after[name].abs() < value.abs())[big].sum())
    assert total > 100 and moved == total


def _loss_by_definition(model, batches, by_id, loaded, demoted: set[str]) -> float:
    """Sum over batches of sum over pairs NOT demoted of -log p_ii - log q_ii, every pair in each softmax."""
    from ecif_core.data.images import load_batch

    total = 0.0
    with torch.no_grad():
        for batch in batches:
            im, tok = load_batch([by_id[i] for i in batch], loaded.preprocess, loaded.tokenizer)
            u = torch.nn.functional.normalize(model.encode_text(tok), dim=-1)
            v = torch.nn.functional.normalize(model.encode_image(im), dim=-1)
            s = (model.logit_scale.exp() * u @ v.T).double()
            for i, pair_id in enumerate(batch):
                if pair_id not in demoted:
                    total -= float(torch.log_softmax(s[i], 0)[i] + torch.log_softmax(s[:, i], 0)[i])
    return total


def test_demote_trains_on_the_loss_without_the_demoted_pairs_own_terms(data, tmp_path):
    """A step size of 1e-12 leaves the model at its start, so the epoch's loss is the demoted loss of the
    saved model, recomputed here from the definition; the demoted pairs stay in their batches."""
    from ecif_core.data.batching import training_batches
    from ecif_core.models.factory import load_model

    pairs, _, ids = read_pairs(data.train)
    by_id = {p.id: p for p in pairs}
    batches, _ = training_batches(ids, 8, 4)
    demoted = {batches[0][1], batches[0][5], batches[2][0]}
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-12, seed=4, demote=sorted(demoted))
    result = train(data.train, MICRO_CONFIG, tmp_path / "d.pt", cfg)
    side = json.loads(result.sidecar.read_text())
    assert side["demoted"] == sorted(demoted) and side["excluded"] == [] and side["pairs_used"] == 40
    loaded = load_model(config=MICRO_CONFIG, checkpoint=result.checkpoint)
    expected = _loss_by_definition(loaded.model, batches, by_id, loaded, demoted)
    assert result.final_loss * 40 == pytest.approx(expected, rel=1e-5)
    assert abs(expected - _loss_by_definition(loaded.model, batches, by_id, loaded, set())) > 1.0


def test_keep_list_takes_ids_out_of_the_removed_and_demoted_sets(data, tmp_path):
    from ecif_core.errors import ConfigError

    _, _, ids = read_pairs(data.train)
    removed, demoted, keep = ids[:3], ids[3:6], [ids[0], ids[4], ids[10]]
    result = train(data.train, MICRO_CONFIG, tmp_path / "k.pt",
                   TrainConfig(**{**CFG.__dict__, "epochs": 1, "exclude": removed, "demote": demoted, "keep": keep}))
    side = json.loads(result.sidecar.read_text())
    assert side["excluded"] == sorted(ids[1:3]) and side["demoted"] == sorted([ids[3], ids[5]])
    assert side["kept_back"] == {"exclude": 1, "demote": 1} and side["pairs_used"] == 38
    for bad, field in (({"demote": ["typo-id"]}, "demote"), ({"keep": ["typo-id"]}, "keep"),
                       ({"exclude": ids[:2], "demote": ids[1:3]}, "demote"),
                       ({"demote": ids[:2], "keep": ids[:2]}, "demote")):
        with pytest.raises(ConfigError) as error:
            train(data.train, MICRO_CONFIG, tmp_path / "bad.pt", TrainConfig(**{**CFG.__dict__, **bad}))
        assert error.value.field == field
