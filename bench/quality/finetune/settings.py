"""Sizes, the grid of cells and the `--quick` preset of the fine-tuning benchmark.

Sizes: the full grid is 96 cells (24 of them with 5-fold cross-fitting). Measured with 2 single-thread
workers on the 2-core machine while it was otherwise idle: a cell without cross-fitting 30-50 s (fine-tune
4-26 s, audit 13-21 s, baselines about 6 s), cross-fitting 19-97 s more; about 47 minutes for the grid.
Under another user's test load the same cells took about twice as long. The base (3000 pairs x 40 epochs)
is pretrained once, about 8-13 minutes, and cached.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

REGIMES: tuple[str, ...] = ("same_domain", "domain_shift")
# Which vocabulary a regime fine-tunes on (the base is always pretrained on A).
REGIME_VOCAB: dict[str, str] = {"same_domain": "A", "domain_shift": "B"}


@dataclass
class FinetuneSettings:
    """Everything that decides a result; stored in results.json and in each cell's key."""

    regimes: list[str] = field(default_factory=lambda: list(REGIMES))
    corruptions: list[str] = field(default_factory=lambda: ["shuffle", "attribute", "systematic"])
    lora_corruptions: list[str] = field(default_factory=lambda: ["attribute"])  # also fine-tuned with LoRA
    dev_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    dev_fractions: list[float] = field(default_factory=lambda: [0.2])
    test_seeds: list[int] = field(default_factory=lambda: [100, 101, 102])
    test_fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3])
    crossfit_fractions: list[float] = field(default_factory=lambda: [0.2])   # on test seeds only
    crossfit_folds: int = 5
    # The base: one tiny CLIP pretrained on clean vocabulary-A pairs, shared by every cell (cached on disk).
    base_pairs: int = 3000
    base_test: int = 320
    base_epochs: int = 40
    base_lr: float = 2e-3
    # No L2 while pretraining: with it, Adam drives the embedding rows of tokens the base never reads to exactly
    # zero, so every vocabulary-B word would be the same (null) token and a LoRA fine-tune (token embeddings
    # frozen) could never tell them apart; a real pretrained CLIP has distinct embeddings for unseen words.
    base_weight_decay: float = 0.0
    base_seed: int = 0
    # Fine-tuning: the audited models.
    n_finetune: int = 800
    n_val: int = 256
    n_test: int = 320
    # Per regime: a same-domain fine-tune starts from a base that already knows its concepts (a few epochs fit
    # the new pairs); a domain-shift fine-tune must first learn new words and new images. Measured on the
    # B vocabulary (800 pairs): 5 epochs at lr 3e-3 left colours at 0.40, 8 epochs at 5e-3 learned them
    # (0.99) while the new shapes stayed near chance; more epochs cost time the grid does not have.
    epochs: dict[str, int] = field(default_factory=lambda: {"same_domain": 3, "domain_shift": 8})
    batch_size: int = 32
    lr: dict[str, float] = field(default_factory=lambda: {"same_domain": 1e-3, "domain_shift": 5e-3})
    lora_lr: dict[str, float] = field(default_factory=lambda: {"same_domain": 5e-3, "domain_shift": 5e-3})
    lora_rank: int = 8
    weight_decay: float = 1e-2
    checkpoints: int = 3
    # Baselines.
    tracin_theta: list[str] = field(default_factory=lambda: ["visual.proj", "text_projection"])
    neg_clip_repeats: int = 10
    ks: list[int] = field(default_factory=lambda: [10, 50, 100])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FinetuneSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def base_key(self) -> dict[str, Any]:
        """The settings the cached base depends on (a base with another key is rebuilt)."""
        return {k: getattr(self, k) for k in ("base_pairs", "base_test", "base_epochs", "base_lr",
                                              "base_weight_decay", "base_seed", "batch_size")}

    def cell_key(self) -> dict[str, Any]:
        """The settings one cell's result depends on (a cached cell with another key is recomputed)."""
        skip = {"regimes", "corruptions", "lora_corruptions", "dev_seeds", "dev_fractions", "test_seeds",
                "test_fractions", "crossfit_fractions"}
        return {k: v for k, v in self.to_json().items() if k not in skip}


def quick(regimes: list[str] | None = None) -> FinetuneSettings:
    """The test suite's run: tiny sizes, one seed, one corruption, no cross-fitting (under a minute).
    The models barely learn at this size; it checks the plumbing, not the method."""
    return FinetuneSettings(regimes=list(regimes or ["same_domain"]), corruptions=["attribute"],
                            lora_corruptions=[], dev_seeds=[], test_seeds=[100], test_fractions=[0.2],
                            crossfit_fractions=[], base_pairs=192, base_test=64, base_epochs=2, n_finetune=96,
                            n_val=64, n_test=64, epochs={r: 2 for r in REGIMES}, checkpoints=2, neg_clip_repeats=2,
                            ks=[10])
