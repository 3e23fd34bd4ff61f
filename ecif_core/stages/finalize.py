"""Finalize stage: rank every usable pair once all shards are scored with one damping."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ecif_core.calibration import Calibration, calibrate, training_evidence
from ecif_core.data.sources import Pair
from ecif_core.progress import Progress
from ecif_core.ranking import RANK_BY, misalignment_score, ranking, suspicion
from ecif_core.stages.plan import manifest_of, load_plan, open_store
from ecif_core.stages.scores import scored_columns, scored_curvature_shift
from ecif_core.stages.validation import audit_evidence


@dataclass
class Ranking:
    """The final order: pairs in slot order, their columns, rank order and flags."""

    slots: np.ndarray                  # row slot of each usable pair
    pairs: list[Pair]
    columns: dict[str, np.ndarray]
    order: np.ndarray                  # indices into pairs, most likely misaligned first
    suspected: np.ndarray              # bool per pair
    calibration: Calibration           # the estimated fraction, posteriors and the flag's precision


def final_ranking(audit_dir: str | Path, interval: bool = True) -> Ranking:
    """Rank every usable pair once all shards are scored with one damping. `interval`: False skips the
    calibration's bootstrap interval (a second or more), for callers that only select pairs."""
    plan = load_plan(audit_dir)
    scored_curvature_shift(plan, open_store(audit_dir))  # every shard scored, all with one curvature shift
    o = manifest_of(plan).options
    slots, pairs, cols = scored_columns(audit_dir)
    scores = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in cols.items()}
    evidence = ranking_evidence(audit_dir, cols)
    cols["suspicion"] = suspicion(scores, evidence).numpy()
    score = misalignment_score(scores, o.rank_by, evidence).numpy()
    order = ranking(torch.from_numpy(score)).numpy()
    missing = ("needs a validation set: its clean pairs are the yardstick of an aligned pair" if evidence is None else
               "this audit's validation stage ran before the calibration existed (its cosines were not kept); "
               "run the audit again in a new folder for an estimate")
    calibration = calibrate(cols, evidence, open_store(audit_dir).validation_cosines(), cols["suspicion"],
                            o.flag_precision, o.seed, missing, interval)
    cols["misaligned_probability"] = calibration.probability
    return Ranking(slots, pairs, cols, order, calibration.flags, calibration)


def finalize(audit_dir: str | Path, *, progress: Progress | None = None) -> Ranking:
    """The finalize stage: the final ranking, returned to the orchestrator (services.pipeline records
    it; ranked.csv and report.html are written from that record, by one writer each). `progress`:
    ("step", 0, 1) before, (1, 1) after: one pass over every pair's scores."""
    if progress is not None:
        progress("step", 0, 1)
    result = final_ranking(audit_dir)
    if progress is not None:
        progress("step", 1, 1)
    return result


def misalignment_columns(audit_dir: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Pair ids (slot order) and, for every ranking rule this audit can use, its score (higher =
    more likely misaligned): re-ranking a finished audit costs no gradient (benchmarks, what-ifs)."""
    _, pairs, cols = scored_columns(audit_dir)
    scores = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in cols.items()}
    evidence = ranking_evidence(audit_dir, cols)
    out = {}
    for rule in RANK_BY:
        try:
            out[rule] = misalignment_score(scores, rule, evidence).numpy()
        except ValueError:  # needs a validation set or a reference this audit lacks
            continue
    return [p.id for p in pairs], out


def ranking_evidence(audit_dir: str | Path, cols: dict[str, np.ndarray]) -> dict | None:
    """The evidence the rankings weigh each model by: the validation stage's AUROCs, plus the audited model's
    AUROC on its own training pairs judged by a competent reference (calibration.training_evidence) when the
    audit has one. None without a validation set."""
    evidence = audit_evidence(audit_dir)
    if evidence is None:
        return None
    training = training_evidence(cols, evidence, open_store(audit_dir).validation_cosines())
    if training is None:
        return evidence
    return {**evidence, "clip_score": {**evidence.get("clip_score", {}), "training": training}}
