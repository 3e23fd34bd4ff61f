"""Seeded LoGra-style Kronecker projections of per-layer gradients (docs/METHOD.md,
"Curvature at scale").

A 2-D parameter block G (d_out x d_in) is projected to P_out G P_in^T (k_out x k_in), which
equals sum over tokens of (P_out dy)(P_in x)^T for a linear layer. The Gaussian factors are
regenerated from (seed, parameter name) on demand and never stored, so any process projects
the same way. A side whose size is <= k is left unprojected (identity), so a large enough
projection is exact.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ProjectionSpec:
    """k_in / k_out per 2-D block (1-D blocks use k_out); None for both = unprojected."""

    k_in: int | None = 8
    k_out: int | None = 8
    seed: int = 0

    @property
    def unprojected(self) -> bool:
        return self.k_in is None and self.k_out is None


@dataclass(frozen=True)
class Block:
    """Where one parameter's projected gradient lives in the flat k-vector."""

    name: str
    start: int
    stop: int


def gaussian_factor(seed: int, name: str, side: str, k: int, d: int) -> torch.Tensor:
    """k x d with N(0, 1/k) entries, so E[P^T P] = I (inner products preserved on average)."""
    digest = hashlib.sha256(f"{seed}/{name}/{side}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(k, d, generator=generator, dtype=torch.float64).div_(k ** 0.5).float()


class Projector:
    """Maps per-parameter gradients (R, *shape) to one flat projected vector (R, k)."""

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size], spec: ProjectionSpec):
        self.spec = spec
        self.blocks: list[Block] = []
        self._factors: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        start = 0
        for name, shape in zip(names, shapes):
            out_factor, in_factor, size = self._factors_for(name, tuple(shape))
            self._factors.append((out_factor, in_factor))
            self.blocks.append(Block(name, start, start + size))
            start += size
        self.dim = start

    def _factors_for(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        spec = self.spec
        if spec.unprojected:
            size = 1
            for s in shape:
                size *= s
            return None, None, size
        d_out, d_in = (shape[0], 1) if len(shape) == 1 else (shape[0], int(torch.Size(shape[1:]).numel()))
        k_out, k_in = spec.k_out or d_out, (spec.k_in or d_in) if len(shape) > 1 else 1
        out_factor = gaussian_factor(spec.seed, name, "out", k_out, d_out) if k_out < d_out else None
        in_factor = gaussian_factor(spec.seed, name, "in", k_in, d_in) if k_in < d_in else None
        return out_factor, in_factor, min(k_out, d_out) * min(k_in, d_in)

    @classmethod
    def for_theta(cls, theta: Sequence[tuple[str, torch.nn.Parameter]], spec: ProjectionSpec) -> "Projector":
        """The projector of a theta list from models.select_theta."""
        return cls([name for name, _ in theta], [p.shape for _, p in theta], spec)

    def factors(self, index: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(P_out, P_in) of parameter `index` on `device`; None where that side is not projected."""
        return tuple(None if f is None else f.to(device) for f in self._factors[index])  # type: ignore[return-value]

    def project_block(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """(R, *shape) gradients of parameter `index` -> (R, k_block): P_out G P_in^T, float32."""
        out_factor, in_factor = self.factors(index, grad.device)
        block = grad.reshape(grad.shape[0], grad.shape[1], -1).float()  # (R, d_out, d_in); 1-D: d_in = 1
        if out_factor is not None:
            block = torch.matmul(out_factor, block)
        if in_factor is not None:
            block = torch.matmul(block, in_factor.T)
        return block.reshape(grad.shape[0], -1)

    def project(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """(R, *shape_i) per parameter -> (R, dim), float32."""
        return torch.cat([self.project_block(i, g) for i, g in enumerate(grads)], dim=1)
