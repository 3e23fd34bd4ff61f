"""A checkpoint file's layout, so that an edited model is written back the way its input came.

open_clip reads a plain state dict, a training checkpoint `{"epoch", "state_dict", "optimizer",
...}` and keys with DistributedDataParallel's `module.` prefix alike (open_clip.load_state_dict),
and so does the audit (factory.load_weights). Its own training script only resumes from the
training form, and tools around it look for `state_dict`: the edit keeps the input's wrapper
(every other entry unchanged, the optimizer state included: it describes the weights before the
edit, as after any change of weights outside the optimizer) and its prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ecif_core.data.storage import local_copy, location

DDP_PREFIX = "module."
WRAPPER_KEY = "state_dict"


@dataclass(frozen=True)
class CheckpointLayout:
    """How a checkpoint file holds its weights."""

    wrapped: bool  # a dict with the weights under "state_dict" beside other entries (epoch, optimizer, ...)
    prefix: str    # "module." when every weight's name has it (a DDP-wrapped model's state dict), else ""
    safetensors: bool


def _load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _prefix(names: list[str]) -> str:
    return DDP_PREFIX if names and all(str(n).startswith(DDP_PREFIX) for n in names) else ""


def checkpoint_layout(path: str | Path) -> CheckpointLayout:
    """The layout of the (already checked) checkpoint at `path`."""
    path = local_copy(location(path, "model.checkpoint"))
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt", device="cpu") as handle:
            return CheckpointLayout(False, _prefix(list(handle.keys())), True)
    state = _load(path)
    wrapped = isinstance(state, dict) and WRAPPER_KEY in state
    weights = state[WRAPPER_KEY] if wrapped else state
    return CheckpointLayout(wrapped, _prefix(list(weights) if isinstance(weights, dict) else []), False)


def write_in_layout(state: dict[str, torch.Tensor], source: str | Path, out: Path) -> None:
    """`state` (the model's own names) written to `out` as `source` holds its weights: the same
    wrapper with its other entries copied, the same name prefix, safetensors' metadata kept."""
    layout = checkpoint_layout(source)
    named = {f"{layout.prefix}{k}": v for k, v in state.items()}
    if layout.safetensors:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(local_copy(location(source, "model.checkpoint"))), "pt", device="cpu") as handle:
            metadata = handle.metadata()
        save_file(named, str(out), metadata=metadata)
        return
    if not layout.wrapped:
        torch.save(named, out)
        return
    original = _load(local_copy(location(source, "model.checkpoint")))
    torch.save({k: (named if k == WRAPPER_KEY else v) for k, v in original.items()}, out)
