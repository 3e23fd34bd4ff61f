"""A checkpoint of another architecture described in one sentence: the block counts of each
tower, read from parameter names ("checkpoint has 12 vision blocks, the config builds 2"), so
nobody has to read a list of unexpected keys to see that the wrong config was given."""
from __future__ import annotations

import re
from typing import Iterable

# "<tower>.<stack>.<index>." in open_clip's own towers (visual.transformer.resblocks.3.), timm's
# (visual.trunk.blocks.3.) and Hugging Face's (text.transformer.encoder.layer.3.)
_BLOCK = re.compile(r"^(?P<stack>(?:.*\.)?(?:resblocks|blocks|layers|layer))\.(?P<index>\d+)\.")


def block_counts(names: Iterable[str]) -> dict[str, int]:
    """Stack prefix (e.g. "visual.transformer.resblocks") -> number of blocks (highest index + 1)."""
    counts: dict[str, int] = {}
    for name in names:
        match = _BLOCK.match(name)
        if match:
            stack = match["stack"]
            counts[stack] = max(counts.get(stack, 0), int(match["index"]) + 1)
    return counts


def tower_name(stack: str) -> str:
    """The words a person uses for a stack: vision for the image tower, text for the text tower."""
    return "vision" if stack.startswith("visual") else "text" if stack.startswith(("transformer", "text")) else stack


def layer_mismatch(model_names: Iterable[str], checkpoint_names: Iterable[str]) -> str | None:
    """One sentence per tower whose block count differs, e.g. "checkpoint has 12 vision blocks
    (visual.transformer.resblocks), the config builds 2"; None when every tower matches."""
    built, saved = block_counts(model_names), block_counts(checkpoint_names)
    parts = [f"checkpoint has {saved.get(stack, 0)} {tower_name(stack)} blocks ({stack}), the config builds "
             f"{built.get(stack, 0)}" for stack in sorted(set(built) | set(saved), key=lambda s: (tower_name(s), s))
             if built.get(stack, 0) != saved.get(stack, 0)]
    if not parts:
        return None
    return "; ".join(parts) + " (another architecture: give the config or arch the checkpoint was trained with)"
