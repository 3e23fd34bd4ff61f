"""One cell of the grid: build its data, fine-tune the base, audit, compute baselines, score against the truth.

A cell is (regime, corruption, tuning, fraction, seed). The seed decides the fine-tune images, which pairs
are corrupted and how, and the fine-tune's partition and batch order; the base is shared. The fine-tune
data of one (regime, seed) is the same images for every corruption and fraction (paired comparisons).

Order inside a cell keeps the truth away from every ranking: all scores are computed and saved to
scores.npz first; only then does `evaluate` read truth.csv (which lives outside the data folder the audit
is given). The result is written to OUT/cells/<name>.json when the cell finishes; a rerun with the same
settings returns it without recomputing. The cell's folder keeps the audit (to re-rank it later), the
final model and the data; intermediate checkpoints and cross-fit models are deleted once used.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ecif_core.data.batching import hash_seed
from ecif_core.models.lora import TRAINING_SIDECAR
from ecif_core.data.manifest import SIDECAR_SUFFIX
from ecif_core.models.factory import LoadedModel, load_model
from ecif_core.train import TrainConfig, train
from services.embedded import run_audit

from ..baselines import checkpoint_weights
from ..tensors import batch_ids, load_batches
from . import baselines, scores
from .corruptions import CORRUPTIONS, corrupt, write_truth
from .evaluate import evaluate_cell
from .generator import VOCABULARIES, Split, Vocabulary, sample_items, write_split
from .retrieval import retrieval_accuracy
from .settings import REGIME_VOCAB, REGIMES, FinetuneSettings

DATA_STREAM, CORRUPTION_STREAM = 7101, 7201  # seed streams (hash_seed), apart from the base's


@dataclass(frozen=True)
class CellSpec:
    regime: str
    corruption: str
    tuning: str          # "full" or "lora"
    fraction: float
    seed: int
    split: str           # "dev" or "test" seeds
    crossfit: bool       # also compute the cross-fitted CLIPScore (K fine-tunes)

    @property
    def name(self) -> str:
        return f"{self.regime}-{self.corruption}-{self.tuning}-f{round(self.fraction * 100):02d}-s{self.seed}"


def cell_specs(settings: FinetuneSettings) -> list[CellSpec]:
    """Every cell of the grid, the expensive ones (cross-fitting) first so two workers finish together."""
    specs = []
    for regime in settings.regimes:
        for corruption in settings.corruptions:
            tunings = ["full"] + (["lora"] if corruption in settings.lora_corruptions else [])
            for tuning in tunings:
                for split, seeds, fractions in (("test", settings.test_seeds, settings.test_fractions),
                                                ("dev", settings.dev_seeds, settings.dev_fractions)):
                    for fraction in fractions:
                        for seed in seeds:
                            crossfit = split == "test" and any(abs(fraction - f) < 1e-9 for f in settings.crossfit_fractions)
                            specs.append(CellSpec(regime, corruption, tuning, fraction, seed, split, crossfit))
    # Cross-fit cells first, then test 20%, dev, the other fractions; regimes and corruptions interleaved.
    def priority(s: CellSpec) -> tuple:
        group = 0 if s.crossfit else (1 if s.split == "dev" else 2)
        return (group, s.seed, s.fraction, s.corruption, s.tuning, s.regime)
    return sorted(specs, key=priority)


@dataclass(frozen=True)
class CellData:
    vocab: Vocabulary
    train: Split
    validation: Split
    test: Split
    truth: Path


def cell_items(settings: FinetuneSettings, spec: CellSpec) -> tuple[Vocabulary, np.random.Generator, list, list, list]:
    """(vocabulary, the data stream after sampling, train, validation and test items) of a cell: what its
    images show, drawn again identically by anyone who needs the clean labels (bench.fix's evaluation)."""
    vocab = VOCABULARIES[REGIME_VOCAB[spec.regime]]
    rng = np.random.default_rng(hash_seed(DATA_STREAM, REGIMES.index(spec.regime), spec.seed))
    items = sample_items(vocab, settings.n_finetune, rng)
    val_items, test_items = sample_items(vocab, settings.n_val, rng), sample_items(vocab, settings.n_test, rng)
    return vocab, rng, items, val_items, test_items


def build_data(folder: Path, settings: FinetuneSettings, spec: CellSpec) -> CellData:
    """data/{train,val,test}.jsonl + images (train corrupted, val and test clean) and truth.csv beside data/."""
    vocab, rng, items, val_items, test_items = cell_items(settings, spec)
    regime = REGIMES.index(spec.regime)
    corruption_rng = np.random.default_rng(hash_seed(CORRUPTION_STREAM, regime, spec.seed,
                                                     CORRUPTIONS.index(spec.corruption), round(spec.fraction * 1000)))
    result = corrupt(items, vocab, spec.corruption, spec.fraction, corruption_rng)
    data = folder / "data"
    train_split = write_split(data, "train", vocab, items, rng, captions=result.captions, prefix="ft")
    val_split = write_split(data, "val", vocab, val_items, rng)
    test_split = write_split(data, "test", vocab, test_items, rng)
    truth = write_truth(folder / "truth.csv", train_split.ids, items, result, spec.corruption)
    return CellData(vocab, train_split, val_split, test_split, truth)


def train_config(settings: FinetuneSettings, spec: CellSpec, checkpoints: int) -> TrainConfig:
    lora = spec.tuning == "lora"
    return TrainConfig(epochs=settings.epochs[spec.regime], batch_size=settings.batch_size,
                       lr=(settings.lora_lr if lora else settings.lr)[spec.regime], weight_decay=settings.weight_decay,
                       seed=spec.seed,
                       checkpoints=checkpoints, lora_rank=settings.lora_rank if lora else None)


def result_path(out: Path, spec: CellSpec) -> Path:
    return Path(out) / "cells" / f"{spec.name}.json"


def cached_result(settings: FinetuneSettings, out: Path, spec: CellSpec) -> dict | None:
    """The finished cell's record when it was computed with these settings, else None."""
    path = result_path(out, spec)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("key") != settings.cell_key() or record.get("spec") != dataclasses.asdict(spec):
        return None
    return record


def run_cell(settings: FinetuneSettings, out: Path, spec: CellSpec, config: Path, base: Path,
             say: Callable[[str], None] = print) -> dict:
    """The cell's record (from its cache when finished before with the same settings)."""
    out = Path(out)
    record = cached_result(settings, out, spec)
    if record is not None:
        return {**record, "cached": True}
    folder = out / "cells" / spec.name
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier attempt is redone whole
    folder.mkdir(parents=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    data = build_data(folder, settings, spec)
    timings["build_data"] = time.perf_counter() - started

    lora = spec.tuning == "lora"
    model_path = folder / ("lora" if lora else "model.pt")
    cfg = train_config(settings, spec, settings.checkpoints)
    started = time.perf_counter()
    trained = train(data.train.path, config, model_path, cfg, init=base)
    timings["finetune"] = time.perf_counter() - started

    def load(path: Path) -> LoadedModel:
        return load_model(config=config, checkpoint=base, adapter=path) if lora else load_model(config=config, checkpoint=path)

    loaded, reference = load(model_path), load_model(config=config, checkpoint=base)
    retrieval = {"finetuned": retrieval_accuracy(loaded, data.test, data.vocab),
                 "base": retrieval_accuracy(reference, data.test, data.vocab)}

    ranked, audit_seconds, audit_stages = _audit(folder, config, base, model_path, data, lora)
    timings["audit"] = audit_seconds
    ids, product = scores.ranked_columns(ranked)
    rule_ids, rules = scores.rule_columns(folder / "audit")
    product.update({name: scores.aligned(v, rule_ids, ids) for name, v in rules.items()})

    raw = _baselines(settings, spec, data, config, base, model_path, cfg, loaded, reference, load, timings)
    ordered = {name: scores.aligned(values, raw["_ids"], ids) for name, values in raw.items() if name != "_ids"}
    all_scores = {**product, **scores.oriented_baselines(ordered)}
    np.savez(folder / "scores.npz", ids=np.array(ids), **{k.replace(":", "__"): v for k, v in all_scores.items()})
    _cleanup_snapshots(model_path, lora)

    metrics, n_bad = evaluate_cell(all_scores, ids, data.truth, settings.ks)  # the first read of the truth
    record = {"key": settings.cell_key(), "spec": dataclasses.asdict(spec), "name": spec.name,
              "n_pairs": len(ids), "n_corrupted": n_bad, "metrics": metrics, "retrieval": retrieval,
              "timings": timings, "cost_in_finetunes": {k: v / timings["finetune"] for k, v in timings.items()},
              "audit_stages": audit_stages, "final_loss_per_pair": trained.final_loss,
              "epoch_seconds": trained.epoch_seconds, "scores": sorted(all_scores), "pid": os.getpid()}
    path = result_path(out, spec)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # the cell counts as finished only once its whole record is there
    best = {k: metrics[k]["auroc"] for k in ("ranked:rank", "baseline:clip_score_audited", "baseline:clip_score_reference")
            if k in metrics}
    say(f"{spec.name}: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; retrieval top-1 "
        f"{retrieval['finetuned']['top1']:.2f}; AUROC " + ", ".join(f"{k.split(':')[1]} {v:.3f}" for k, v in best.items()))
    return {**record, "cached": False}


def _audit(folder: Path, config: Path, base: Path, model_path: Path, data: CellData,
           lora: bool) -> tuple[Path, float, dict]:
    """The product's default audit of the fine-tuned model (options from its training sidecar)."""
    model: dict[str, Any] = {"config": str(config), "checkpoint": str(base if lora else model_path)}
    if lora:
        model["adapter"] = str(model_path)
    manifest = {"model": model, "train": str(data.train.path), "validation": str(data.validation.path)}
    manifest_path = folder / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=1))
    started = time.perf_counter()
    ranked = run_audit(manifest_path, folder / "audit")
    seconds = time.perf_counter() - started
    return ranked, seconds, json.loads((folder / "audit" / "timing.json").read_text())


