"""Which parameters influence is taken over (theta): the default, the "blocks:N" shorthand, and
fnmatch selection on parameter names."""
from __future__ import annotations

import fnmatch
import re
from typing import Sequence

import torch

from ecif_core.errors import ConfigError


PROJECTIONS = ("visual.proj", "text_projection", "text_projection.weight")  # the towers' final maps
BLOCKS_PREFIX = "blocks:"  # a theta entry "blocks:N": the last N residual blocks of each tower + the projections


def default_theta_patterns(model: torch.nn.Module) -> list[str]:
    """The towers' final projections; for a LoRA fine-tune, the adapter weights (what it changed).

    The projections give the default ranking the blocks give (it is built from CLIPScores) at a
    tenth of the gradient cost, in closed form (influence/head.py); the last blocks buy about 0.1
    LDS (bench/RESULTS.md, "Theta"), so they stay one entry away: "blocks:2"."""
    names = [name for name, _ in model.named_parameters()]
    if any(".lora_A." in name for name in names):
        from ecif_core.models.lora import LORA_THETA_PATTERNS

        return list(LORA_THETA_PATTERNS)
    return list(PROJECTIONS)


def block_theta_patterns(model: torch.nn.Module, last_blocks: int) -> list[str]:
    """Linear-layer weights of the last `last_blocks` residual blocks of each tower + both projections."""
    names = [name for name, _ in model.named_parameters()]
    patterns: list[str] = []
    for tower in ("visual.transformer.resblocks", "transformer.resblocks"):
        prefix = re.escape(tower) + r"\.(\d+)\."
        depths = sorted({int(m.group(1)) for n in names if (m := re.match(prefix, n))})
        for block in depths[-last_blocks:] if last_blocks > 0 else []:
            patterns += [f"{tower}.{block}.attn.in_proj_weight", f"{tower}.{block}.attn.out_proj.weight",
                         f"{tower}.{block}.mlp.c_fc.weight", f"{tower}.{block}.mlp.c_proj.weight"]
    return patterns + list(PROJECTIONS)


def expand_theta_patterns(model: torch.nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """fnmatch patterns with each "blocks:N" entry written out (block_theta_patterns); None: the default."""
    if not patterns:
        return default_theta_patterns(model)
    out: list[str] = []
    for pattern in patterns:
        if pattern.startswith(BLOCKS_PREFIX):
            count = pattern[len(BLOCKS_PREFIX):]
            if not count.isdigit() or int(count) < 1:
                raise ConfigError("options.theta", f"{pattern!r}: write blocks:N with N a whole number of blocks, "
                                  "at least 1 (blocks:2 = the last two blocks of each tower + the projections)")
            out += block_theta_patterns(model, int(count))
        else:
            out.append(pattern)
    return out


def select_theta(model: torch.nn.Module, patterns: Sequence[str] | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters influence is taken over, in model order; fnmatch patterns on parameter names."""
    patterns = expand_theta_patterns(model, patterns)
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


def check_edit_theta(names: Sequence[str], adapter: bool, field: str = "theta") -> None:
    """An edited LoRA fine-tune is written as its adapter folder, so a change outside the adapter
    weights would be lost without a word: refuse such a theta, naming `field`."""
    outside = [name for name in names if ".lora_" not in name] if adapter else []
    if outside:
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        raise ConfigError(field, f"a LoRA fine-tune is edited in its adapter weights (the edit is written as an "
                          f"adapter folder), but {', '.join(outside[:3])}{more} are not adapter weights; leave theta "
                          "out (the adapters) or give patterns such as *.lora_A.* and *.lora_B.*")
