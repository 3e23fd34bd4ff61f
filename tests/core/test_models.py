"""Local-only model loading, checkpoint wrappings, and the default choice of theta."""
import pytest
import torch

from ecif_core.errors import ConfigError, ModelSourceError
from ecif_core.models import load_model, select_theta
from tests.core.helpers import MICRO_CONFIG, micro_model


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module", "safetensors"])
def test_checkpoint_wrappings_load_the_same_weights(tmp_path, wrap):
    source = micro_model(seed=3).model.state_dict()
    path = tmp_path / ("model.safetensors" if wrap == "safetensors" else "model.pt")
    if wrap == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    else:
        payload = {"plain": source, "state_dict": {"state_dict": source, "epoch": 3},
                   "module": {f"module.{k}": v for k, v in source.items()}}[wrap]
        torch.save(payload, path)
    loaded = load_model(config=MICRO_CONFIG, checkpoint=path, seed=99).model.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source)


def test_hub_names_fail_at_once_naming_the_local_option():
    with pytest.raises(ModelSourceError, match="local model.checkpoint"):
        load_model(arch="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(ConfigError, match="model.arch"):
        load_model(arch="No-Such-Arch")
    bad = {**MICRO_CONFIG, "text_cfg": {**MICRO_CONFIG["text_cfg"], "hf_tokenizer_name": "bert-base-uncased"}}
    with pytest.raises(ModelSourceError, match="hf_tokenizer_name"):
        load_model(config=bad)


def test_mismatched_checkpoint_is_rejected(tmp_path):
    torch.save({"visual.proj": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="model.checkpoint"):
        load_model(config=MICRO_CONFIG, checkpoint=tmp_path / "bad.pt")


def test_builtin_architecture_builds_without_download():
    loaded = load_model(arch="RN50")  # config bundled with open_clip; random init
    assert loaded.config["embed_dim"] == 1024


def test_default_theta_is_last_two_blocks_plus_projections():
    config = {**MICRO_CONFIG, "vision_cfg": {**MICRO_CONFIG["vision_cfg"], "layers": 4}}
    names = [n for n, _ in select_theta(load_model(config=config).model)]
    assert "visual.proj" in names and "text_projection" in names
    assert {n.split(".")[3] for n in names if n.startswith("visual.transformer")} == {"2", "3"}
    assert {n.split(".")[2] for n in names if n.startswith("transformer.")} == {"0", "1"}
    assert all(n.endswith(("weight", "proj", "projection")) for n in names)
    with pytest.raises(ConfigError, match="options.theta"):
        select_theta(micro_model().model, ["nothing.*"])
    with pytest.raises(ConfigError, match="scalars"):
        select_theta(micro_model().model, ["logit_scale", "visual.proj"])
