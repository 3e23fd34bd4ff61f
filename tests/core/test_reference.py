"""The reference model: its scores per pair, the default from the training sidecar, and the
validation evidence (evidence.py), each against an independent computation."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ecif_core import stages as audit
from ecif_core.data.batching import hash_seed, partition
from ecif_core.data.images import load_batch
from ecif_core.data.sources import Pair
from ecif_core.models.factory import load_model
from ecif_core.datasets.digits import build_digits
from ecif_core.errors import ConfigError
from ecif_core.evidence import corrupted_captions, separation
from ecif_core.data.manifest import load_manifest
from ecif_core.models.reference import (NEGCLIP_REPEATS, averaged_negclip, negclip_batchings,
                                        reference_embeddings, reference_temperature)
from ecif_core.ranking import REFERENCE, RULES, SUSPECT_Z, VALIDATION
from ecif_core.train import TrainConfig, train
from services.embedded import run_audit
from tests.core.helpers import MICRO_CONFIG, micro_model, random_batch

OPTIONS = {"projection": {"k_in": 4, "k_out": 4}, "shard_batches": 2}


def _negclip_loop(sim: list[list[float]], tau: float, rows: list[int], i: int) -> float:
    """negCLIPLoss of row i within the batch `rows`, by its definition."""
    row = math.log(sum(math.exp(sim[i][k] / tau) for k in rows))
    col = math.log(sum(math.exp(sim[k][i] / tau) for k in rows))
    return sim[i][i] - tau / 2 * (row + col)


def test_averaged_negclip_matches_a_loop_over_the_negclip_definition():
    """One batching of all rows: each row's negCLIPLoss (s_ii - tau/2 [lse_k s_ik/tau + lse_k s_ki/tau]); two
    batchings: the mean of each row's value in its two batches."""
    loaded = micro_model(seed=3)
    images, tokens = random_batch(loaded, 6, seed=1)
    text, image = reference_embeddings(loaded.model, images, tokens)
    with torch.no_grad():
        u = loaded.model.encode_text(tokens).double()
        v = loaded.model.encode_image(images).double()
    tau = 1.0 / float(loaded.model.logit_scale.detach().exp())
    assert reference_temperature(loaded.model) == pytest.approx(tau)
    sim = [[float(torch.nn.functional.cosine_similarity(v[i], u[k], dim=0)) for k in range(6)] for i in range(6)]
    whole = averaged_negclip(text, image, tau, [[list(range(6))]])
    for i in range(6):
        assert float(whole[i]) == pytest.approx(_negclip_loop(sim, tau, list(range(6)), i), abs=1e-6)
    first, second = [[0, 1, 2], [3, 4, 5]], [[0, 3], [1, 4, 5], [2]]
    mean = averaged_negclip(text, image, tau, [first, second])
    for i in range(6):
        batches = [next(b for b in first if i in b), next(b for b in second if i in b)]
        expected = sum(_negclip_loop(sim, tau, b, i) for b in batches) / 2
        assert float(mean[i]) == pytest.approx(expected, abs=1e-6)
    batchings = negclip_batchings(50, 8, seed=0, shard=3)
    assert len(batchings) == NEGCLIP_REPEATS and batchings == negclip_batchings(50, 8, seed=0, shard=3)
    assert all(sorted(r for b in batching for r in b) == list(range(50)) for batching in batchings)
    assert batchings != negclip_batchings(50, 8, seed=0, shard=4)


def test_corrupted_captions_change_every_caption_the_documented_way():
    captions = ["a red circle", "a blue square", "a green star", "a red square"]
    out = corrupted_captions(captions, seed=0)
    assert out["shuffle"] == captions[1:] + captions[:1]
    for original, swapped, donor in zip(captions, out["word_swap"], captions[1:] + captions[:1]):
        before, after = original.split(), swapped.split()
        assert len(before) == len(after)
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(changed) == 1 and changed[0][1] in donor.split()
    assert corrupted_captions(captions, seed=0) == out


