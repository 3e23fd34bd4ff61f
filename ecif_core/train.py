"""Deterministic fine-tuning on the exact ECIF objective (docs/METHOD.md, "Setting").

Objective: sum over the fixed seeded partition of L_batch + (delta/2)|theta|^2. Each step
adds its share (|batch| / N) of the L2 term, so one epoch of steps sums to exactly that
objective; the L2 is part of the loss rather than AdamW's decoupled decay so the trained
model is a stationary point of the objective ECIF differentiates. The partition is the
same every epoch (only the order of batches is reshuffled, which leaves the objective
unchanged); `exclude` drops ids from their batches without re-partitioning, which is the
leave-out model of ECIF; `demote` keeps ids in their batches as negatives and drops their own
terms (docs/METHOD.md, "Demotion"); `keep` ids are taken out of both. Writes a JSON sidecar
next to the checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ecif_core.data.batching import ids_digest, training_batches
from ecif_core.data.images import load_batch
from ecif_core.data.formats import source_of
from ecif_core.data.sources import check_batchable, data_hash, leaving_ids, read_pairs
from ecif_core.models.lora import LORA_THETA_PATTERNS, TRAINING_SIDECAR, add_lora, save_adapter
from ecif_core.errors import ConfigError
from ecif_core.influence.losses import batch_loss, pair_logits
from ecif_core.data.manifest import SIDECAR_SUFFIX
from ecif_core.models.factory import ready_model, resolve_model_config, select_theta
from ecif_core.models.runtime import flush_denormals

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    exclude: Sequence[str] = field(default_factory=tuple)
    demote: Sequence[str] = field(default_factory=tuple)  # ids kept as in-batch negatives, their own terms dropped
    keep: Sequence[str] = field(default_factory=tuple)    # ids reviewed and kept: never excluded nor demoted
    warmup_steps: int = 10
    checkpoints: int = 0          # also save this many evenly spaced intermediate checkpoints (TracIn)
    train_only: Sequence[str] | None = None  # fnmatch patterns of the parameters to train; the rest frozen
    lora_rank: int | None = None  # train peft LoRA adapters of this rank on `init` (out is then an adapter folder)
    lora_alpha: float | None = None  # LoRA scaling alpha / rank; default alpha = rank


@dataclass
class TrainResult:
    checkpoint: Path
    sidecar: Path
    epoch_seconds: list[float]
    final_loss: float
    validation: list[dict] = field(default_factory=list)  # per epoch: loss and retrieval accuracy (with validation)


@dataclass
class ValidationSet:
    """Preprocessed clean validation pairs, scored after every epoch to show the model learns."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    pairs: int

    @torch.no_grad()
    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean contrastive loss per pair over the validation batches, and image-to-text retrieval
        accuracy over the whole set (the share of images whose own caption is the nearest of all)."""
        was_training = model.training
        model.eval()
        loss, texts, images = 0.0, [], []
        for image_batch, tokens in self.batches:
            u, v = model.encode_text(tokens), model.encode_image(image_batch)
            loss += float(batch_loss(pair_logits(u, v, model.logit_scale.exp())))
            texts.append(torch.nn.functional.normalize(u, dim=-1))
            images.append(torch.nn.functional.normalize(v, dim=-1))
        similarity = torch.cat(images) @ torch.cat(texts).T
        hits = (similarity.argmax(dim=1) == torch.arange(len(similarity))).double().mean()
        model.train(was_training)
        return {"loss": loss / self.pairs, "image_to_text_accuracy": float(hits)}


def load_validation(data: str | Path | dict, loaded, batch_size: int, seed: int) -> ValidationSet:
    """The validation source in batches of the training batch size (its own seeded partition)."""
    pairs, rejected, ids = read_pairs(data, field="validation")
    by_id = {p.id: p for p in pairs}
    batches, alone = training_batches(ids, batch_size, seed, drop=set(ids) - set(by_id))
    if not batches:
        check_batchable("validation", len(pairs) + len(rejected), len(alone), [r.reason for r in rejected], False)
    tensors = [load_batch([by_id[i] for i in b], loaded.preprocess, loaded.tokenizer) for b in batches]
    return ValidationSet(tensors, sum(len(b) for b in batches))


def train(data: str | Path, model_config: str | Path | dict, out: str | Path, cfg: TrainConfig,
          init: str | Path | None = None, progress: Callable[..., None] | None = None,
          validation: str | Path | dict | None = None) -> TrainResult:
    """Train (or fine-tune from `init`) and write out + out.json; returns timings for benchmarks.

    `progress(epoch, epochs, loss_per_pair, metrics)`: metrics is the epoch's validation loss and
    retrieval accuracy ({} without `validation`); the same numbers go to the sidecar."""
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.lr <= 0 or cfg.weight_decay < 0:
        raise ConfigError("train", f"invalid training config {cfg}")
    if cfg.lora_rank is not None and init is None:
        raise ConfigError("lora_rank", "a LoRA fine-tune needs the base checkpoint (init)")
    torch.manual_seed(cfg.seed)
    model_cfg = resolve_model_config(config=model_config)
    loaded = ready_model(config=model_cfg, checkpoint=init, seed=cfg.seed, grads="all", device="cpu").loaded
    model = loaded.model
    if cfg.lora_rank is not None:
        model = add_lora(model, cfg.lora_rank, cfg.lora_alpha)
        cfg = replace(cfg, train_only=cfg.train_only or list(LORA_THETA_PATTERNS))
    pairs, rejected, all_ids = read_pairs(data)
    by_id = {p.id: p for p in pairs}
    excluded, demoted, kept_back = acted_on(cfg, all_ids, data)
    batches, alone = training_batches(all_ids, cfg.batch_size, cfg.seed, drop=excluded | leaving_ids(rejected))
    n_used = sum(len(b) for b in batches)
    if n_used == 0:
        check_batchable("train", len(pairs) + len(rejected), len(alone), [r.reason for r in rejected], batched=False)
    # Preprocessed tensors stay in memory: the trainer serves demos, benchmarks and retraining.
    cached = [load_batch([by_id[i] for i in b], loaded.preprocess, loaded.tokenizer) for b in batches]
    # per batch: which pairs are demoted (None: none, the plain loss bit for bit)
    masks = [torch.tensor([i in demoted for i in b]) if demoted & set(b) else None for b in batches]
    if cfg.train_only is not None:  # e.g. fine-tune theta alone from `init` (a retraining oracle)
        trained = {id(p) for _, p in select_theta(model, list(cfg.train_only))}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
    l2_params = [p for name, p in model.named_parameters() if name != "logit_scale" and p.requires_grad]
    held_out = None if validation is None else load_validation(validation, loaded, cfg.batch_size, cfg.seed)
    model.train()
    with flush_denormals():
        epoch_seconds, epoch_loss, history = _run_epochs(model, cfg, batches, cached, n_used, l2_params, out, progress,
                                                         held_out, masks)
    model.eval()
    return _save(model, cfg, data, out, pairs, all_ids, excluded, n_used, model_cfg, epoch_seconds, epoch_loss, init,
                 history, demoted, kept_back)


def acted_on(cfg: TrainConfig, all_ids: Sequence[str], data) -> tuple[set[str], set[str], dict[str, int]]:
    """(excluded, demoted, kept back per action): the config's ids checked against the data, the keep
    list taken out of both; a set the keep list empties, or an id both excluded and demoted, is refused."""
    known = set(all_ids)
    chosen = {"exclude": set(cfg.exclude), "demote": set(cfg.demote), "keep": set(cfg.keep)}
    for name, ids in chosen.items():
        unknown = sorted(ids - known)
        if unknown:
            raise ConfigError(name, f"{len(unknown)} ids are not in {data}: {unknown[:5]}")
    both = sorted(chosen["exclude"] & chosen["demote"])
    if both:
        raise ConfigError("demote", f"{len(both)} ids are both removed and demoted: {both[:5]}")
    kept_back = {}
    for name in ("exclude", "demote"):
        kept_back[name] = len(chosen[name] & chosen["keep"])
        if chosen[name] and kept_back[name] == len(chosen[name]):
            raise ConfigError(name, "every id of the set is on the keep list; nothing to act on")
    return chosen["exclude"] - chosen["keep"], chosen["demote"] - chosen["keep"], kept_back


def _run_epochs(model, cfg: TrainConfig, batches, cached, n_used: int, l2_params, out, progress,
                held_out: ValidationSet | None = None, masks: Sequence[torch.Tensor | None] | None = None):
    """The optimisation loop; returns (seconds per epoch, summed loss of the last epoch, validation
    metrics per epoch)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    total_steps = cfg.epochs * len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps))
    order_rng = batch_order(cfg.seed)
    snapshots = snapshot_epochs(cfg.epochs, cfg.checkpoints)
    epoch_seconds, epoch_loss, history = [], float("nan"), []
    for epoch in range(cfg.epochs):
        started, epoch_loss = time.perf_counter(), 0.0
        for b in order_rng.permutation(len(batches)):
            images, tokens = cached[b]
            logits = pair_logits(model.encode_text(tokens), model.encode_image(images), model.logit_scale.exp())
            loss = batch_loss(logits, demoted=None if masks is None else masks[b])
            l2 = sum((p * p).sum() for p in l2_params)
            objective = loss + 0.5 * cfg.weight_decay * l2 * (len(batches[b]) / n_used)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            epoch_loss += float(loss.detach())
        epoch_seconds.append(time.perf_counter() - started)
        metrics = {} if held_out is None else held_out.measure(model)
        if metrics:
            history.append({"epoch": epoch + 1, **metrics})
        if progress:
            progress(epoch + 1, cfg.epochs, epoch_loss / n_used, metrics)
        if epoch + 1 in snapshots:
            _write_weights(model, _snapshot_path(Path(out), epoch + 1), cfg)
    return epoch_seconds, epoch_loss, history


