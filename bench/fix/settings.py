"""What bench.fix runs: the fine-tuning benchmark's cells, the lists a user could act on, the actions, presets.

A list is a removal spec of the product (`ecif edit --remove SPEC`, ecif_core.edit.removal), so the bench
acts on exactly what a user would; `{n}` is the number of pairs the audit flagged (`suspected`), so
"the base model's n lowest-CLIPScore pairs" is compared with the flagged ones at equal size.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bench.quality.finetune.settings import FinetuneSettings

# name -> spec template ({n}: the number flagged; {m}: the audit's estimated number of misaligned pairs,
# summary.json; {seed}: the cell's seed). Suspicion follows each column's
# meaning (ranked.csv): "top:Q:reference_clip_score" is the Q pairs with the lowest base-model CLIPScore.
LISTS: dict[str, str] = {
    "suspected": "suspected",
    "audit_top10": "top:0.1:rank",
    "audit_top20": "top:0.2:rank",
    "reference_low_n": "top:{n}:reference_clip_score",
    "reference_low10": "top:0.1:reference_clip_score",
    "reference_low20": "top:0.2:reference_clip_score",
    "audit_estimated": "estimated",   # the product's own spec: top:{m}:rank
    "reference_low_m": "top:{m}:reference_clip_score",
    "own_low10": "top:0.1:clip_score",
    "random10": "random:0.1:{seed}",
}
# "retrain": fine-tune the base again, same recipe, seed and batches; "edit": the product's model edit of the
# audited fine-tune. "remove" drops the pairs; "demote" keeps them as in-batch negatives without their own terms.
ACTIONS: tuple[str, ...] = ("retrain:remove", "retrain:demote", "edit:remove", "edit:demote")
NOISE_SEED_OFFSET = 1000  # the k-th retraining of the noise check: seed + k x this, nothing removed


@dataclass
class FixSettings:
    """Everything that decides a result; stored in results.json and in each record's key."""

    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    lists: list[str] = field(default_factory=lambda: list(LISTS))
    actions: list[str] = field(default_factory=lambda: list(ACTIONS))
    edit_theta: list[str] | None = None   # None: the audit's theta (the product's default)
    edit_curvature: str = "hessian"       # ecif_core.edit.solver.CURVATURES ("gauss-newton" is PSD); newton only
    edit_method: str = "replay"           # ecif_core.edit.solver.METHODS (the product's default first)
    clean_seeds: list[int] = field(default_factory=lambda: [100])  # clean controls (0% corrupted), attribute cells
    tag: str = ""                         # records in OUT/fix-<tag>: a variant run on the same cells
    noise_repeats: int = 3                # retrainings with other seeds, nothing removed (the noise check)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "finetune": self.finetune.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FixSettings":
        return cls(**{**data, "finetune": FinetuneSettings.from_json(data["finetune"])})

    def action_key(self) -> dict[str, Any]:
        """What one action's result depends on beyond its cell (a record with another key is redone)."""
        key = {"cell": self.finetune.cell_key(), "edit_theta": self.edit_theta}
        if self.edit_method != "newton":  # records from before the replay were Newton edits: their key had no method
            key["edit_method"] = self.edit_method
        return key if self.edit_curvature == "hessian" else {**key, "edit_curvature": self.edit_curvature}


def small() -> FixSettings:
    """The preset the issue's targets use: same-domain fine-tunes of the pretrained base with 20% attribute
    swaps (full and LoRA), shuffled captions or systematic swaps (full), test seeds 100-102, a clean control
    (seed 100); eight lists (the top-20% lists only in the full grid), four actions. Domain-shift fine-tunes are
    left to the full grid: at these sizes they do not learn their data (clean i2t top-1 0.06-0.25 against 0.5 required; bench.fix
    reports it per cell), so acting on their lists measures nothing."""
    finetune = FinetuneSettings(regimes=["same_domain"], corruptions=["attribute", "shuffle", "systematic"],
                                lora_corruptions=["attribute"], dev_seeds=[], test_seeds=[100, 101, 102],
                                test_fractions=[0.2], crossfit_fractions=[])
    return FixSettings(finetune=finetune, lists=["suspected", "audit_top10", "audit_estimated", "reference_low_n",
                                                 "reference_low10", "reference_low_m", "own_low10", "random10"])


def full() -> FixSettings:
    """Every regime, corruption and test seed of bench.quality at 20%, every list (resumable: hours)."""
    finetune = FinetuneSettings(dev_seeds=[], test_fractions=[0.2], crossfit_fractions=[])
    return FixSettings(finetune=finetune, clean_seeds=list(finetune.test_seeds))


def quick() -> FixSettings:
    """The test suite's run: bench.quality's quick sizes, one cell and a clean control, three lists."""
    from bench.quality.finetune.settings import quick as quick_finetune

    return FixSettings(finetune=quick_finetune(), lists=["audit_top10", "reference_low10", "random10"], noise_repeats=1)


PRESETS = {"small": small, "full": full, "quick": quick}
