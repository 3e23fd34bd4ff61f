"""LoRA fine-tunes of open_clip towers, in peft's own adapter format.

An adapter folder is what peft's `save_pretrained` writes (adapter_config.json +
adapter_model.safetensors), so adapters trained elsewhere with peft load here and ours load
in peft. The default targets are the MLP linears of every residual block (`c_fc`, `c_proj`):
the attention's `out_proj` is read by `F.multi_head_attention_forward` as a raw weight, so a
LoRA there would be silently skipped. peft is imported only when an adapter is used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ecif_core.errors import ConfigError
from ecif_core.data.storage import local_folder, location

DEFAULT_TARGETS: tuple[str, ...] = ("c_fc", "c_proj")
LORA_THETA_PATTERNS: tuple[str, ...] = ("*.lora_A.*", "*.lora_B.*")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_SIDECAR = "ecif_train.json"  # our training record inside the adapter folder


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None,
             targets: Sequence[str] = DEFAULT_TARGETS) -> torch.nn.Module:
    """Inject fresh LoRA adapters (B = 0, so the model's outputs are unchanged) in place."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ConfigError("lora_rank", "must be a positive integer")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=0.0,
                        target_modules=list(targets), bias="none")
    model = inject_adapter_in_model(config, model)
    model.peft_config = {"default": config}  # what peft's own save reads; kept for save_adapter
    return model


def has_lora(model: torch.nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


def save_adapter(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write the adapter in peft's format (config + safetensors of the LoRA weights only)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(folder))
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(folder / ADAPTER_WEIGHTS))
    return folder


def check_adapter_folder(folder: str | Path, field: str = "model.adapter") -> Path:
    """The adapter folder, as a local folder (a folder in a bucket: a cached local copy)."""
    folder = location(folder, field)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise ConfigError(field, f"{folder} is not a peft adapter folder (no {name})")
    return local_folder(folder, (ADAPTER_CONFIG, ADAPTER_WEIGHTS))


def inject_adapter(model: torch.nn.Module, folder: str | Path, field: str = "model.adapter") -> torch.nn.Module:
    """The folder's LoRA layers added to `model`, untrained (also on the meta device: shapes only)."""
    from peft import LoraConfig, inject_adapter_in_model

    folder = check_adapter_folder(folder, field)
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(field, f"{folder / ADAPTER_CONFIG} is not a LoRA config ({exc})") from exc
    model = inject_adapter_in_model(config, model)
    model.peft_config = {"default": config}
    return model


def load_adapter(model: torch.nn.Module, folder: str | Path, field: str = "model.adapter") -> torch.nn.Module:
    """Inject the folder's adapter into `model` (its base weights already loaded) and load it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = inject_adapter(model, folder, field)
    result = set_peft_model_state_dict(model, load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
    lora_keys = {n for n, _ in model.named_parameters() if ".lora_" in n}
    missing = [k for k in result.missing_keys if k in lora_keys]
    if missing or result.unexpected_keys:
        raise ConfigError(field, f"adapter weights do not match its config: missing {missing[:3]}, "
                          f"unexpected {list(result.unexpected_keys)[:3]}")
    return model
