"""Local-only model loading through open_clip's factory, checkpoint wrappings and
conversions, and the default choice of theta."""
import json
import shutil

from open_clip.factory import load_state_dict
import pytest
import torch
import torch.nn.functional as F

from ecif_core.errors import ConfigError, ModelSourceError
from ecif_core.models.factory import build_model, check_checkpoint, checkpoint_shapes, load_model, select_theta
from services.embedded import run_audit
from tests.core.helpers import MICRO_CONFIG, micro_model, random_batch
from tests.core.test_audit import _rows, finished, workspace  # noqa: F401  (fixtures)


def _open_clip_training_checkpoint(model: torch.nn.Module) -> dict:
    """What open_clip's training script saves (open_clip_train/main.py) from a model wrapped in
    DistributedDataParallel: every key "module."-prefixed, beside the epoch, run name and optimizer."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # the optimizer's state holds tensors too (exp_avg, exp_avg_sq, step)
    return {"epoch": 2, "name": "2026_01_01-ViT-micro-lr_0.001-b_8-j_1-p_amp", "state_dict": state,
            "optimizer": optimizer.state_dict()}


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module", "safetensors", "open_clip_training"])
def test_checkpoint_wrappings_load_the_same_weights(tmp_path, wrap):
    source = micro_model(seed=3).model.state_dict()
    path = tmp_path / ("model.safetensors" if wrap == "safetensors" else "model.pt")
    if wrap == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    else:
        payload = {"plain": source, "state_dict": {"state_dict": source, "epoch": 3},
                   "module": {f"module.{k}": v for k, v in source.items()},
                   "open_clip_training": _open_clip_training_checkpoint(micro_model(seed=3).model)}[wrap]
        torch.save(payload, path)
    loaded = load_model(config=MICRO_CONFIG, checkpoint=path, seed=99).model.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    # the header check reads the keys the way open_clip's own loader unwraps them
    assert set(checkpoint_shapes(path)) == set(load_state_dict(str(path))) == set(source)


def _manifest_for(workspace, checkpoint: str):
    """The workspace's manifest with another checkpoint, which keeps the training sidecar."""
    shutil.copy(workspace / "model.pt.json", workspace / f"{checkpoint}.json")
    manifest = {**json.loads((workspace / "manifest.json").read_text()),
                "model": {"config": "cfg.json", "checkpoint": checkpoint}}
    (workspace / f"manifest-{checkpoint}.json").write_text(json.dumps(manifest))
    return workspace / f"manifest-{checkpoint}.json"


def test_an_open_clip_training_checkpoint_embeds_and_audits_like_the_plain_state_dict(workspace, finished, tmp_path):
    """{"epoch", "name", "state_dict" with "module." keys, "optimizer"}: the same embeddings as the
    plain state dict it was saved from, and the same audit, to the byte."""
    plain = load_model(config=MICRO_CONFIG, checkpoint=workspace / "model.pt")
    torch.save(_open_clip_training_checkpoint(load_model(config=MICRO_CONFIG, checkpoint=workspace / "model.pt").model),
               workspace / "openclip.pt")
    ours = load_model(config=MICRO_CONFIG, checkpoint=workspace / "openclip.pt")
    images, tokens = random_batch(plain, 6)
    with torch.no_grad():
        assert torch.equal(ours.model.encode_image(images), plain.model.encode_image(images))
        assert torch.equal(ours.model.encode_text(tokens), plain.model.encode_text(tokens))
    ranked = run_audit(_manifest_for(workspace, "openclip.pt"), tmp_path / "audit")
    assert ranked.read_text() == (finished / "ranked.csv").read_text()


def _grid_config(image_size: int) -> dict:
    return {**MICRO_CONFIG, "vision_cfg": {**MICRO_CONFIG["vision_cfg"], "image_size": image_size}}


