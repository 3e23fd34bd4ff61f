"""Build open_clip models from local files only, and choose theta (the influence parameters).

One entry point, `load_model`, mirrors open_clip's factory but never touches a model hub:
an architecture name resolves to open_clip's bundled JSON config, a config file is read as
is, and weights come only from a local checkpoint path.
"""
from __future__ import annotations

import copy
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError, ModelSourceError, read_json_file

HUB_PREFIXES = ("hf-hub:", "hf://", "http://", "https://")


@dataclass
class LoadedModel:
    """An open_clip model with the tokenizer and eval transform that belong to it."""

    model: torch.nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    config: dict[str, Any]
    arch: str | None = None


def resolve_model_config(arch: str | None = None, config: str | Path | dict | None = None) -> dict[str, Any]:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) from a name or a JSON file."""
    import open_clip

    if config is not None:
        if isinstance(config, dict):
            cfg = copy.deepcopy(config)
        else:
            cfg = read_json_file(config, "model.config")
            if not isinstance(cfg, dict):
                raise ConfigError("model.config", "must be a JSON object")
        cfg = cfg.get("model_cfg", cfg)  # open_clip's open_clip_config.json wraps it
    elif arch is not None:
        if arch.startswith(HUB_PREFIXES):
            raise ModelSourceError(
                "model.arch", f"{arch!r} needs a download; give an architecture name or model.config "
                "plus a local model.checkpoint")
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ConfigError("model.arch", f"unknown open_clip architecture {arch!r}; "
                              "use model.config for a custom one")
        cfg = copy.deepcopy(cfg)
    else:
        raise ConfigError("model", "give model.arch or model.config")
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in cfg]
    if missing:
        raise ConfigError("model.config", f"missing keys {missing} (open_clip format)")
    _reject_hub_towers(cfg)
    return cfg


def _reject_hub_towers(cfg: dict[str, Any]) -> None:
    """timm / Hugging Face towers and tokenizers would fetch weights or vocabularies."""
    if cfg["vision_cfg"].get("timm_model_name") and cfg["vision_cfg"].get("timm_model_pretrained"):
        raise ModelSourceError("model.config.vision_cfg", "timm_model_pretrained needs a download; "
                               "set it false and give a local model.checkpoint")
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if cfg["text_cfg"].get(key):
            raise ModelSourceError(f"model.config.text_cfg.{key}", "Hugging Face text towers and "
                                   "tokenizers need a hub download; use open_clip's built-in text tower")


def build_model(cfg: dict[str, Any], seed: int | None = None) -> torch.nn.Module:
    """An open_clip CLIP with random init (seeded when `seed` is given)."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(cfg)
    cfg.pop("preprocess_cfg", None)
    custom_text = cfg.pop("custom_text", False)
    if seed is not None:
        torch.manual_seed(seed)
    model_class = CustomTextCLIP if custom_text else CLIP
    return model_class(**cfg)


