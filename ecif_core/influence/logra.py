"""LoGra: projected per-pair gradients from layer inputs and output-gradients, never forming
the full weight gradient (docs/METHOD.md, "Curvature at scale").

For a weight W used as y = x W^T (F.linear) the gradient is sum_m dy_m x_m^T, so its
projection is sum_m (P_out dy_m)(P_in x_m)^T; for W used as y = x @ W it is
sum_m (P_out x_m)(P_in dy_m)^T. A TorchFunctionMode records (x, y) for every call that uses a
theta weight (nn.Linear layers and open_clip's `x @ proj`); we then ask autograd only for dy
(the gradients w.r.t. those outputs), not for dense weight gradients. A theta parameter used
some other way falls back to its dense gradient.

nn.MultiheadAttention runs its projections inside F.multi_head_attention_forward, where a
TorchFunctionMode sees only the outer call. When its in/out projection weights are in theta,
the recorder runs that call itself as two explicit linears around scaled_dot_product_attention
(self-attention without dropout, key padding or extra biases: what open_clip builds; anything
else runs unchanged and falls back to dense gradients), so both weights get factors too.
It also writes attention and gelu with plain ops (see _attend). Recorded inputs and outputs
are batch-first (item index first), which is what per-item
projected Jacobians (gradients.per_item_gradients) rely on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import inspect

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ecif_core.influence.projection import Projector

_LINEAR = {torch.nn.functional.linear, torch._C._nn.linear}
_MATMUL_NAMES = {"matmul", "__matmul__"}


@dataclass
class Use:
    """One use of a theta weight in the forward pass."""

    index: int           # position of the weight in theta
    kind: str            # "linear" (y = x W^T) or "matmul" (y = x @ W)
    inputs: torch.Tensor
    output: torch.Tensor


class WeightUseRecorder(TorchFunctionMode):
    """Records the (input, output) of every linear / matmul whose weight is a theta parameter."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        super().__init__()
        self._index = {id(p): i for i, p in enumerate(params)}
        self.uses: list[Use] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            decomposed = self._attention(args, kwargs)
            if decomposed is not None:
                return decomposed
        if (func is F.gelu and kwargs.get("approximate", args[1] if len(args) > 1 else "none") == "none"
                and args[0].requires_grad):  # only a batched backward through it needs the plain ops
            return _gelu(args[0])
        out = func(*args, **kwargs)
        if func in _LINEAR:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if id(weight) in self._index:
                self.uses.append(Use(self._index[id(weight)], "linear", args[0], out))
        elif getattr(func, "__name__", "") in _MATMUL_NAMES and len(args) == 2 and id(args[1]) in self._index and args[1].ndim == 2:
            self.uses.append(Use(self._index[id(args[1])], "matmul", args[0], out))
        return out


    def _attention(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, None] | None:
        """F.multi_head_attention_forward as recorded linears, or None to run it unchanged."""
        a = _MHA_SIGNATURE.bind(*args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        in_w, out_w = a["in_proj_weight"], a["out_proj_weight"]
        if id(in_w) not in self._index and id(out_w) not in self._index:
            return None
        query = a["query"]
        plain = (a["key"] is query and a["value"] is query and query.dim() == 3 and in_w is not None
                 and a["bias_k"] is None and a["bias_v"] is None and not a["add_zero_attn"]
                 and (a["dropout_p"] == 0.0 or not a["training"]) and a["key_padding_mask"] is None
                 and not a["need_weights"] and not a["use_separate_proj_weight"]
                 and a["static_k"] is None and a["static_v"] is None)
        if not plain:
            return None
        length, items, width = query.shape                  # sequence-first, as nn.MultiheadAttention passes it
        heads = a["num_heads"]
        x = query.transpose(0, 1)                           # (items, length, width)
        qkv = self._linear(x, in_w, a["in_proj_bias"])
        q, k, v = (t.reshape(items, length, heads, width // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        mask, causal = a["attn_mask"], a["is_causal"]
        if causal:
            mask = None
        elif mask is not None:
            if mask.dtype == torch.bool:                    # MHA: True = blocked; SDPA: True = allowed
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            if mask.dim() == 3:
                mask = mask.reshape(items, heads, *mask.shape[1:])
            mask = mask.to(q.dtype)
        attended = _attend(q, k, v, mask, causal)
        attended = attended.transpose(1, 2).reshape(items, length, width)
        out = self._linear(attended, out_w, a["out_proj_bias"])
        return out.transpose(0, 1), None

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)  # the mode is off inside __torch_function__: record by hand
        if id(weight) in self._index:
            self.uses.append(Use(self._index[id(weight)], "linear", x, out))
        return out


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


# The batched backwards (vmap over cotangents) have no batching rule for the fused CPU attention
# and gelu backward kernels and fall back to a loop over cotangents, which took about half of a
# tiny-CLIP gradients shard. Inside the recorded forward both are written with plain ops.

def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, as scaled_dot_product_attention computes it."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        length = scores.shape[-1]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1) @ v


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) gelu, nn.GELU's default."""
    return x * 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))


def projected_from_uses(uses: Sequence[Use], output_grads: Sequence[torch.Tensor], projector: Projector,
                        rows: int) -> dict[int, torch.Tensor]:
    """Per theta index, the projected gradient (rows, k_block) summed over its uses."""
    out: dict[int, torch.Tensor] = {}
    for use, dy in zip(uses, output_grads):
        p_out, p_in = projector.factors(use.index, dy.device)
        x = use.inputs.detach().reshape(-1, use.inputs.shape[-1])
        dy = dy.reshape(rows, -1, dy.shape[-1])
        if use.kind == "linear":   # W: (d_out, d_in); projected sum_m (P_out dy_m)(P_in x_m)^T
            left, right = project_side(dy, p_out), project_side(x, p_in)
            block = torch.einsum("rmo,mi->roi", left, right)
        else:                      # W: (d_in, d_out) as stored; projected sum_m (P_out x_m)(P_in dy_m)^T
            left, right = project_side(x, p_out), project_side(dy, p_in)
            block = torch.einsum("mo,rmi->roi", left, right)
        block = block.reshape(rows, -1)
        out[use.index] = out[use.index] + block if use.index in out else block
    return out


def project_side(t: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return t if factor is None else t @ factor.T