def test_a_position_embedding_of_another_grid_is_resized_by_open_clips_loader(workspace, tmp_path):
    """Saved from a model at image_size 24 (a 3x3 grid of 8-pixel patches), loaded into the
    manifest's config at 32 (4x4): open_clip's loader resizes the grid (bicubic), and the
    header check at submit agrees; a plain load_state_dict would have refused the file."""
    small = build_model(_grid_config(24), seed=5)
    saved = small.state_dict()
    assert saved["visual.positional_embedding"].shape == (1 + 3 * 3, 16)
    torch.save(saved, tmp_path / "grid24.pt")
    with pytest.raises(RuntimeError, match="size mismatch for visual.positional_embedding"):
        build_model(_grid_config(32)).load_state_dict(saved)  # what a loader without the resize does
    loaded = load_model(config=_grid_config(32), checkpoint=tmp_path / "grid24.pt").model
    resized = loaded.visual.positional_embedding.detach()
    assert resized.shape == (1 + 4 * 4, 16)
    grid = saved["visual.positional_embedding"][1:].reshape(1, 3, 3, 16).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(resized[1:], expected.permute(0, 2, 3, 1).reshape(16, 16))
    assert torch.equal(resized[0], saved["visual.positional_embedding"][0])  # the class token as it was
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items() if k != "visual.positional_embedding")
    with torch.device("meta"):  # the submit-time check: shapes only, no weight read
        check_checkpoint(build_model(_grid_config(32)), checkpoint_shapes(tmp_path / "grid24.pt"))
        torch.save({**saved, "visual.positional_embedding": torch.zeros(10, 12)}, tmp_path / "width12.pt")
        with pytest.raises(ConfigError, match="visual.positional_embedding"):
            check_checkpoint(build_model(_grid_config(32)), checkpoint_shapes(tmp_path / "width12.pt"))
    with pytest.raises(ConfigError, match="model.checkpoint"):
        load_model(config=_grid_config(32), checkpoint=tmp_path / "width12.pt")


def test_a_checkpoint_that_needs_the_resize_audits(workspace, tmp_path):
    """The trained micro model (image_size 16: a 2x2 grid) saved with its position embedding on
    a 3x3 grid (as if trained at 24): the audit loads it through the resize and scores every pair."""
    state = torch.load(workspace / "model.pt", weights_only=True)
    grid = state["visual.positional_embedding"][1:].reshape(1, 2, 2, 16).permute(0, 3, 1, 2)
    wider = F.interpolate(grid, size=(3, 3), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(9, 16)
    state["visual.positional_embedding"] = torch.cat([state["visual.positional_embedding"][:1], wider])
    torch.save(state, workspace / "grid3x3.pt")
    rows = _rows(run_audit(_manifest_for(workspace, "grid3x3.pt"), tmp_path / "audit"))
    assert len(rows) == 64 and all(r["self_influence"] and r["influence"] for r in rows)


def test_hub_names_fail_at_once_naming_the_local_option():
    with pytest.raises(ModelSourceError, match="local model.checkpoint"):
        load_model(arch="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(ConfigError, match="model.arch"):
        load_model(arch="No-Such-Arch")
    with pytest.raises(ConfigError, match="model.config") as error:  # open_clip's own local-folder scheme
        load_model(arch="local-dir:/etc")
    assert error.value.field == "model.arch"
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


def test_default_theta_is_the_projections_and_blocks_n_adds_the_last_n_blocks():
    config = {**MICRO_CONFIG, "vision_cfg": {**MICRO_CONFIG["vision_cfg"], "layers": 4}}
    model = load_model(config=config).model
    assert [n for n, _ in select_theta(model)] == ["text_projection", "visual.proj"]
    names = [n for n, _ in select_theta(model, ["blocks:2"])]
    assert "visual.proj" in names and "text_projection" in names
    assert {n.split(".")[3] for n in names if n.startswith("visual.transformer")} == {"2", "3"}
    assert {n.split(".")[2] for n in names if n.startswith("transformer.")} == {"0", "1"}
    assert all(n.endswith(("weight", "proj", "projection")) for n in names)
    one = [n for n, _ in select_theta(model, ["blocks:1", "visual.conv1.weight"])]
    assert {n.split(".")[3] for n in one if n.startswith("visual.transformer")} == {"3"} and "visual.conv1.weight" in one
    for bad in ("blocks:0", "blocks:two", "blocks:"):
        with pytest.raises(ConfigError, match="blocks:N"):
            select_theta(model, [bad])
    with pytest.raises(ConfigError, match="options.theta"):
        select_theta(micro_model().model, ["nothing.*"])
    with pytest.raises(ConfigError, match="scalars"):
        select_theta(micro_model().model, ["logit_scale", "visual.proj"])


def test_models_with_one_text_tower_share_one_parsed_tokenizer_and_another_gets_its_own():
    """Building open_clip's tokenizer parses its vocabulary (a third of an edit's time): built once per text
    tower config in a process; a tower with another context length gets its own (it pads to that length)."""
    import copy

    first, second = load_model(config=MICRO_CONFIG, seed=0), load_model(config=MICRO_CONFIG, seed=1)
    longer = copy.deepcopy(MICRO_CONFIG)
    longer["text_cfg"]["context_length"] = 12
    other = load_model(config=longer, seed=0)
    assert first.tokenizer.bpe_ranks is second.tokenizer.bpe_ranks          # the parsed vocabulary, shared
    assert first.tokenizer.cache is not second.tokenizer.cache              # each model's own word memo
    assert other.tokenizer.bpe_ranks is not first.tokenizer.bpe_ranks
    assert first.tokenizer(["a cat"]).shape == (1, 8) and other.tokenizer(["a cat"]).shape == (1, 12)