def test_separation_is_the_auroc_of_low_cosine():
    clean = np.array([0.9, 0.8, 0.7])
    result = separation(clean, {"shuffle": np.array([0.1, 0.2, 0.95]), "word_swap": np.array([0.95, 0.85, 0.75])})
    assert result["shuffle"] == pytest.approx(6 / 9)   # 0.1 and 0.2 below all clean; 0.95 above all
    assert result["word_swap"] == pytest.approx(3 / 9)   # 0.85 below 0.9; 0.75 below 0.9 and 0.8
    assert result["mean"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """A micro CLIP pretrained on digits, then fine-tuned from it (the sidecar records the base)."""
    root = tmp_path_factory.mktemp("reference")
    data = build_digits(root / "data", fraction=0.25, seed=2, n_train=48, n_val=16, n_test=8)
    (root / "cfg.json").write_text(json.dumps(MICRO_CONFIG))
    train(data.train, root / "cfg.json", root / "base.pt", TrainConfig(epochs=2, batch_size=8, lr=1e-3, seed=1))
    train(data.train, root / "cfg.json", root / "tuned.pt", TrainConfig(epochs=1, batch_size=8, lr=1e-3, seed=2),
          init=root / "base.pt")
    return root


def _manifest(root: Path, **extra) -> dict:
    return {"model": {"config": "cfg.json", "checkpoint": "tuned.pt"}, "train": "data/train.jsonl",
            "validation": "data/val.jsonl", "options": OPTIONS, **extra}


def test_the_base_checkpoint_is_the_default_reference_and_null_turns_it_off(finetuned):
    manifest = load_manifest(_manifest(finetuned), base_dir=finetuned)
    assert manifest.reference["checkpoint"] == str((finetuned / "base.pt").resolve())
    assert load_manifest(_manifest(finetuned, reference=None), base_dir=finetuned).reference is None
    with pytest.raises(ConfigError, match="reference.checkpoint"):
        load_manifest(_manifest(finetuned, reference={"config": "cfg.json", "checkpoint": "missing.pt"}),
                      base_dir=finetuned)
    with pytest.raises(ConfigError, match="options.rank_by"):
        load_manifest(_manifest(finetuned, reference=None, options={**OPTIONS, "rank_by": "reference_clip_score"}),
                      base_dir=finetuned)


@pytest.fixture(scope="module")
def audited(finetuned) -> Path:
    """The fine-tuned model audited with a validation set and the base model as its reference."""
    out = finetuned / "run"
    run_audit(load_manifest(_manifest(finetuned), base_dir=finetuned), out)
    return out


def test_audit_writes_reference_columns_equal_to_the_base_models_scores(finetuned, audited):
    out = audited
    with (out / "ranked.csv").open() as handle:
        rows = {r["id"]: r for r in csv.DictReader(handle)}
    # independent: the base model's embeddings of each pair, from pairs.jsonl's batches; reference_negclip is
    # averaged over the shard's seeded batchings (shard_batches = 2), rows in slot order
    base = load_model(None, str(finetuned / "cfg.json"), str(finetuned / "base.pt"))
    manifest = load_manifest(_manifest(finetuned), base_dir=finetuned)
    batches: dict[int, list] = {}
    for line in (out / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        batches.setdefault(row["batch"], []).append(row)
    embedded, shards = {}, {}
    for number, members in batches.items():
        pairs = [Pair(r["id"], r["image"], r["caption"]) for r in members]
        images, tokens = load_batch(pairs, base.preprocess, base.tokenizer)
        text, image = reference_embeddings(base.model, images, tokens)
        for i, r in enumerate(members):
            embedded[r["id"]] = (text[i], image[i])
            assert float(rows[r["id"]]["reference_clip_score"]) == pytest.approx(float(text[i] @ image[i]), abs=1e-6)
            shards.setdefault(number // OPTIONS["shard_batches"], []).append(r)
    tau = reference_temperature(base.model)
    for shard, members in shards.items():
        members.sort(key=lambda r: r["slot"])
        text = torch.stack([embedded[r["id"]][0] for r in members])
        image = torch.stack([embedded[r["id"]][1] for r in members])
        batchings = negclip_batchings(len(members), manifest.options.batch_size, manifest.options.seed, shard)
        expected = averaged_negclip(text, image, tau, batchings)
        for r, value in zip(members, expected):
            assert float(rows[r["id"]]["reference_negclip"]) == pytest.approx(float(value), abs=1e-6)
    evidence = audit.open_store(out).validation_attrs()["evidence"]
    assert set(evidence) == {"clip_score", "reference_clip_score"}
    assert all(0 <= evidence[m][c] <= 1 for m in evidence for c in ("shuffle", "word_swap", "mean"))
    some = next(iter(rows.values()))
    loo = float(some["clip_score"]) - float(some["self_influence_clip"])
    assert float(some["clip_score_loo"]) == pytest.approx(loo, rel=1e-6)
    assert some["influence_per_example"] != ""


def test_a_reference_of_another_architecture_is_allowed_and_no_reference_leaves_the_columns_empty(finetuned):
    other = dict(MICRO_CONFIG, embed_dim=MICRO_CONFIG["embed_dim"] * 2)
    (finetuned / "other.json").write_text(json.dumps(other))
    train(finetuned / "data/train.jsonl", finetuned / "other.json", finetuned / "other.pt",
          TrainConfig(epochs=1, batch_size=8, lr=1e-3, seed=3))
    out = finetuned / "run_other"
    run_audit(load_manifest(_manifest(finetuned, reference={"config": "other.json", "checkpoint": "other.pt"}),
                                  base_dir=finetuned), out)
    with (out / "ranked.csv").open() as handle:
        assert all(r["reference_clip_score"] != "" for r in csv.DictReader(handle))
    out = finetuned / "run_none"
    run_audit(load_manifest(_manifest(finetuned, reference=None), base_dir=finetuned), out)
    with (out / "ranked.csv").open() as handle:
        assert all(r["reference_clip_score"] == "" == r["reference_negclip"] for r in csv.DictReader(handle))


def _cosines(loaded, pairs: list[Pair], captions: list[str]) -> np.ndarray:
    """cos(image_i, text of captions[i]) under one model, computed directly."""
    images, _ = load_batch(pairs, loaded.preprocess, loaded.tokenizer)
    with torch.no_grad():
        image = torch.nn.functional.normalize(loaded.model.encode_image(images).double(), dim=-1)
        text = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(captions)).double(), dim=-1)
    return (image * text).sum(-1).numpy()


def test_validation_evidence_is_stored_under_the_model_it_measures(finetuned, audited):
    """evidence["clip_score"] is the audited (fine-tuned) model's AUROC on clean vs corrupted validation
    pairs, evidence["reference_clip_score"] the base model's: recomputed here from each model's cosines.
    Storing each model's AUROC under the other's name fails here."""
    manifest = load_manifest(_manifest(finetuned), base_dir=finetuned)
    o = manifest.options
    pairs = {p.id: p for p in (Pair(r["id"], str(finetuned / "data" / r["image"]) if not Path(r["image"]).is_absolute()
                                    else r["image"], r["caption"])
                              for r in map(json.loads, (finetuned / "data/val.jsonl").read_text().splitlines()))}
    models = {"clip_score": load_model(None, str(finetuned / "cfg.json"), str(finetuned / "tuned.pt")),
              "reference_clip_score": load_model(None, str(finetuned / "cfg.json"), str(finetuned / "base.pt"))}
    expected = {}
    for name, loaded in models.items():
        clean, corrupt = [], {c: [] for c in ("shuffle", "word_swap")}
        for number, ids in enumerate(partition(pairs, o.batch_size, o.seed)):
            if len(ids) < 2:
                continue
            batch = [pairs[i] for i in ids]
            captions = [p.caption for p in batch]
            clean.append(_cosines(loaded, batch, captions))
            for kind, changed in corrupted_captions(captions, hash_seed(o.seed, number)).items():
                corrupt[kind].append(_cosines(loaded, batch, changed))
        expected[name] = separation(np.concatenate(clean), {k: np.concatenate(v) for k, v in corrupt.items()})
    stored = audit.audit_evidence(audited)
    assert abs(expected["clip_score"]["mean"] - expected["reference_clip_score"]["mean"]) > 0.01  # a swap shows
    for name in expected:
        for kind in ("shuffle", "word_swap", "mean"):
            assert stored[name][kind] == pytest.approx(expected[name][kind], abs=1e-6), (name, kind)


def _robust_z(values: np.ndarray) -> np.ndarray:
    median = np.median(values)
    return (values - median) / (1.4826 * np.median(np.abs(values - median)))


def test_suspicion_weighs_each_models_robust_z_by_its_validation_evidence(audited):
    """suspicion = (w_a z(-clip_score_loo) + w_r z(-reference_negclip)) / (w_a + w_r) with
    w = max(0, 2 AUROC - 1) from the stored evidence (README, "Ranking rules"); the weights differ
    here, so a final ranking that weighs the two columns equally fails."""
    with (audited / "ranked.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    evidence = audit.audit_evidence(audited)
    w_a, w_r = (max(0.0, 2 * evidence[m]["mean"] - 1) for m in ("clip_score", "reference_clip_score"))
    assert abs(w_a - w_r) > 0.02 and w_a + w_r > 0
    z_a = _robust_z(-np.array([float(r["clip_score_loo"]) for r in rows]))
    z_r = _robust_z(-np.array([float(r["reference_negclip"]) for r in rows]))
    expected = (w_a * z_a + w_r * z_r) / (w_a + w_r)
    suspicion = np.array([float(r["suspicion"]) for r in rows])
    np.testing.assert_allclose(suspicion, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(suspicion, (z_a + z_r) / 2, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal([r["suspected"] == "true" for r in rows], suspicion > SUSPECT_Z)


def test_the_manifest_refuses_a_rule_exactly_when_its_needs_are_missing(finetuned):
    """ranking.RULES says what each rule needs; the manifest's check is derived from it."""
    for has_validation, has_reference in ((True, True), (False, True), (True, False), (False, False)):
        available = {need for need, has in ((VALIDATION, has_validation), (REFERENCE, has_reference)) if has}
        for rule in RULES:
            raw = _manifest(finetuned, options={**OPTIONS, "rank_by": rule.name})
            if not has_validation:
                del raw["validation"]
            if not has_reference:
                raw["reference"] = None
            if set(rule.needs) <= available:
                assert load_manifest(raw, base_dir=finetuned).options.rank_by == rule.name
            else:
                with pytest.raises(ConfigError, match="options.rank_by"):
                    load_manifest(raw, base_dir=finetuned)