def _sidecar(model_path: Path, lora: bool) -> dict:
    path = model_path / TRAINING_SIDECAR if lora else Path(str(model_path) + SIDECAR_SUFFIX)
    return json.loads(path.read_text())


def _snapshots(model_path: Path, lora: bool) -> list[Path]:
    """The trainer's intermediate checkpoints; the sidecar lists them relative to its own folder."""
    home = model_path if lora else model_path.parent
    return [home / p for p in _sidecar(model_path, lora)["checkpoints"]]


def _baselines(settings: FinetuneSettings, spec: CellSpec, data: CellData, config: Path, base: Path,
               model_path: Path, cfg: TrainConfig, loaded: LoadedModel, reference: LoadedModel,
               load: Callable[[Path], LoadedModel], timings: dict[str, float]) -> dict[str, Any]:
    """Raw baseline values (with their ids under "_ids"), each timed on its own."""
    started = time.perf_counter()
    train_batches = load_batches(data.train.path, loaded, settings.batch_size, spec.seed, training=True)
    val_batches = load_batches(data.validation.path, loaded, settings.batch_size, spec.seed, training=False)
    timings["load_tensors"] = time.perf_counter() - started
    raw: dict[str, Any] = {"_ids": batch_ids(train_batches)}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        begun = time.perf_counter()
        value = fn()
        timings[name] = time.perf_counter() - begun
        return value

    raw["clip_score_audited"] = timed("clip_score_audited", lambda: baselines.clip_scores(loaded, train_batches))
    raw["clip_score_reference"] = timed("clip_score_reference", lambda: baselines.clip_scores(reference, train_batches))
    raw["neg_clip_loss_reference"] = timed("neg_clip_loss_reference", lambda: baselines.reference_neg_clip_loss(
        reference, train_batches, settings.batch_size, settings.neg_clip_repeats, spec.seed))
    raw["own_loss"] = timed("own_loss", lambda: baselines.own_loss(loaded, train_batches))
    snapshots = _snapshots(model_path, spec.tuning == "lora")
    weights = checkpoint_weights(cfg.epochs, settings.checkpoints, len(train_batches), cfg.lr, cfg.warmup_steps)
    influence, self_influence = timed("self_tracin", lambda: baselines.tracin(
        [lambda p=p: load(p) for p in snapshots], weights, list(settings.tracin_theta), train_batches, val_batches))
    raw["self_tracin"], raw["tracin"] = self_influence, influence
    if spec.crossfit:
        crossfit_cfg = train_config(settings, spec, 0)
        values, _info = timed("crossfit", lambda: baselines.crossfit_clip_scores(
            data.train.path, config, base, model_path.parent / "crossfit", crossfit_cfg, settings.crossfit_folds, load,
            train_batches))
        raw["clip_score_crossfit"] = values
    return raw


def _cleanup_snapshots(model_path: Path, lora: bool) -> None:
    """Delete the intermediate checkpoints (TracIn has used them); the final model stays for the audit."""
    for path in _snapshots(model_path, lora):
        if path.resolve() == model_path.resolve():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
