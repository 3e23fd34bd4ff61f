"""bench.quality.finetune: the corruptions against their definitions, and the `--quick` run end to end (truth
read only by the scoring code, a finished cell reused, scores oriented by SUSPICION_SIGN)."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.quality.finetune import cells, corruptions, evaluate, runner, scores
from bench.quality.finetune.generator import TEMPLATES, VOCAB_A, VOCAB_B, caption_of, sample_items
from bench.quality.finetune.settings import quick
from ecif_core.edit import removal

# ---------------------------------------------------------------- corruptions against their definitions


def _words(caption: str, vocab) -> tuple[set[str], set[str]]:
    tokens = set(caption.split())
    return tokens & set(vocab.shapes), tokens & set(vocab.colour_words)


@pytest.mark.parametrize("vocab", [VOCAB_A, VOCAB_B])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3])
def test_each_corruption_changes_captions_as_defined(vocab, fraction: float) -> None:
    items = sample_items(vocab, 400, np.random.default_rng(3))
    clean = [caption_of(it) for it in items]
    for it, caption in zip(items, clean):  # every clean caption names its own shape and colour, once
        assert _words(caption, vocab) == ({it.shape}, {it.colour})
    for kind in corruptions.CORRUPTIONS:
        result = corruptions.corrupt(items, vocab, kind, fraction, np.random.default_rng(7))
        bad = np.flatnonzero(result.corrupted)
        assert len(bad) == round(fraction * len(items))
        assert all(result.captions[i] == clean[i] for i in np.flatnonzero(~result.corrupted))
        for i in bad:
            assert result.captions[i] != clean[i]
            shapes, colours = _words(result.captions[i], vocab)
            it = items[i]
            if kind == "shuffle":  # the clean caption of another pair of another class
                j = int(result.details[i].split()[-1])
                assert result.captions[i] == clean[j] and items[j].label != it.label
            elif kind == "attribute":  # exactly one word of the same vocabulary replaced, same template
                assert (shapes == {it.shape}) != (colours == {it.colour})
                assert len(shapes) == 1 and len(colours) == 1
                swapped = result.captions[i].split()
                assert sum(a != b for a, b in zip(swapped, clean[i].split())) == 1
            else:  # systematic: the image's shape renamed by the one mapping, colour kept
                assert colours == {it.colour} and shapes == {result.mapping[it.shape]}
        if kind == "systematic":
            assert set(result.mapping).isdisjoint(result.mapping.values())
            assert {items[i].shape for i in bad} <= set(result.mapping)


def test_truth_file_records_clean_and_written_captions(tmp_path: Path) -> None:
    items = sample_items(VOCAB_A, 40, np.random.default_rng(0))
    result = corruptions.corrupt(items, VOCAB_A, "attribute", 0.25, np.random.default_rng(1))
    ids = [f"p{i}" for i in range(40)]
    path = corruptions.write_truth(tmp_path / "truth.csv", ids, items, result, "attribute")
    rows = list(csv.DictReader(path.open()))
    assert [r["id"] for r in rows] == ids
    assert sum(r["corrupted"] == "1" for r in rows) == 10
    assert all((r["corrupted"] == "1") == (r["caption"] != r["clean_caption"]) for r in rows)
    assert evaluate.truth_labels(path, ids[::-1]).tolist() == [int(r["corrupted"]) for r in rows][::-1]
    assert len(TEMPLATES) >= 3


# ---------------------------------------------------------------- orientation


def test_ranked_columns_follow_suspicion_sign_and_skip_unknown_or_empty(tmp_path: Path) -> None:
    path = tmp_path / "ranked.csv"
    path.write_text("rank,id,influence,self_influence,clip_score,extra,influence_pos\n"
                    "1,a,-2.0,4.0,0.1,9,\n2,b,0.5,1.0,0.9,9,\n")
    ids, columns = scores.ranked_columns(path)
    assert ids == ["a", "b"]
    assert set(columns) == {"ranked:rank", "ranked:influence", "ranked:self_influence", "ranked:clip_score"}
    for name, values in columns.items():  # pair a is the more suspicious one by every column's meaning
        assert values[0] > values[1], name


# ---------------------------------------------------------------- the quick run end to end


class _TruthReads:
    """Records, for every read of a truth.csv, the modules on the stack (an audit hook: sees every open)."""

    active = False
    reads: list[set[str]] = []
    installed = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if not cls.active or event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if not os.fsdecode(args[0]).endswith("truth.csv"):
            return
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        reading = ("r" in mode or "+" in mode) if isinstance(mode, str) else (flags & os.O_ACCMODE) != os.O_WRONLY
        if reading:
            frame, modules = sys._getframe(1), set()
            while frame is not None:
                modules.add(frame.f_globals.get("__name__", ""))
                frame = frame.f_back
            cls.reads.append(modules)


def test_quick_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _TruthReads.installed:
        sys.addaudithook(_TruthReads.hook)
        _TruthReads.installed = True
    settings = quick(["same_domain"])
    out = tmp_path / "out"
    _TruthReads.reads, _TruthReads.active = [], True
    try:
        results = runner.run(settings, out, workers=1, command="test", log=lambda _: None)
    finally:
        _TruthReads.active = False

    # The truth was read, and only by the scoring module, after every score was saved.
    assert _TruthReads.reads, "the evaluation never read the truth"
    assert all("bench.quality.finetune.evaluate" in modules for modules in _TruthReads.reads)
    assert results["cells_finished"] == results["cells_total"] == 1 and not results["errors"]
    (spec,) = cells.cell_specs(settings)
    record = json.loads(cells.result_path(out, spec).read_text())
    folder = out / "cells" / spec.name
    assert (folder / "audit" / "ranked.csv").is_file() and (folder / "scores.npz").is_file()
    assert not (folder / "data" / "truth.csv").exists()  # the audit's data folder holds no truth

    # The written pair file carries the corrupted captions; attribute corruption changed one word each.
    truth = {r["id"]: r for r in csv.DictReader((folder / "truth.csv").open())}
    rows = [json.loads(line) for line in (folder / "data" / "train.jsonl").read_text().splitlines()]
    assert sum(t["corrupted"] == "1" for t in truth.values()) == record["n_corrupted"] == round(0.2 * len(rows))
    for row in rows:
        t = truth[row["id"]]
        assert row["caption"] == t["caption"]
        changed = sum(a != b for a, b in zip(row["caption"].split(), t["clean_caption"].split()))
        assert changed == (1 if t["corrupted"] == "1" else 0)

    # Every product column the sign table knows, every baseline; metrics in range; costs recorded.
    names = set(record["metrics"])
    assert {"ranked:self_influence", "ranked:clip_score", "ranked:rank", "baseline:clip_score_audited",
            "baseline:clip_score_reference", "baseline:neg_clip_loss_reference", "baseline:self_tracin",
            "baseline:own_loss"} <= names
    assert "baseline:clip_score_crossfit" not in names  # no cross-fitting in --quick
    assert all(0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["ap"] <= 1.0 for m in record["metrics"].values())
    assert record["timings"]["finetune"] > 0 and record["cost_in_finetunes"]["finetune"] == pytest.approx(1.0)
    assert 0.0 <= record["retrieval"]["finetuned"]["top1"] <= 1.0
    assert "Test seeds" in (out / "RESULTS.md").read_text()
    # The benchmark's own CLIPScore of the audited model is the audit's clip_score column (same model).
    assert record["metrics"]["baseline:clip_score_audited"]["auroc"] == pytest.approx(
        record["metrics"]["ranked:clip_score"]["auroc"], abs=1e-6)

    # Orientation: flipping one column's sign in SUSPICION_SIGN turns its AUROC into 1 - AUROC.
    ranked = folder / "audit" / "ranked.csv"
    flipped = {**removal.SUSPICION_SIGN, "self_influence": -removal.SUSPICION_SIGN["self_influence"]}
    ids, normal = scores.ranked_columns(ranked)
    _, turned = scores.ranked_columns(ranked, flipped)
    labels = evaluate.truth_labels(folder / "truth.csv", ids)
    a = evaluate.detection({"s": normal["ranked:self_influence"]}, labels, [10])["s"]["auroc"]
    b = evaluate.detection({"s": turned["ranked:self_influence"]}, labels, [10])["s"]["auroc"]
    assert a == pytest.approx(record["metrics"]["ranked:self_influence"]["auroc"])
    assert b == pytest.approx(1.0 - a)

    # Resume: a second run reuses the finished cell (nothing is trained or audited again) and the base.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(cells, "train", refuse)
    monkeypatch.setattr(cells, "run_audit", refuse)
    monkeypatch.setattr("bench.quality.finetune.base.train", refuse)
    again = runner.run(settings, out, workers=1, command="test", log=lambda _: None)
    assert again["cells_finished"] == 1 and not again["errors"]
    assert again["test"] == results["test"]
    # A changed setting makes the cell stale (its cache key differs), so it would be recomputed.
    assert cells.cached_result(quick(["same_domain"]), out, spec) is not None
    changed = quick(["same_domain"])
    changed.epochs = {**changed.epochs, "same_domain": changed.epochs["same_domain"] + 1}
    assert cells.cached_result(changed, out, spec) is None
