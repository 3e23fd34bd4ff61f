"""Picking `chunk` (cotangents per batched backward) and `items` (items per forward) for a
memory budget, so the gradients stage's peak is set by the budget and the model, not by B or N.

Model of the peak, per batch of B items with embedding size D (float32, bytes):
    resident (the model, libraries, already allocated)
  + cotangents          2 x 3B x B x D x 4      (d[Pos, Neg, 1 - cos] / d(u, v); the one term in B^2)
  + forward             items x A x FORWARD
  + backward            items x chunk x A x BACKWARD
where A = bytes of one item's recorded theta-layer inputs and outputs (measured by one probe
forward of a single item; 265 KiB for the tiny CLIP, 9.5 MiB for ViT-B-32 with the default
theta). BACKWARD: ViT-B-32 at B = 256 used about 1.2 A per item x cotangent on an H100 (12.8 GB
peak for 16 items x 64 cotangents) and about 1.6 A on CPU; 2 leaves a margin
(bench/RESULTS.md, "Scale").
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import torch

from ecif_core.errors import ConfigError
from ecif_core.influence.logra import Use, WeightUseRecorder

TERMS_PER_PAIR = 3  # cotangent sets per pair: Pos(n), Neg(n), 1 - cos(u_n, v_n)


def item_directions(batch_size: int, embed_dim: int) -> int:
    """Jacobian directions per item on the per-item path: min(D, B + 1) (basis.item_basis)."""
    return embed_dim if batch_size + 1 >= embed_dim else batch_size + 1


def choose_method(batch_size: int, embed_dim: int, factored: bool, terms: int = TERMS_PER_PAIR,
                  direction_flops: float | None = None, k: int = 0) -> str:
    """The cost model. Backward directions per item are min(D, B + 1) on the per-item path (each
    item's cotangents lie in the span of the other tower's B embeddings and its own) against
    terms x B per pair (one cotangent set per gradient wanted, g_pos, g_neg and C_n).

    Per item needs every theta weight to have LoGra factors (dense gradients sum over items).
    Without `direction_flops` the fewer directions win (B + 1 < 3B for every B > 1). With it
    (flops of one direction through one item, `direction_flops` below) each path's flops are
    compared, the per-item path paying for its coordinate step and contraction (path_flops):
    when theta is only the projections a direction costs almost nothing and those extra steps
    decide (bench/RESULTS.md, "Per-item cotangent basis"). Ties keep per pair."""
    if not factored:
        return "per_pair"
    if direction_flops is None:
        return "per_item" if item_directions(batch_size, embed_dim) < terms * batch_size else "per_pair"
    costs = path_flops(batch_size, embed_dim, direction_flops, k, terms)
    return "per_item" if costs["per_item"] < costs["per_pair"] else "per_pair"


def path_flops(batch_size: int, embed_dim: int, direction_flops: float, k: int,
               terms: int = TERMS_PER_PAIR) -> dict[str, float]:
    """Flops per batch of each path: directions x items x direction_flops, plus on the per-item
    path the coordinates of the 2 x terms x B x B cotangents in the basis (none when the basis is
    the identity) and their contraction with the per-item projected Jacobians (k wide)."""
    size, dim = batch_size, embed_dim
    directions = item_directions(size, dim)
    coordinates = 0.0 if directions == dim else 2 * 2 * terms * size * size * dim * directions
    contraction = 2 * terms * size * size * directions * k
    return {"per_pair": terms * size * size * direction_flops,
            "per_item": directions * size * direction_flops + coordinates + contraction}


def direction_flops(uses: Sequence[Use], text_uses: int, factor_rows: Sequence[tuple[int | None, int | None]]) -> float:
    """Flops of one cotangent direction through one item: the backward through every theta
    linear above the lowest one of its tower (the lowest one's output is where it stops), plus
    the LoGra projection of each use's output-gradient and its outer product with the input's
    (factor_rows[i] = rows of (P_out, P_in) of theta weight i, None for an unprojected side).
    Attention, norms and activations are left out: a lower bound, the same for both paths,
    which is what the comparison needs."""
    total = 0.0
    for tower in (uses[:text_uses], uses[text_uses:]):
        for position, use in enumerate(tower):
            d_in, d_out = use.inputs.shape[-1], use.output.shape[-1]
            tokens = use.inputs[0].numel() // d_in
            k_out, k_in = factor_rows[use.index]
            if use.kind == "linear":   # dy (d_out) meets P_out, x (d_in) meets P_in
                dy_rows, x_rows = k_out, k_in
            else:                      # x @ W: x meets P_out, dy meets P_in
                dy_rows, x_rows = k_in, k_out
            if position > 0:
                total += 2 * tokens * d_in * d_out
            total += 2 * tokens * (d_out * (dy_rows or 0) + (dy_rows or d_out) * (x_rows or d_in))
    return total


def backward_passes(batch_size: int, embed_dim: int) -> int:
    """Backward directions per batch of the path choose_method picks by direction counts (what
    the memory plans size a backward by, before any theta layer has been recorded)."""
    if choose_method(batch_size, embed_dim, True) == "per_item":
        return item_directions(batch_size, embed_dim)
    return TERMS_PER_PAIR * batch_size


FORWARD = 3.0
BACKWARD = 2.0
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(value: int | float | str | None, field: str = "options.memory_limit") -> int | None:
    """8589934592, "8GB", "8 GiB", "512MB" -> bytes (binary units); None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(field, f"a size in bytes or like \"8GB\", got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def resident_bytes(device: torch.device) -> int:
    """What this process already holds on `device` (RSS on CPU, allocated memory on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: assume nothing is held yet
        return 0


def item_bytes(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], image: torch.Tensor,
               token: torch.Tensor) -> tuple[int, int]:
    """(A, D): bytes of one item's recorded theta-layer inputs and outputs (both towers), and
    the embedding size."""
    device = model.logit_scale.device
    recorder = WeightUseRecorder(params)
    with recorder:
        embedding = model.encode_text(token.to(device))
        model.encode_image(image.to(device))
    seen, total = set(), 0
    for use in recorder.uses:
        for t in (use.inputs, use.output):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return max(total, 1), int(embedding.shape[-1])


def plan_chunks(memory_limit: int, resident: int, batch: int, dim: int, per_item: int, chunk: int,
                passes: int) -> tuple[int, int]:
    """(items, chunk) that fit the budget: all B items and the user's chunk if they fit, else
    fewer items per forward first (it costs one extra no-grad forward), then a smaller chunk.
    `passes`: backward passes per batch (min(D, B + 1) per item, 3B per pair); chunk never exceeds it."""
    chunk = max(1, min(chunk, passes))
    free = memory_limit - resident - 2 * (TERMS_PER_PAIR * batch) * batch * dim * 4
    if free <= 0:
        raise ConfigError("options.memory_limit", f"{memory_limit} bytes leave nothing for the backward: the model "
                          f"and the batch's cotangents already take {memory_limit - free}")
    items = int(free // (per_item * (FORWARD + chunk * BACKWARD)))
    if items >= 1:
        return min(items, batch), chunk
    chunk = int((free / per_item - FORWARD) // BACKWARD)
    return 1, max(1, chunk)


def plan_for_batch(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], images: torch.Tensor,
                   tokens: torch.Tensor, chunk: int, memory_limit: int) -> tuple[int, int]:
    """plan_chunks for this batch and model (one probe forward of a single item)."""
    device = model.logit_scale.device
    per_item, dim = item_bytes(model, params, images[:1], tokens[:1])
    batch = len(tokens)
    return plan_chunks(memory_limit, resident_bytes(device), batch, dim, per_item, chunk,
                       backward_passes(batch, dim))
