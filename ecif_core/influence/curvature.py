"""Damped empirical-Fisher curvature in projected space (docs/METHOD.md, "Curvature at scale").

H ~ sum_n g_pos(n) g_pos(n)^T + (delta + lambda) I. We store the eigendecomposition of the
undamped sum and add delta + lambda only when H^-1 is applied, so re-scoring with another
damping needs no new gradients.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ecif_core.errors import ConfigError
from ecif_core.influence.projection import Block


def fisher_sum(gradient_chunks: Iterable[torch.Tensor], dim: int) -> torch.Tensor:
    """sum_n g g^T over row chunks (R, k), accumulated in float64."""
    total = torch.zeros(dim, dim, dtype=torch.float64)
    for chunk in gradient_chunks:
        g = chunk.to(torch.float64)
        total += g.T @ g
    return total


def eigendecompose(fisher: torch.Tensor, blocks: Sequence[Block] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigvals, eigvecs) of the Fisher sum; with blocks, of its block-diagonal part (per layer).

    The block option returns a block-diagonal eigenvector matrix, so scoring code is the same.
    """
    if blocks is None:
        eigvals, eigvecs = torch.linalg.eigh(fisher)
        return eigvals.clamp_min(0.0), eigvecs
    eigvals = torch.zeros(fisher.shape[0], dtype=fisher.dtype)
    eigvecs = torch.zeros_like(fisher)
    for block in blocks:
        part = slice(block.start, block.stop)
        vals, vecs = torch.linalg.eigh(fisher[part, part])
        eigvals[part], eigvecs[part, part] = vals.clamp_min(0.0), vecs
    return eigvals, eigvecs


def default_damping(eigvals: torch.Tensor, per_mean_eigenvalue: float) -> float:
    """lambda = per_mean_eigenvalue x mean eigenvalue (options.damping_per_mean_eigenvalue; docs/METHOD.md,
    "Curvature at scale")."""
    return float(per_mean_eigenvalue * eigvals.mean())


class DampedInverse:
    """Applies H^-1 = Q diag(1 / (e + curvature_shift)) Q^T, in float64; the curvature shift is
    delta + lambda (weight decay plus damping), the one name the store, the database and the API use."""

    def __init__(self, eigvals: torch.Tensor, eigvecs: torch.Tensor, curvature_shift: float):
        if curvature_shift <= 0 and float(eigvals.min()) <= 0:
            raise ConfigError("options.damping", "the curvature is singular: give a positive damping or weight decay")
        self.eigvecs = eigvecs.to(torch.float64)
        self.eigvals = eigvals.to(torch.float64)  # of the undamped Fisher sum
        self.inv_eigvals = 1.0 / (eigvals.to(torch.float64) + curvature_shift)
        self.curvature_shift = curvature_shift

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Q^T x for rows of x (..., k)."""
        return x.to(torch.float64) @ self.eigvecs

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """H^-1 x for rows of x (..., k)."""
        return (self.rotate(x) * self.inv_eigvals) @ self.eigvecs.T
