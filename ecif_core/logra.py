"""LoGra: projected per-pair gradients from layer inputs and output-gradients, never forming
the full weight gradient (ECIF_MATH "Curvature in projected space").

For a weight W used as y = x W^T (F.linear) the gradient is sum_m dy_m x_m^T, so its
projection is sum_m (P_out dy_m)(P_in x_m)^T; for W used as y = x @ W it is
sum_m (P_out x_m)(P_in dy_m)^T. A TorchFunctionMode records (x, y) for every call that uses a
theta weight (nn.Linear layers and open_clip's `x @ proj`); we then ask autograd only for dy
(the gradients w.r.t. those outputs), not for dense weight gradients. A theta parameter used
some other way falls back to its dense gradient: that includes the attention weights of
nn.MultiheadAttention, whose inner linear calls a TorchFunctionMode cannot see.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.overrides import TorchFunctionMode

from .projection import Projector

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
        out = func(*args, **kwargs)
        if func in _LINEAR:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if id(weight) in self._index:
                self.uses.append(Use(self._index[id(weight)], "linear", args[0], out))
        elif getattr(func, "__name__", "") in _MATMUL_NAMES and len(args) == 2 and id(args[1]) in self._index and args[1].ndim == 2:
            self.uses.append(Use(self._index[id(args[1])], "matmul", args[0], out))
        return out


def projected_from_uses(uses: Sequence[Use], output_grads: Sequence[torch.Tensor], projector: Projector,
                        rows: int) -> dict[int, torch.Tensor]:
    """Per theta index, the projected gradient (rows, k_block) summed over its uses."""
    out: dict[int, torch.Tensor] = {}
    for use, dy in zip(uses, output_grads):
        p_out, p_in = projector.factors(use.index, dy.device)
        x = use.inputs.detach().reshape(-1, use.inputs.shape[-1])
        dy = dy.reshape(rows, -1, dy.shape[-1])
        if use.kind == "linear":   # W: (d_out, d_in); projected sum_m (P_out dy_m)(P_in x_m)^T
            left, right = _side(dy, p_out), _side(x, p_in)
            block = torch.einsum("rmo,mi->roi", left, right)
        else:                      # W: (d_in, d_out) as stored; projected sum_m (P_out x_m)(P_in dy_m)^T
            left, right = _side(x, p_out), _side(dy, p_in)
            block = torch.einsum("mo,rmi->roi", left, right)
        block = block.reshape(rows, -1)
        out[use.index] = out[use.index] + block if use.index in out else block
    return out


def _side(t: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return t if factor is None else t @ factor.T
