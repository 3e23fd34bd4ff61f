"""bench.fix: the clean metrics against loops over their definitions, the lists' specs, the decision and
target rules on made-up records, and the quick preset end to end (resumable, each action what it says)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.fix import actions, runner, tables
from bench.fix.evaluate import clean_metrics, held_out_change
from bench.fix.settings import LISTS, quick
from bench.quality.finetune.base import model_config_path
from bench.quality.finetune.generator import VOCAB_A, sample_items, write_split
from bench.quality.finetune.retrieval import retrieval_accuracy
from ecif_core.data.images import load_batch
from ecif_core.data.sources import read_pairs
from ecif_core.influence.gradients import embed, temperature_scale
from ecif_core.models.factory import load_model


def test_clean_metrics_equal_loops_over_their_definitions(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    split = write_split(tmp_path / "data", "test", VOCAB_A, sample_items(VOCAB_A, 20, rng), rng)
    loaded = load_model(config=model_config_path(tmp_path), seed=5)
    got = clean_metrics(loaded, split, VOCAB_A, batch_size=8)

    pairs = read_pairs(split.path)[0]
    with torch.no_grad():
        images, tokens = load_batch(pairs, loaded.preprocess, loaded.tokenizer)
        text, image = (torch.nn.functional.normalize(e, dim=-1) for e in embed(loaded.model, images, tokens))
        scale = float(temperature_scale(loaded.model))
    correct = 0
    for i in range(len(pairs)):  # caption i against every image: right when the best shows caption i's class
        best = max(range(len(pairs)), key=lambda j: float(text[i] @ image[j]))
        correct += split.items[best].label == split.items[i].label
    loss = 0.0
    for start in range(0, len(pairs), 8):  # -log p_ii - log q_ii per pair, batches of 8 in file order
        b = slice(start, start + 8)
        logits = scale * text[b] @ image[b].T
        loss -= float(torch.diagonal(logits.log_softmax(0)).sum() + torch.diagonal(logits.log_softmax(1)).sum())
    assert got["t2i_top1"] == correct / len(pairs)
    assert got["test_loss"] == pytest.approx(loss / len(pairs), rel=1e-5)
    assert got["i2t_top1"] == retrieval_accuracy(loaded, split, VOCAB_A)["top1"]


def test_lists_resolve_to_the_products_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    """{n} and {m} are the sizes of the product's own `suspected` and `estimated` sets; a list sized by a set
    that names no pair (nothing flagged, no estimate) is skipped."""
    from types import SimpleNamespace

    from ecif_core.errors import ConfigError

    def product_sets(flagged: int, estimated: int):
        def removal_set(audit, spec, ranking=None):
            size = {"suspected": flagged, "estimated": estimated}[spec]
            if not size:
                raise ConfigError("remove", f"{spec!r} selects no pair")
            return SimpleNamespace(ids=tuple(f"p{i}" for i in range(size)))
        return removal_set

    monkeypatch.setattr(actions, "removal_set", product_sets(flagged=3, estimated=12))
    assert actions.list_spec(Path("x"), "audit_estimated", 7) == "estimated"  # the product's spec: as many as estimated
    assert actions.list_spec(Path("x"), "reference_low_m", 7) == "top:12:reference_clip_score"
    assert actions.list_spec(Path("x"), "reference_low_n", 7) == "top:3:reference_clip_score"  # as many as flagged
    assert actions.list_spec(Path("x"), "random10", 7) == "random:0.1:7"
    assert actions.list_spec(Path("x"), "suspected", 7) == "suspected"

    monkeypatch.setattr(actions, "removal_set", product_sets(flagged=0, estimated=0))
    assert actions.list_spec(Path("x"), "audit_estimated", 7) is None
    assert actions.list_spec(Path("x"), "reference_low_m", 7) is None
    assert actions.list_spec(Path("x"), "reference_low_n", 7) is None
    assert actions.list_spec(Path("x"), "suspected", 7) is None
    assert set(LISTS) >= {"suspected", "reference_low_n", "own_low10", "random10"}


def _records(i2t: dict[tuple[str, str], float], original: float = 0.80, noise: float = 0.81,
             fraction: float = 0.2, seed: int = 100, seconds: dict[str, float] | None = None) -> list[dict]:
    """Made-up records of one cell: i2t per (list, action), every other metric fixed."""
    spec = {"regime": "same_domain", "corruption": "attribute", "tuning": "full", "fraction": fraction, "seed": seed,
            "split": "test", "crossfit": False}
    name = f"cell-{fraction}-{seed}"

    def metrics(top1: float, loss: float = 1.0) -> dict:
        return {"i2t_top1": top1, "t2i_top1": top1, "test_loss": loss}
    out = [{"cell": name, "name": "original", "spec_of_cell": spec, "metrics": metrics(original)},
           {"cell": name, "name": "noise", "spec_of_cell": spec, "metrics": metrics(noise), "seconds": 10.0}]
    for (lst, action), top1 in i2t.items():
        out.append({"cell": name, "list": lst, "action": action, "spec_of_cell": spec, "pairs": 10, "corrupted_share": 1.0,
                    "metrics": metrics(top1, 1.0 - (top1 - original)), "seconds": (seconds or {}).get(action, 10.0),
                    "verdict": "ok"})
    return out


def test_held_out_prediction_is_the_test_losss_slope_along_the_edit(tmp_path: Path) -> None:
    """held_out_change's prediction is the directional derivative of the clean test loss along the edit's parameter
    change: checked against a central finite difference of the loss itself, and its measured change
    is the loss after minus the loss before."""
    rng = np.random.default_rng(4)
    split = write_split(tmp_path / "data", "test", VOCAB_A, sample_items(VOCAB_A, 12, rng), rng)
    original = load_model(config=model_config_path(tmp_path), seed=5)
    edited = load_model(config=model_config_path(tmp_path), seed=5)
    generator = torch.Generator().manual_seed(0)
    delta = {n: 1e-1 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
             for n, p in edited.model.named_parameters() if n in ("visual.proj", "text_projection")}
    with torch.no_grad():
        for n, p in edited.model.named_parameters():
            if n in delta:
                p.add_(delta[n])
    got = held_out_change(original, edited, split, batch_size=4)

    def loss_at(t: float) -> float:
        probe = load_model(config=model_config_path(tmp_path), seed=5)
        with torch.no_grad():
            for n, p in probe.model.named_parameters():
                if n in delta:
                    p.add_(t * delta[n])
        return clean_metrics(probe, split, VOCAB_A, batch_size=4)["test_loss"]
    slope = (loss_at(0.05) - loss_at(-0.05)) / 0.1   # float32 losses: a step well above their rounding
    assert abs(got["predicted_change"]) > 1e-3
    assert got["predicted_change"] == pytest.approx(slope, rel=2e-2)
    assert got["actual_change"] == pytest.approx(loss_at(1.0) - loss_at(0.0), rel=1e-4, abs=1e-6)


def test_the_held_out_verdict_counts_self_contradicting_edits_and_false_alarms() -> None:
    """The verdict's second reading: an edit whose clean-test change contradicts its own prediction must be
    flagged; a flag on an edit that matched retraining is a false alarm."""
    records = _records({("suspected", "retrain:remove"): 0.86, ("suspected", "edit:remove"): 0.85,   # matches
                        ("audit_top10", "retrain:remove"): 0.86, ("audit_top10", "edit:remove"): 0.80})  # does not
    holds, wrong = [r for r in records if r.get("action") == "edit:remove"]
    wrong["held_out"] = {"predicted_change": -0.06, "actual_change": -0.01}   # under a third: contradicts
    holds["held_out"] = {"predicted_change": -0.06, "actual_change": -0.05}

    def target() -> dict:
        (found,) = [t for t in tables.summarise(records)["targets"] if "clean test split" in t["target"]]
        return found
    assert target()["value"].startswith("0 of 1 self-contradicting") and not target()["met"]
    wrong["verdict"] = "retrain recommended"
    assert target()["value"].startswith("1 of 1") and target()["met"]
    holds["verdict"] = "retrain recommended"   # a flag on the edit that matched retraining: a false alarm
    assert "1 of 1 edits that matched retraining flagged" in target()["value"] and not target()["met"]


def test_decision_and_recommendation_follow_clean_accuracy_and_cost() -> None:
    records = _records({("suspected", "retrain:remove"): 0.86, ("suspected", "edit:remove"): 0.855,
                        ("audit_top10", "retrain:demote"): 0.84, ("reference_low_n", "retrain:remove"): 0.88,
                        ("reference_low10", "retrain:remove"): 0.70},  # not the flagged list's size: not compared
                       seconds={"edit:remove": 2.0})
    result = tables.summarise(records)
    group = "same_domain full attribute 20%"
    decided = result["decision"][group]
    assert decided["best"] == ("reference_low_n", "retrain:remove")
    # the noise is 1 point: the edit (85.5) is not within it of 88, so the cheapest near the best is the best
    assert decided["cheapest_near_best"] == ("reference_low_n", "retrain:remove")
    assert result["recommended"] == ("suspected", "retrain:remove")  # only the audit's lists are recommended
    (gap,) = result["edit_gaps"]
    assert gap["gap"] == pytest.approx(0.5) and gap["time_ratio"] == pytest.approx(0.2)
    wins = [t for t in result["targets"] if "recommended action" in t["target"]]
    assert len(wins) == 1 and not wins[0]["met"]  # +6 vs +8 points: more than 0.5 behind CLIPScore
    assert "+6.00 vs +8.00" in wins[0]["value"] and "reference_low_n" in wins[0]["target"]


def test_the_recommendation_prefers_retraining_without_the_list_within_the_noise() -> None:
    close = _records({("suspected", "retrain:remove"): 0.86, ("suspected", "retrain:demote"): 0.865})  # noise 1
    assert tables.summarise(close)["recommended"] == ("suspected", "retrain:remove")
    clear = _records({("suspected", "retrain:remove"): 0.86, ("suspected", "retrain:demote"): 0.88})
    assert tables.summarise(clear)["recommended"] == ("suspected", "retrain:demote")


def test_the_cheapest_action_within_the_noise_of_the_best_is_chosen() -> None:
    records = _records({("suspected", "retrain:remove"): 0.86, ("suspected", "edit:remove"): 0.855},
                       noise=0.81, seconds={"edit:remove": 2.0})  # noise 1 point: the edit is 0.5 behind
    decided = tables.summarise(records)["decision"]["same_domain full attribute 20%"]
    assert decided["best"] == ("suspected", "retrain:remove")
    assert decided["cheapest_near_best"] == ("suspected", "edit:remove")


def test_noise_is_the_mean_gap_between_retrainings_that_differ_only_in_seed() -> None:
    records = _records({("suspected", "retrain:remove"): 0.86}, original=0.80, noise=0.81)
    records.append({**records[1], "name": "noise-2", "metrics": {**records[1]["metrics"], "i2t_top1": 0.78}})
    (noise,) = tables.summarise(records)["noise"].values()
    assert noise == pytest.approx((1 + 2 + 3) / 3)  # |80-81|, |80-78|, |81-78| points


def test_cells_that_did_not_learn_their_data_are_left_out() -> None:
    records = _records({("suspected", "retrain:remove"): 0.86}, original=0.49, noise=0.5)
    result = tables.summarise(records)
    assert result["cells"] == 0 and not result["groups"] and result["not_learned"] == {"cell-0.2-100": 0.49}
    assert tables.summarise(_records({("suspected", "retrain:remove"): 0.86}, original=0.5))["cells"] == 1


def test_preview_agreement_counts_signs_against_retraining() -> None:
    records = _records({("suspected", "retrain:remove"): 0.86, ("random10", "retrain:remove"): 0.79})
    for r, change in zip(records[2:], (-0.2, -0.1)):  # losses change by -0.06 and +0.01 (1 - (top1 - 0.80))
        r["preview_change"] = change
    agreement = tables.summarise(records)["preview"]
    assert agreement["lists"] == 2 and agreement["signs_agree"] == 1 and agreement["pearson"] == pytest.approx(1.0)


def test_clean_control_target_fails_when_an_action_hurts_beyond_the_noise() -> None:
    hurt = _records({("random10", "retrain:remove"): 0.78}, fraction=0.0)  # -2 points, noise 1
    (target,) = [t for t in tables.summarise(hurt)["targets"] if "clean control" in t["target"]]
    assert not target["met"]
    fine = _records({("random10", "retrain:remove"): 0.795}, fraction=0.0)
    (target,) = [t for t in tables.summarise(fine)["targets"] if "clean control" in t["target"]]
    assert target["met"]
    # with a corrupted cell recommending `suspected`, the clean control also checks that list alone
    both = _records({("suspected", "retrain:remove"): 0.86}) + _records(
        {("suspected", "retrain:remove"): 0.79, ("random10", "retrain:remove"): 0.70}, fraction=0.0)
    clean = {t["target"]: t["met"] for t in tables.summarise(both)["targets"] if "clean control" in t["target"]}
    assert clean == {"same_domain full clean control: the recommended list (suspected) hurts no more than the noise": True,
                     "same_domain full clean control: any list hurts no more than the noise": False}


def test_quick_preset_end_to_end_and_resumable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = quick()
    settings.clean_seeds, settings.lists = [], ["audit_top10"]
    out = tmp_path / "out"
    monkeypatch.setattr(tables, "LEARNED_TOP1", 0.0)  # the quick model barely learns: table it anyway
    results = runner.run(settings, out, workers=1, command="test")
    (cell,) = runner.cells_of(settings)
    records = {p.name: json.loads(p.read_text()) for p in (out / "fix" / cell.name).glob("*.json")}
    assert set(records) == {"original.json", "noise.json", "audit_top10--retrain-remove.json",
                            "audit_top10--retrain-demote.json", "audit_top10--edit-remove.json",
                            "audit_top10--edit-demote.json"}
    removed = records["audit_top10--retrain-remove.json"]
    assert removed["spec"] == "top:0.1:rank" and removed["pairs"] == round(0.1 * settings.finetune.n_finetune)
    truth = {r.split(",")[0]: r.split(",") for r in (out / "cells" / cell.name / "truth.csv").read_text().splitlines()[1:]}
    assert 0 < removed["corrupted_share"] <= 1 and len(truth) == settings.finetune.n_finetune
    # each action changes the model its own way: demoting is not removing, editing is not retraining
    m = {k: v["metrics"]["test_loss"] for k, v in records.items()}
    assert len({m["audit_top10--retrain-remove.json"], m["audit_top10--retrain-demote.json"],
                m["audit_top10--edit-remove.json"], m["audit_top10--edit-demote.json"], m["original.json"]}) == 5
    assert records["audit_top10--edit-demote.json"]["verdict"] in ("ok", "retrain recommended", "unverified")
    held_out = records["audit_top10--edit-remove.json"]["held_out"]   # measured against the original's test loss
    assert held_out["actual_change"] == pytest.approx(m["audit_top10--edit-remove.json"] - m["original.json"], abs=1e-5)
    assert records["noise.json"]["seed"] == cell.seed + 1000
    report = (out / "fix" / "RESULTS.md").read_text()
    assert len(results["edit_gaps"]) == 2 and sum(report.count(f"| audit_top10 | {a} |") for a in settings.actions) == 4

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished record was recomputed")
    monkeypatch.setattr(actions, "train", must_not_run)
    monkeypatch.setattr(actions, "edit_audit", must_not_run)
    again = runner.run(settings, out, workers=1, command="test")
    assert again["edit_gaps"] == results["edit_gaps"]


def test_dev_flags_select_the_development_cells_only(tmp_path: Path) -> None:
    """`--dev` runs bench.quality's development seeds (where choices are made) and never a test seed or a
    clean control; `--corruptions` and `--no-lora` narrow the grid; without them the preset's test cells run."""
    settings, _ = runner.parse_args(["--dev", "--corruptions", "attribute", "shuffle", "--no-lora"])
    cells = runner.cells_of(settings)
    assert {(c.corruption, c.seed, c.split) for c in cells} == {
        (corruption, seed, "dev") for corruption in ("attribute", "shuffle") for seed in (0, 1, 2)}
    assert all(c.fraction > 0 and c.tuning == "full" for c in cells)
    (tmp_path / "fix" / cells[0].name).mkdir(parents=True)   # a dev record beside a test one: each run reads its own
    (tmp_path / "fix" / "same_domain-attribute-full-f20-s100").mkdir()
    for folder in (cells[0].name, "same_domain-attribute-full-f20-s100"):
        record = {"key": settings.action_key(), "cell": folder, "name": "original", "metrics": {}}
        (tmp_path / "fix" / folder / "original.json").write_text(json.dumps(record))
    assert [r["cell"] for r in runner.all_records(tmp_path, settings)] == [cells[0].name]
    default, _ = runner.parse_args([])
    assert {c.seed for c in runner.cells_of(default)} == {100, 101, 102}
    assert all(c.split == "test" for c in runner.cells_of(default))
