"""LoRA fine-tunes: `ecif train --lora-rank` writes a peft adapter folder, peft itself reads it,
the audit takes theta over the adapter weights, and their per-pair gradients match autograd."""
import csv
import json

import pytest
import torch

from ecif_core import stages as audit
from ecif_core.errors import ConfigError
from ecif_core.influence.gradients import per_pair_gradients
from ecif_core.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_SIDECAR, add_lora
from ecif_core.models.factory import default_theta_patterns, load_model, restrict_grad_to, select_theta
from ecif_core.influence.projection import Projector, ProjectionSpec
from services.embedded import run_audit
from services.cli import main
from tests.core.helpers import MICRO_CONFIG, micro_model, random_batch
from tests.core.test_audit import OPTIONS as AUDIT_OPTIONS, workspace  # noqa: F401  (fixture)

OPTIONS = {k: v for k, v in AUDIT_OPTIONS.items() if k != "theta"}  # a LoRA audit's default theta: its adapters
from tests.core.test_gradients import _one_at_a_time


@pytest.fixture(scope="module")
def adapter(workspace):
    """A rank-2 LoRA fine-tune of the workspace's model, trained through the CLI."""
    out = workspace / "lora"
    code = main(["train", "--data", str(workspace / "data" / "train.jsonl"), "--model-config", str(workspace / "cfg.json"),
                 "--init", str(workspace / "model.pt"), "--lora-rank", "2", "--epochs", "2", "--batch-size", "8",
                 "--lr", "5e-3", "--weight-decay", "1e-2", "--seed", "1", "--out", str(out)])
    assert code == 0
    return out


def test_the_adapter_folder_is_peft_format_and_changes_only_the_adapter(workspace, adapter):
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    assert (adapter / ADAPTER_CONFIG).is_file() and (adapter / ADAPTER_WEIGHTS).is_file()
    config = LoraConfig.from_pretrained(str(adapter))
    assert config.r == 2 and set(config.target_modules) == {"c_fc", "c_proj"}
    weights = load_file(str(adapter / ADAPTER_WEIGHTS))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in weights.items())  # B starts at 0: it trained
    sidecar = json.loads((adapter / TRAINING_SIDECAR).read_text())
    assert sidecar["batch_size"] == 8 and sidecar["lora"] == {"rank": 2, "alpha": 2}

    # peft's own loader on a fresh copy of the base gives the same model as ours.
    base = load_model(config=MICRO_CONFIG, checkpoint=workspace / "model.pt")
    ours = load_model(config=MICRO_CONFIG, checkpoint=workspace / "model.pt", adapter=adapter)
    reference = add_lora(base.model, rank=2)
    set_peft_model_state_dict(reference, weights)
    images, tokens = random_batch(ours, 4, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ours.model.encode_image(images), reference.encode_image(images))
        torch.testing.assert_close(ours.model.encode_text(tokens), reference.encode_text(tokens))
    plain = load_model(config=MICRO_CONFIG, checkpoint=workspace / "model.pt")
    with torch.no_grad():
        assert not torch.allclose(plain.model.encode_image(images), ours.model.encode_image(images))
    base_state = torch.load(workspace / "model.pt", weights_only=True)
    for name, value in ours.model.state_dict().items():
        if ".base_layer." in name:
            assert torch.equal(value, base_state[name.replace(".base_layer.", ".")])


def test_theta_defaults_to_the_adapter_weights_and_their_gradients_match_autograd():
    loaded = micro_model(seed=3)
    model = add_lora(loaded.model, rank=2)
    with torch.no_grad():  # B = 0 at init: make it non-zero so both factors get gradients
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    theta = select_theta(model)
    assert default_theta_patterns(model) == ["*.lora_A.*", "*.lora_B.*"]
    assert len(theta) == 16 and all(".lora_" in n for n, _ in theta)
    restrict_grad_to(model, theta)
    params = [p for _, p in theta]
    projector = Projector.for_theta(theta, ProjectionSpec(None, None))
    images, tokens = random_batch(loaded, 5, seed=6)
    result = per_pair_gradients(model, params, projector, images, tokens, chunk=4)
    g_pos, g_neg, _, _ = _one_at_a_time(loaded, params, images, tokens, "exact")
    # float32 in another summation order (per-item path, plain attention): 1e-5; float64 below: 1e-9
    torch.testing.assert_close(result.pos, g_pos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.neg, g_neg, rtol=1e-4, atol=1e-5)
    model.double()
    result = per_pair_gradients(model, params, projector, images.double(), tokens, chunk=4)
    g_pos, g_neg, _, _ = _one_at_a_time(loaded, params, images.double(), tokens, "exact")
    torch.testing.assert_close(result.pos.double(), g_pos, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.neg.double(), g_neg, rtol=1e-9, atol=1e-9)