def _write_weights(model: torch.nn.Module, path: Path, cfg: TrainConfig) -> None:
    """A full state dict, or for a LoRA fine-tune the adapter folder (peft's format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.lora_rank is not None:
        save_adapter(model, path)
    else:
        torch.save(model.state_dict(), path)


def _save(model, cfg: TrainConfig, data, out, pairs, all_ids, excluded, n_used, model_cfg, epoch_seconds,
          epoch_loss, init, history, demoted=frozenset(), kept_back=None) -> TrainResult:
    """Checkpoint (or adapter folder) plus the JSON sidecar the audit reads its defaults from.

    Paths in the sidecar are relative to the sidecar's folder, so a model folder can be moved or
    mounted elsewhere (a worker's data root) with its sidecar still valid."""
    snapshots = snapshot_epochs(cfg.epochs, cfg.checkpoints)
    out = Path(out)
    _write_weights(model, out, cfg)
    sidecar = out / TRAINING_SIDECAR if cfg.lora_rank is not None else Path(str(out) + SIDECAR_SUFFIX)
    home = sidecar.parent.resolve()
    source = source_of(data).to_json()
    source["path"] = source["path"] if source["format"] == "webdataset" else _relative(source["path"], home)
    sidecar.write_text(json.dumps({
        "batch_size": cfg.batch_size, "seed": cfg.seed, "weight_decay": cfg.weight_decay, "epochs": cfg.epochs,
        "lr": cfg.lr, "excluded": sorted(excluded), "demoted": sorted(demoted), "kept_back": kept_back or {},
        "pairs_used": n_used, "data": source,
        "data_hash": data_hash(pairs), "ids_digest": ids_digest(all_ids), "model_config": model_cfg, "epoch_seconds": epoch_seconds,
        "final_loss_per_pair": epoch_loss / n_used,
        "checkpoints": [_relative(_snapshot_path(out, e), home) for e in sorted(snapshots)],
        "base_checkpoint": None if init is None else _relative(init, home),
        "lora": None if cfg.lora_rank is None else {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank},
        "validation": history,
    }, indent=1))
    return TrainResult(out, sidecar, epoch_seconds, epoch_loss / n_used, history)


def _relative(path: str | Path, home: Path) -> str:
    """`path` relative to the sidecar's folder (resolved first)."""
    return os.path.relpath(Path(path).resolve(), home)


def batch_order(seed: int) -> np.random.Generator:
    """The generator whose permutation, one per epoch, orders the batches of a run with this seed (the
    trainer's, and the replay edit's, which repeats it)."""
    return np.random.Generator(np.random.PCG64(seed + 1))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to zero: ends near a minimum, as influence functions assume."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def snapshot_epochs(epochs: int, count: int) -> set[int]:
    if count <= 0:
        return set()
    return {max(1, round(epochs * (i + 1) / count)) for i in range(count)}


def _snapshot_path(out: Path, epoch: int) -> Path:
    return out.with_name(f"{out.stem}.epoch{epoch}{out.suffix}")
