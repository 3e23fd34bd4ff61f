"""The towers' features the audit keeps (theta = the projections) and the edit that reads them instead of
decoding the training images: the same numbers as features computed from the images, on every path of
the gradients stage."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ecif_core import stages as audit
from ecif_core.data import store as keys
from ecif_core.data.manifest import load_manifest
from ecif_core.datasets.digits import build_digits
from ecif_core.edit import from_audit, validation_check
from ecif_core.edit.caches import tower_features
from ecif_core.edit.settings import EditSettings
from ecif_core.models.factory import ready_model
from ecif_core.models.features import projection_inputs
from ecif_core.stages.gradients import shard_gradients
from ecif_core.stages.prepare import prepare
from ecif_core.train import TrainConfig, train
from services.embedded import run_audit
from tests.core.helpers import MICRO_CONFIG

OPTIONS = {"projection": {"k_in": 4, "k_out": 4}, "shard_batches": 2, "batch_size": 8}  # theta: the default


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Digits (40 train pairs, 20% shuffled), a micro CLIP trained 2 epochs, a manifest with the default theta."""
    root = tmp_path_factory.mktemp("features")
    build_digits(root / "data", fraction=0.2, seed=4, n_train=40, n_val=16, n_test=4)
    (root / "cfg.json").write_text(json.dumps(MICRO_CONFIG))
    train(root / "data/train.jsonl", root / "cfg.json", root / "model.pt",
          TrainConfig(epochs=2, batch_size=8, lr=1e-3, weight_decay=1e-2, seed=4))
    _manifest(root, "manifest.json", OPTIONS)
    return root


def _manifest(root: Path, name: str, options: dict) -> Path:
    (root / name).write_text(json.dumps({"model": {"config": "cfg.json", "checkpoint": "model.pt"},
                                         "train": "data/train.jsonl", "validation": "data/val.jsonl",
                                         "options": options}))
    return root / name


@pytest.fixture(scope="module")
def finished(workspace) -> Path:
    out = workspace / "run"
    run_audit(workspace / "manifest.json", out)
    return out