def test_a_lora_fine_tune_is_audited_over_its_adapter(workspace, adapter, tmp_path):
    manifest = {"model": {"config": "cfg.json", "checkpoint": "model.pt", "adapter": "lora"},
                "train": "data/train.jsonl", "validation": "data/val.jsonl", "options": OPTIONS}
    (workspace / "manifest-lora.json").write_text(json.dumps(manifest))
    ranked = run_audit(workspace / "manifest-lora.json", tmp_path / "lora-audit")
    plan = audit.load_plan(tmp_path / "lora-audit")
    assert plan.manifest["model"]["adapter"] == str(adapter) and plan.manifest["options"]["batch_size"] == 8
    # 16 LoRA matrices (rank 2) of the micro model, projected to at most 4 x 4 each
    assert len(plan.blocks) == 16 and plan.dim == sum(b["stop"] - b["start"] for b in plan.blocks)
    with ranked.open() as handle:
        rows = list(csv.DictReader(handle))
    values = [float(r["self_influence"]) for r in rows]
    assert len(rows) == 64 and all(map(lambda v: v == v, values)) and len(set(values)) == 64


def test_a_lora_audit_keeps_no_tower_features_even_with_the_projections_as_theta(workspace, adapter, tmp_path):
    """Its edit changes the adapters only, so features no edit reads are not stored (their bytes saved);
    the same theta on the base checkpoint keeps them."""
    from ecif_core.data.manifest import load_manifest
    from ecif_core.stages import open_store
    from ecif_core.stages.prepare import prepare

    for adapter_folder, keeps in (("lora", False), (None, True)):
        model = {"config": "cfg.json", "checkpoint": "model.pt", **({"adapter": adapter_folder} if adapter_folder else {})}
        manifest = {"model": model, "train": "data/train.jsonl",
                    "options": {**OPTIONS, "theta": ["visual.proj", "text_projection"]}}
        out = tmp_path / f"audit-{keeps}"
        prepare(load_manifest(manifest, base_dir=workspace), out)
        assert open_store(out).keeps_features() is keeps


def test_a_folder_that_is_not_an_adapter_names_the_field(workspace):
    manifest = {"model": {"config": "cfg.json", "checkpoint": "model.pt", "adapter": "data"},
                "train": "data/train.jsonl"}
    from ecif_core.data.manifest import load_manifest

    with pytest.raises(ConfigError, match="not a peft adapter folder") as error:
        load_manifest(manifest, base_dir=workspace)
    assert error.value.field == "model.adapter"


def test_lora_training_needs_a_base_checkpoint(workspace, tmp_path):
    from ecif_core.train import TrainConfig, train

    with pytest.raises(ConfigError, match="base checkpoint") as error:
        train(workspace / "data" / "train.jsonl", MICRO_CONFIG, tmp_path / "x", TrainConfig(lora_rank=2))
    assert error.value.field == "lora_rank"


def test_an_edit_of_a_lora_audit_writes_an_adapter_that_peft_and_the_audit_load(workspace, adapter, tmp_path):
    from safetensors.torch import load_file

    from ecif_core.edit.settings import EditSettings
    from ecif_core.edit.from_audit import edit_audit

    manifest = {"model": {"config": "cfg.json", "checkpoint": "model.pt", "adapter": "lora"},
                "train": "data/train.jsonl", "validation": "data/val.jsonl", "options": OPTIONS}
    (workspace / "manifest-lora-edit.json").write_text(json.dumps(manifest))
    run_audit(workspace / "manifest-lora-edit.json", tmp_path / "audit")
    record = edit_audit(tmp_path / "audit", "top:6:self_influence", tmp_path / "edited", EditSettings(max_iterations=5))
    folder = tmp_path / "edited" / "adapter"
    assert record["checkpoint"]["adapter"] == str(folder)
    assert all(".lora_" in name for name in record["method"]["theta"])
    before, after = load_file(str(adapter / ADAPTER_WEIGHTS)), load_file(str(folder / ADAPTER_WEIGHTS))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    sidecar = json.loads((folder / TRAINING_SIDECAR).read_text())
    removed = (tmp_path / "edited" / "removed_ids.txt").read_text().split()
    assert len(removed) == 6 and set(removed) <= set(sidecar["excluded"])
    # the edited adapter on the same base is what the record's validation loss was measured on
    reloaded = load_model(config=MICRO_CONFIG, checkpoint=workspace / "model.pt", adapter=folder)
    from ecif_core.edit.validation_check import validation_batches, validation_loss
    from ecif_core.data.manifest import Manifest

    plan_manifest = Manifest.from_json(audit.load_plan(tmp_path / "audit").manifest)
    val = validation_batches(tmp_path / "audit", plan_manifest, reloaded.preprocess, reloaded.tokenizer)
    assert validation_loss(reloaded.model, val)[0] == pytest.approx(record["validation"]["loss_after"], rel=1e-5)
    # a theta outside the adapters would be edited and then lost in the adapter folder: refused first
    from ecif_core.errors import ConfigError
    from ecif_core.models.check import check_theta

    for patterns in (["visual.proj", "text_projection"], ["blocks:1"]):
        with pytest.raises(ConfigError, match="adapter weights"):
            edit_audit(tmp_path / "audit", "top:6:self_influence", tmp_path / "refused", theta=patterns)
        with pytest.raises(ConfigError, match="adapter weights"):
            check_theta(plan_manifest, patterns)
    assert not (tmp_path / "refused").exists()