def read_state_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict, unwrapped from {"state_dict": ...} / {"model": ...} and "module.".

    `mmap`: map the file instead of reading it (tensors are read only when touched), so the
    keys and shapes can be checked without loading the weights. A file that is not a state
    dict is a ConfigError in our words: torch's own text advises `weights_only=False`, which
    would run the file's pickled code, and is never shown.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("model.checkpoint", f"file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = _torch_load(path, mmap)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling, zip and format errors of a corrupt or hostile file
        raise ConfigError("model.checkpoint", f"{path.name} cannot be read as a state dict (a PyTorch "
                          f"checkpoint of tensors, or .safetensors): {type(exc).__name__}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError("model.checkpoint", f"{path} does not hold a state dict")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def _torch_load(path: Path, mmap: bool) -> object:
    """torch.load with weights_only (never arbitrary pickled code); a file in torch's legacy
    (non-zip) format cannot be mapped and is read instead."""
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "zipfile" not in str(exc) and "mmap" not in str(exc):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a checkpoint, from its header (safetensors) or a mapped file
    (PyTorch): the weights themselves are not read."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt", device="cpu") as handle:
                shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except Exception as exc:  # noqa: BLE001 - a corrupt header
            raise ConfigError("model.checkpoint", f"{path.name} cannot be read as .safetensors: "
                              f"{type(exc).__name__}") from None
        return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in shapes.items()}
    state = read_state_dict(path, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_checkpoint(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint's keys and shapes match the model's (the check load_model's strict load makes)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes and not k.endswith("attn_mask")]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        raise ConfigError("model.checkpoint", f"does not match the model config: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    wrong = [f"{k} {shapes[k]} (model: {expected[k]})" for k in shapes if shapes[k] != expected[k]]
    if wrong:
        raise ConfigError("model.checkpoint", f"does not match the model config: shapes {wrong[:3]}")


def load_model(arch: str | None = None, config: str | Path | dict | None = None,
               checkpoint: str | Path | None = None, seed: int | None = None,
               adapter: str | Path | None = None) -> LoadedModel:
    """Model + tokenizer + eval preprocess from local files (the single entry point);
    `adapter`: a peft LoRA folder applied on top of the checkpoint."""
    import open_clip

    cfg = resolve_model_config(arch, config)
    model = build_model(cfg, seed=seed)
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ConfigError("model.checkpoint", f"does not match the model config: {exc}") from exc
        missing = [k for k in result.missing_keys if not k.endswith("attn_mask")]
        if missing or result.unexpected_keys:
            raise ConfigError("model.checkpoint", f"does not match the model config: missing "
                              f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if adapter is not None:
        from .lora import load_adapter

        model = load_adapter(model, adapter)
    model.eval()
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
    image_size = cfg["vision_cfg"].get("image_size", 224)
    pp = cfg.get("preprocess_cfg", {})
    preprocess = open_clip.image_transform(image_size, is_train=False, mean=pp.get("mean"), std=pp.get("std"),
                                           resize_mode=pp.get("resize_mode"),
                                           interpolation=pp.get("interpolation"))
    return LoadedModel(model=model, tokenizer=tokenizer, preprocess=preprocess, config=cfg, arch=arch)


def default_theta_patterns(model: torch.nn.Module, last_blocks: int = 2) -> list[str]:
    """Linear-layer weights of the last `last_blocks` residual blocks of each tower + both
    projections; for a LoRA fine-tune, the adapter weights (what the fine-tune changed)."""
    names = [name for name, _ in model.named_parameters()]
    if any(".lora_A." in name for name in names):
        from .lora import LORA_THETA_PATTERNS

        return list(LORA_THETA_PATTERNS)
    patterns: list[str] = []
    for tower in ("visual.transformer.resblocks", "transformer.resblocks"):
        prefix = re.escape(tower) + r"\.(\d+)\."
        depths = sorted({int(m.group(1)) for n in names if (m := re.match(prefix, n))})
        for block in depths[-last_blocks:]:
            patterns += [f"{tower}.{block}.attn.in_proj_weight", f"{tower}.{block}.attn.out_proj.weight",
                         f"{tower}.{block}.mlp.c_fc.weight", f"{tower}.{block}.mlp.c_proj.weight"]
    patterns += ["visual.proj", "text_projection", "text_projection.weight"]
    return patterns


def select_theta(model: torch.nn.Module, patterns: Sequence[str] | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters influence is taken over, in model order; fnmatch patterns on parameter names."""
    patterns = list(patterns) if patterns else default_theta_patterns(model)
    chosen = [(name, p) for name, p in model.named_parameters()
              if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)]
    if not chosen:
        raise ConfigError("options.theta", f"no parameter matches {patterns}")
    scalars = [name for name, p in chosen if p.ndim == 0]
    if scalars:
        raise ConfigError("options.theta", f"{scalars} are scalars; theta holds weight matrices and vectors")
    return chosen


def restrict_grad_to(model: torch.nn.Module, theta: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
    """requires_grad only on theta, so autograd builds no graph below the first theta layer."""
    chosen = {id(p) for _, p in theta}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