def _features_from_the_images(audit_dir: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image, text) features of each training batch, computed afresh from the decoded images."""
    manifest = audit.manifest_of(audit.load_plan(audit_dir))
    ready = ready_model(manifest.model_arch, str(audit_dir.parent / "cfg.json"), str(audit_dir.parent / "model.pt"),
                        theta=manifest.options.theta)
    batches = from_audit.training_batches_of(audit_dir, set(), ready.loaded.preprocess, ready.loaded.tokenizer,
                                             stored=False)
    return tower_features(ready.model, batches)


def _kept_features(audit_dir: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = from_audit.training_batches_of(audit_dir, set(), None, None)
    assert all(b.stored_features is not None for b in batches)
    return [b.stored_features() for b in batches]


def test_the_audit_keeps_each_pairs_tower_features_in_its_slot(finished):
    """Each batch's kept (image, text) rows equal the towers' outputs below the projections, recomputed
    from its images: the right slots, towers and order (a swap of the towers or of two rows fails)."""
    assert audit.open_store(finished).keeps_features()
    want, got = _features_from_the_images(finished), _kept_features(finished)
    assert len(got) == len(want) == audit.load_plan(finished).n_batches
    for (image, text), (kept_image, kept_text) in zip(want, got):
        assert kept_image.shape == image.shape and kept_text.shape == text.shape
        torch.testing.assert_close(kept_image, image, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kept_text, text, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{"memory_limit": "3GB"}, {"partners": 2}], ids=["sliced", "partners"])
def test_the_sliced_and_partner_paths_keep_the_same_features(workspace, finished, tmp_path, monkeypatch, options):
    """The head path in slices (a memory limit) concatenates the slices' recorded inputs; the top-m path
    records none and computes them: both keep what the plain audit keeps."""
    from ecif_core.influence import memory

    monkeypatch.setattr(memory, "plan_chunks", lambda limit, *rest: (3, 4))  # slices of 3 pairs (batch of 8)
    out = tmp_path / "audit"
    prepare(load_manifest(_manifest(workspace, "m-path.json", {**OPTIONS, **options})), out)
    for shard in range(audit.load_plan(out).shards):
        shard_gradients(out, shard)
    for (image, text), (want_image, want_text) in zip(_kept_features(out), _kept_features(finished)):
        torch.testing.assert_close(image, want_image, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text, want_text, rtol=1e-5, atol=1e-6)


def test_an_audit_with_another_theta_keeps_no_features(workspace, tmp_path):
    """Below the projections the features no longer hold what theta changes: nothing is kept (no bytes)."""
    out = tmp_path / "audit"
    prepare(load_manifest(_manifest(workspace, "m-blocks.json", {**OPTIONS, "theta": ["blocks:1"]})), out)
    assert not audit.open_store(out).keeps_features()


def test_the_audit_keeps_the_validation_features_in_the_edits_partition(finished):
    """The validation stage keeps its pairs' features batch by batch, in the partition the edit's
    validation check decodes (validation_check.validation_batches): same batches, same rows."""
    manifest = audit.manifest_of(audit.load_plan(finished))
    ready = ready_model(manifest.model_arch, str(finished.parent / "cfg.json"), str(finished.parent / "model.pt"))
    decoded = validation_check.validation_batches(finished, manifest, ready.loaded.preprocess, ready.loaded.tokenizer)
    kept = validation_check.kept_validation_features(finished)
    assert kept is not None and [len(i) for i, _ in kept] == [len(images) for images, _ in decoded]
    for (image, text), (images, tokens) in zip(kept, decoded):
        want_image, want_text = projection_inputs(ready.model, images, tokens)
        torch.testing.assert_close(image, want_image, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text, want_text, rtol=1e-5, atol=1e-6)


def test_a_shard_written_without_features_sends_the_edit_back_to_the_images(finished, tmp_path):
    """A shard whose features chunk is missing (written by a worker of an earlier release, say) is never read
    as zeros: the edit decodes the images instead."""
    copy = tmp_path / "audit"
    shutil.copytree(finished, copy)
    store = audit.open_store(copy)
    assert store.features_complete()
    rows = audit.load_plan(copy).shard_rows
    image, text = store.features(0, rows)
    store.write_features(0, np.zeros_like(image), np.zeros_like(text))  # a chunk of fill values is not stored
    assert store.keeps_features() and not audit.open_store(copy).features_complete()
    assert all(b.stored_features is None for b in from_audit.training_batches_of(copy, set(), None, None))


def test_the_edit_reads_the_kept_features_and_decodes_no_image(finished, tmp_path, monkeypatch):
    """With the features kept, the edit opens no image (training or validation), and its model and
    validation check equal those of the edit that decodes them (an audit made before features were kept)."""
    opened: list[str] = []
    load_batch = from_audit.load_batch

    def counting(pairs, *args, **kwargs):
        opened.extend(p.id for p in pairs)
        return load_batch(pairs, *args, **kwargs)

    monkeypatch.setattr(from_audit, "load_batch", counting)             # training batches
    monkeypatch.setattr(validation_check, "load_batch", counting)       # validation batches
    settings = EditSettings(replay_epochs=2, replay_lr=1e-3)
    kept = from_audit.edit_audit(finished, "top:6:self_influence", tmp_path / "kept", settings)
    training_ids = {pair.id for _, pair in audit.load_slots(finished)}
    assert kept["method"]["features_from"] == "audit store"
    assert opened == []

    old = tmp_path / "old"
    shutil.copytree(finished, old)
    store = audit.open_store(old)
    del store.root[keys.FEATURES], store.root[keys.VALIDATION_FEATURES]  # an audit made before this release
    opened.clear()
    recomputed = from_audit.edit_audit(old, "top:6:self_influence", tmp_path / "recomputed", settings)
    assert recomputed["method"]["features_from"] == "images" and set(opened) > training_ids
    for key in ("parameter_change_norm", "removal_gradient_norm"):
        assert kept["result"][key] == pytest.approx(recomputed["result"][key], rel=1e-4)
    for key in ("loss_before", "loss_after", "predicted_change"):
        assert kept["validation"][key] == pytest.approx(recomputed["validation"][key], rel=1e-4)
    assert kept["result"]["parameter_change_norm"] > 0
