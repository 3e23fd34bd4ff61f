"""Experiment 2: remove the top x% pairs by each ranking, retrain from scratch, evaluate on clean data.

For each removal seed (a detection run of `removal_corruption` at `removal_fraction`): for every
method and x in `removal_percents`, the x% most suspicious pairs by that method (its detection
score), x% random pairs, or the x% most valuable pairs (highest ECIF IS, the brittleness test)
are excluded and the model is retrained with the same recipe and seed (TrainConfig.exclude keeps
the partition and drops the ids from their batches). Reported: zero-shot accuracy and contrastive
loss on the clean test split, and the share of corrupted pairs among the removed (scoring).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ecif_core.data.batching import hash_seed
from ecif_core.models.factory import load_model

from . import scoring
from .detection import METHODS, suspicion
from .evaluation import clean_test_metrics
from .runs import existing_run, retrain
from .settings import QualitySettings
from .tensors import load_batches

SPECIAL = {"random": "random pairs", "valuable": "most valuable by ECIF IS (highest first)"}


def method_label(method: str) -> str:
    return SPECIAL.get(method) or METHODS[method].label


def removal_order(method: str, columns: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """Indices of all pairs, first removed first (stable: ties keep slot order)."""
    n = len(columns["influence"])
    if method == "random":
        return np.random.default_rng(hash_seed(seed, 7)).permutation(n)
    score = np.asarray(columns["influence"], dtype=np.float64) if method == "valuable" else suspicion(columns, method)
    if score is None:
        raise ValueError(f"removal method {method!r} has no score column in this run")
    return np.argsort(-score, kind="stable")


def removal_tasks(settings: QualitySettings) -> list[tuple[int, str, float]]:
    """(seed, method, percent) for every retraining, independent of each other."""
    return [(seed, method, percent) for seed in settings.removal_seeds for method in settings.removal_methods
            for percent in settings.removal_percents]


def remove_and_retrain(settings: QualitySettings, runs_dir: Path, seed: int, method: str, percent: float,
                       say: Callable[[str], None] = print) -> dict:
    """Retrain the removal run of `seed` without the first `percent` of `method`'s order; clean test
    metrics, the share of corrupted pairs among the removed, and the retraining time. The model is deleted."""
    run = existing_run(runs_dir, settings.removal_corruption, settings.removal_fraction, seed)
    saved = np.load(run.root / "scores.npz")
    ids = [str(i) for i in saved["ids"]]
    order = removal_order(method, {k: saved[k] for k in saved.files if k != "ids"}, seed)
    removed = [ids[i] for i in order[: int(round(percent * len(ids)))]]
    checkpoint, seconds = retrain(run, settings, run.root / "removal" / f"{method}-{percent}.pt", removed)
    loaded = load_model(config=run.config, checkpoint=checkpoint)
    metrics = clean_test_metrics(loaded, load_batches(run.data.test, loaded, settings.batch_size, seed, training=False))
    metrics.update(removed=len(removed), corrupted_share=scoring.corrupted_share(run.data.truth, removed),
                   retrain_seconds=seconds)
    checkpoint.unlink(missing_ok=True)
    Path(str(checkpoint) + ".json").unlink(missing_ok=True)
    say(f"removal seed {seed} {method} {percent:.0%}: accuracy {metrics['zero_shot_accuracy']:.3f}, "
        f"test loss {metrics['test_loss']:.3f}, corrupted share {metrics['corrupted_share']:.2f} ({seconds:.0f}s)")
    return metrics


def assemble(settings: QualitySettings, baselines: dict[int, dict], done: dict[tuple[int, str, float], dict]) -> dict:
    """{"seeds": {seed: {"none": clean metrics, "methods": {method: {percent: metrics}}}}, "summary": mean/sd}."""
    seeds = {}
    for seed in settings.removal_seeds:
        methods = {m: {str(p): done[(seed, m, p)] for p in settings.removal_percents} for m in settings.removal_methods}
        seeds[str(seed)] = {"none": baselines[seed], "methods": methods}
    summary: dict = {"none": {k: scoring.mean_sd([baselines[s][k] for s in settings.removal_seeds])
                              for k in ("zero_shot_accuracy", "test_loss")}, "methods": {}}
    for m in settings.removal_methods:
        summary["methods"][m] = {str(p): {k: scoring.mean_sd([done[(s, m, p)][k] for s in settings.removal_seeds])
                                          for k in ("zero_shot_accuracy", "test_loss", "corrupted_share")}
                                 for p in settings.removal_percents}
    return {"seeds": seeds, "summary": summary, "labels": {m: method_label(m) for m in settings.removal_methods}}
