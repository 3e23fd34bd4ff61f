"""Tracing a test example: the test-loss gradient against autograd through open_clip's own
forward, the top-k order and the signed influence split against direct computations."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecif_core import stages as audit
from ecif_core.data.images import load_image
from ecif_core.datasets.digits import class_prompts, label_of_caption
from ecif_core.errors import ConfigError
from ecif_core.trace.query import (TraceExample, alternative_captions, examples_from_json, trace, trace_loss_gradient,
                                   trace_terms)
from services.embedded import run_audit
from tests.core.test_audit import finished, workspace  # noqa: F401  (module fixtures)


def _test_rows(workspace: Path) -> list[dict]:
    path = workspace / "data" / "test.jsonl"
    return [{**row, "image": str((path.parent / row["image"]).resolve())}
            for row in map(json.loads, path.read_text().splitlines())]


def _model(finished: Path):
    manifest = audit.manifest_of(audit.load_plan(finished))
    return audit.ModelCache().get(manifest)


def test_trace_loss_gradient_matches_autograd_through_the_model_forward(workspace, finished):
    loaded, params, projector = _model(finished)
    row = _test_rows(workspace)[0]
    example = TraceExample(row["image"], prompts=class_prompts(), label=label_of_caption(row["caption"]))
    grad, loss = trace_loss_gradient(loaded, params, projector, example, [])
    image = loaded.preprocess(load_image(row["image"])).unsqueeze(0)
    image_features, text_features, scale = loaded.model(image, loaded.tokenizer(class_prompts()))
    expected_loss = F.cross_entropy(scale * image_features @ text_features.T, torch.tensor([example.label]))
    grads = torch.autograd.grad(expected_loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    expected = projector.project([g.unsqueeze(0) for g in grads])[0]
    assert loss == pytest.approx(float(expected_loss.detach()), rel=1e-5)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)


def test_a_caption_is_contrasted_with_the_validation_captions(workspace, finished):
    loaded, params, projector = _model(finished)
    row = _test_rows(workspace)[1]
    alternatives = alternative_captions(finished)
    validation = [json.loads(x)["caption"] for x in (workspace / "data" / "val.jsonl").read_text().splitlines()]
    assert alternatives == validation
    _, loss = trace_loss_gradient(loaded, params, projector, TraceExample(row["image"], caption=row["caption"]),
                                 alternatives)
    texts = [row["caption"]] + [c for c in dict.fromkeys(validation) if c != row["caption"]]
    image = loaded.preprocess(load_image(row["image"])).unsqueeze(0)
    image_features, text_features, scale = loaded.model(image, loaded.tokenizer(texts))
    expected = F.cross_entropy(scale * image_features @ text_features.T, torch.tensor([0]))
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5)


def test_top_k_by_relative_is_listed_harmful_first_with_the_signed_split(workspace, finished):
    """The k largest relative-IS, ordered by sign(influence) x relative-IS: harmful (negative
    influence) first, strongest first, then helpful, strongest first."""
    row = _test_rows(workspace)[2]
    example = TraceExample(row["image"], prompts=class_prompts(), label=label_of_caption(row["caption"]))
    (result,) = trace(finished, [example], k=7)
    loaded, params, projector = _model(finished)
    grad, _ = trace_loss_gradient(loaded, params, projector, example, [])
    slots = np.array([slot for slot, _ in audit.load_slots(finished)])
    terms = {name: values[slots] for name, values in trace_terms(finished, grad).items()}
    largest = np.argsort(-terms["relative_is"], kind="stable")[:7]
    harmful = [i for i in largest if terms["influence"][i] < 0]
    helpful = [i for i in largest if terms["influence"][i] >= 0]
    assert harmful and helpful  # the example has both kinds among its top 7 (else the order is not tested)
    assert [p.slot for p in result.top] == list(slots[harmful + helpful])
    signed = [p.signed_relative_is for p in result.top]
    assert signed[:len(harmful)] == sorted(signed[:len(harmful)]) and max(signed[:len(harmful)]) < 0
    assert signed[len(harmful):] == sorted(signed[len(harmful):], reverse=True)
    plan, store = audit.load_plan(finished), audit.open_store(finished)
    inverse = audit.inverse_for(plan, store)
    direction = inverse.apply(grad.double())
    for p in result.top[:3]:
        g_pos = torch.from_numpy(store.pos_gradients(p.slot, p.slot + 1))[0].double()
        g_neg = torch.from_numpy(store.neg_gradients(p.slot, p.slot + 1))[0].double()
        assert p.influence_pos == pytest.approx(float(g_pos @ direction), rel=1e-6)
        assert p.influence_neg == pytest.approx(float(g_neg @ direction), rel=1e-6)
        assert p.influence == pytest.approx(p.influence_pos + p.influence_neg, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("raw, field", [
    ([], "tests"),
    ([{"image": "x.png"}], "tests[0]"),
    ([{"image": "x.png", "caption": "a", "prompts": ["a", "b"], "label": 0}], "tests[0]"),
    ([{"image": "x.png", "prompts": ["a"], "label": 0}], "tests[0].prompts"),
    ([{"image": "x.png", "prompts": ["a", "b"], "label": 2}], "tests[0].label"),
    ([{"image": "x.png", "caption": " "}], "tests[0].caption"),
    ([{"image": "x.png", "caption": "a", "k": 3}], "tests[0].k"),
])
def test_bad_test_examples_name_the_field(raw, field):
    with pytest.raises(ConfigError) as error:
        examples_from_json(raw)
    assert error.value.field == field


@pytest.mark.slow
def test_traced_pairs_agree_with_retraining_without_them(tmp_path):
    """Brute force: for the top 30 pairs of a test example, the predicted change of its test loss
    (the signed influence) against the change after retraining without the pair.

    Set-up where the influence function's assumptions can hold: a micro CLIP trained 10 epochs
    is the fixed base; theta = the two projections, fine-tuned from the base to (near) the
    optimum of the L2-regularised objective with everything else frozen; the audit is
    unprojected with the default damping; each retraining fine-tunes theta from the same base
    with one pair left out. Four fixed test examples (the first of the test split).
    Measured: Spearman 0.78 / 0.52 / 0.82 / 0.61 (mean 0.68); the bound below catches a wrong
    sign or an unrelated ranking (about -0.7 or 0), not the issue's 0.7 target.
    """
    from scipy.stats import spearmanr

    from ecif_core.datasets.digits import build_digits
    from ecif_core.models.factory import load_model, select_theta
    from ecif_core.influence.projection import ProjectionSpec, Projector
    from ecif_core.train import TrainConfig, train
    from tests.core.helpers import MICRO_CONFIG

    theta = ["visual.proj", "text_projection"]
    data = build_digits(tmp_path / "d", fraction=0.25, seed=1, n_train=64, n_val=24, n_test=16)
    (tmp_path / "cfg.json").write_text(json.dumps(MICRO_CONFIG))
    train(data.train, tmp_path / "cfg.json", tmp_path / "base.pt",
          TrainConfig(epochs=10, batch_size=8, lr=1e-3, weight_decay=1e-2, seed=1))

    def fine_tune(out: Path, exclude: tuple[str, ...] = ()) -> Path:
        train(data.train, tmp_path / "cfg.json", out, TrainConfig(epochs=30, batch_size=8, lr=1e-2,
              weight_decay=1e-2, seed=1, exclude=exclude, train_only=theta), init=tmp_path / "base.pt")
        return out

    fine_tune(tmp_path / "model.pt")
    base = torch.load(tmp_path / "base.pt", weights_only=True)
    tuned = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(base[name], tuned[name]) for name in base if name not in theta)  # only theta trained
    manifest = {"model": {"config": "cfg.json", "checkpoint": "model.pt"}, "train": "d/train.jsonl",
                "validation": "d/val.jsonl", "options": {"projection": None, "theta": theta}}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    run_audit(tmp_path / "m.json", tmp_path / "audit")

    def test_loss(checkpoint: Path, example: TraceExample) -> float:
        loaded = load_model(config=MICRO_CONFIG, checkpoint=str(checkpoint))
        chosen = select_theta(loaded.model, theta)
        projector = Projector.for_theta(chosen, ProjectionSpec(None, None, 0))
        return trace_loss_gradient(loaded, [p for _, p in chosen], projector, example, [])[1]

    rows = [{**row, "image": str((Path(data.test).parent / row["image"]).resolve())}
            for row in map(json.loads, Path(data.test).read_text().splitlines())]
    correlations, retrained = [], {}
    for row in rows[:4]:
        example = TraceExample(row["image"], prompts=class_prompts(), label=label_of_caption(row["caption"]))
        (result,) = trace(tmp_path / "audit", [example], k=30)
        before = test_loss(tmp_path / "model.pt", example)
        for p in result.top:
            if p.id not in retrained:
                retrained[p.id] = fine_tune(tmp_path / f"without-{p.id}.pt", (p.id,))
        actual = [test_loss(retrained[p.id], example) - before for p in result.top]
        correlations.append(spearmanr([p.influence for p in result.top], actual).correlation)
    print("spearman per test example", [round(c, 3) for c in correlations])
    assert np.mean(correlations) > 0.5 and min(correlations) > 0.3


def test_several_examples_in_one_pass_equal_one_at_a_time(workspace, finished):
    rows = _test_rows(workspace)[:3]
    examples = [TraceExample(r["image"], prompts=class_prompts(), label=label_of_caption(r["caption"])) for r in rows]
    together = trace(finished, examples, k=5)
    for example, result in zip(examples, together):
        (alone,) = trace(finished, [example], k=5)
        assert [p.slot for p in result.top] == [p.slot for p in alone.top]
        assert [p.relative_is for p in result.top] == pytest.approx([p.relative_is for p in alone.top], rel=1e-12)
        assert [p.influence for p in result.top] == pytest.approx([p.influence for p in alone.top], rel=1e-12)


def test_the_trace_shows_the_models_prediction_and_marks_suspected_pairs(workspace, finished):
    from ecif_core.stages.finalize import final_ranking

    loaded, _, _ = _model(finished)
    rows = _test_rows(workspace)[:6]
    examples = [TraceExample(r["image"], prompts=class_prompts(), label=label_of_caption(r["caption"])) for r in rows]
    examples.append(TraceExample(rows[0]["image"], caption=rows[0]["caption"]))
    results = trace(finished, examples, k=len(audit.load_slots(finished)))  # every pair: all flags seen
    for example, result in zip(examples, results):
        texts = example.prompts or [example.caption] + [c for c in dict.fromkeys(alternative_captions(finished))
                                                        if c != example.caption]
        image = loaded.preprocess(load_image(example.image)).unsqueeze(0)
        with torch.no_grad():
            image_features, text_features, scale = loaded.model(image, loaded.tokenizer(texts))
            probabilities = (scale * image_features @ text_features.T)[0].softmax(dim=0)
        best = int(probabilities.argmax())
        assert (result.prediction.index, result.prediction.text) == (best, texts[best])
        assert result.prediction.probability == pytest.approx(float(probabilities[best]), rel=1e-4)
        assert result.prediction.correct == (best == (example.label if example.prompts else 0))
    ranking = final_ranking(finished)
    flagged = {int(s) for s, f in zip(ranking.slots, ranking.suspected) if f}
    assert flagged  # the workspace's shuffled captions are flagged
    assert {p.slot for p in results[0].top if p.suspected} == flagged
