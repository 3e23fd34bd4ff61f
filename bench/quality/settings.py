"""Sizes and switches of the quality benchmark; the full default and the `--quick` preset."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PROJECTIONS_THETA: tuple[str, ...] = ("visual.proj", "text_projection")
# negCLIPLoss ranks almost like CLIPScore and is left out of the default removal set for time (add it with
# --removal-methods); every retraining costs about as much as a detection run.
REMOVAL_METHODS: tuple[str, ...] = ("ecif_self_is", "ecif_is", "clip_score", "random", "valuable")


@dataclass
class QualitySettings:
    """Everything that decides a result; stored in results.json next to the numbers."""

    corruptions: list[str] = field(default_factory=lambda: ["shuffle", "swap", "close"])
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_train: int = 600
    n_val: int = 300
    n_test: int = 297
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-2
    theta: list[str] | None = field(default_factory=lambda: list(PROJECTIONS_THETA))  # None = audit default
    projection: int | None = 8              # k_in = k_out of the audit's projection; None = exact gradients
    neg_variant_fractions: list[float] | None = None  # first-order / paper Neg audits; None = every fraction
    checkpoints: int = 3                    # TracIn checkpoints (the last is the final model)
    neg_clip_repeats: int = 10              # K random batches per pair for negCLIPLoss
    ks: list[int] = field(default_factory=lambda: [10, 50])
    removal_corruption: str = "shuffle"
    removal_fraction: float = 0.2
    removal_seeds: list[int] = field(default_factory=lambda: [0, 1])
    removal_percents: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    removal_methods: list[str] = field(default_factory=lambda: list(REMOVAL_METHODS))
    fidelity_seed: int = 0
    fidelity_subsets: int = 50
    fidelity_subset_fraction: float = 0.1
    fidelity_projections: list[int | None] = field(default_factory=lambda: [8, 32])
    fidelity_partners: list[int] = field(default_factory=list)  # also audit with options.partners = m (bench.partners)
    cost_default_theta: bool = True         # also time one audit with theta blocks:2 (the default before issue 22)
    # The levers: ECIF at each saved checkpoint (self-IS ranks averaged; every run, about 3 s),
    # and exact gradients of theta (no projection; about 18 s per audit, so only at these fractions).
    checkpoint_ensemble: bool = True
    exact_gradient_fractions: list[float] = field(default_factory=lambda: [0.2])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def runs_neg_variants(self, fraction: float) -> bool:
        chosen = self.fractions if self.neg_variant_fractions is None else self.neg_variant_fractions
        return any(abs(fraction - f) < 1e-9 for f in chosen)

    def audit_options(self, neg_term: str = "exact", *, default_theta: bool = False,
                      projection: int | None | str = "same") -> dict[str, Any]:
        """Audit manifest options; batch size, seed and weight decay come from the training sidecar."""
        k = self.projection if projection == "same" else projection
        options: dict[str, Any] = {"neg_term": neg_term, "projection": None if k is None else {"k_in": k, "k_out": k}}
        if default_theta:  # the record keeps its old name: the default theta before issue 22
            options["theta"] = ["blocks:2"]
        elif self.theta is not None:
            options["theta"] = list(self.theta)
        return options


def quick() -> QualitySettings:
    """A reduced version of every experiment (one corruption, one seed, small sizes): about 20 s on 2 cores.
    The model stays near chance at this size; the run checks the plumbing, not the method."""
    return QualitySettings(corruptions=["shuffle"], fractions=[0.2], seeds=[0], n_train=160, n_val=96, n_test=96,
                           epochs=4, checkpoints=2, neg_clip_repeats=4, removal_seeds=[0], removal_percents=[0.1],
                           removal_methods=["ecif_self_is", "random", "valuable"], fidelity_subsets=12,
                           fidelity_projections=[8], cost_default_theta=False)
