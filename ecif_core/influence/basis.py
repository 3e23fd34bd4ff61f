"""Per-item cotangent bases: the few Jacobian directions an item needs (docs/METHOD.md,
"Per-item cotangent basis").

Every cotangent a pair's terms send to caption i is (I - u^_i u^_i^T) times a combination of
the batch's unit image embeddings v^_1..v^_B (and symmetrically for image j), so it lies in
span{v^_1..v^_B, u^_i}. An orthonormal basis of that span, shared part Q (one QR of the B image
embeddings) plus one direction of the item's own (u^_i off span Q), has min(D, B + 1) rows; the
item's projected Jacobian is needed along those rows only, not along all D coordinates. Where
B + 1 >= D the basis is the identity (the coordinates), as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ItemBasis:
    """Orthonormal rows, per item: `shared` (r, D) for every item, then `own[j]` (D,) if present."""

    shared: torch.Tensor
    own: torch.Tensor | None
    identity: bool = False   # shared is the D x D identity: coordinates are the cotangents themselves

    @property
    def size(self) -> int:
        """Directions per item: r, plus one for the item's own embedding."""
        return self.shared.shape[0] + (0 if self.own is None else 1)

    def part(self, start: int, stop: int) -> "ItemBasis":
        """The basis of items [start, stop) (a slice of the batch)."""
        return ItemBasis(self.shared, None if self.own is None else self.own[start:stop], self.identity)

    def directions(self, start: int, stop: int, items: int) -> torch.Tensor:
        """(stop - start, items, D): basis rows start..stop-1 as cotangents of every item."""
        dim = self.shared.shape[1]
        r = self.shared.shape[0]
        out = torch.empty(stop - start, items, dim, dtype=self.shared.dtype, device=self.shared.device)
        shared_stop = min(stop, r)
        if start < shared_stop:
            out[:shared_stop - start] = self.shared[start:shared_stop].unsqueeze(1)
        if stop > r:  # the own direction is row r
            out[r - start] = self.own
        return out

    def coefficients(self, cotangents: torch.Tensor) -> torch.Tensor:
        """(T, items, D) cotangents -> (T, items, size) coordinates in this basis (exact for
        cotangents in its span, which every pair term's are)."""
        if self.identity:
            return cotangents
        coords = cotangents @ self.shared.T.to(cotangents.dtype)
        if self.own is None:
            return coords
        own = torch.einsum("tjd,jd->tj", cotangents, self.own.to(cotangents.dtype))
        return torch.cat([coords, own.unsqueeze(-1)], dim=-1)


def identity_basis(dim: int, like: torch.Tensor) -> ItemBasis:
    """The D coordinate directions (one-hot cotangents), the same for every item."""
    return ItemBasis(torch.eye(dim, dtype=like.dtype, device=like.device), None, identity=True)


def item_basis(own_emb: torch.Tensor, other_emb: torch.Tensor) -> ItemBasis:
    """The basis for one tower's items: span of the other tower's unit embeddings, plus each
    item's own unit embedding off that span; the identity where that is no smaller than D."""
    items, dim = own_emb.shape
    batch = other_emb.shape[0]
    if batch + 1 >= dim:
        return identity_basis(dim, own_emb)
    other = torch.nn.functional.normalize(other_emb.detach(), dim=-1)
    shared, _ = torch.linalg.qr(other.T)               # (D, B), orthonormal columns even if rank < B
    shared = shared.T.contiguous()                     # (B, D)
    own = torch.nn.functional.normalize(own_emb.detach(), dim=-1)
    for _ in range(2):                                  # Gram-Schmidt twice: orthogonal to float rounding
        own = own - (own @ shared.T) @ shared
    norm = own.norm(dim=-1, keepdim=True)
    # an own embedding in the shared span (to rounding) needs no own direction: a zero row
    keep = norm > 16 * torch.finfo(own.dtype).eps
    own = torch.where(keep, own / torch.where(keep, norm, torch.ones_like(norm)), torch.zeros_like(own))
    return ItemBasis(shared, own)
