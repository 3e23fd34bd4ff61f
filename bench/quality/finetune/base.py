"""The base model: a tiny CLIP pretrained from random init on clean vocabulary-A pairs, cached on disk.

One base is shared by every cell of both regimes (not one per seed): pretraining is the most expensive
single step and the seeds vary what is audited (the fine-tune data, its corruption and the fine-tune order),
not what the fine-tune starts from. The base is rebuilt only when the settings it depends on change
(`FinetuneSettings.base_key`), so reruns and the cells' worker processes all reuse the same file.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ecif_core.data.batching import hash_seed
from ecif_core.demo import tiny_model_config
from ecif_core.models.factory import load_model
from ecif_core.train import TrainConfig, train

from .generator import VOCABULARIES, sample_items, write_split
from .retrieval import retrieval_accuracy
from .settings import FinetuneSettings

BASE_STREAM = 7001  # seed stream of the base's data (cells use other streams: no image is shared)


@dataclass(frozen=True)
class Base:
    """The pretrained base: model config and checkpoint (with its training sidecar) and its record."""

    config: Path
    checkpoint: Path
    record: dict[str, Any]


def model_config_path(out: Path) -> Path:
    """The tiny open_clip config every model of the benchmark uses (written once)."""
    path = Path(out) / "tiny-clip.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(tiny_model_config(), indent=1))
    return path


def ensure_base(settings: FinetuneSettings, out: Path, say: Callable[[str], None] = print) -> Base:
    """The cached base of these settings, or a freshly pretrained one (with its retrieval accuracies)."""
    folder = Path(out) / "base"
    config, checkpoint, record_path = model_config_path(out), folder / "base.pt", folder / "base.json"
    if record_path.is_file() and checkpoint.is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == settings.base_key():
            say(f"base: reusing {checkpoint} (retrieval top-1 on A {record['retrieval']['A']['top1']:.3f})")
            return Base(config, checkpoint, record)
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(hash_seed(settings.base_seed, BASE_STREAM))
    vocab_a = VOCABULARIES["A"]
    train_split = write_split(folder / "data", "train", vocab_a, sample_items(vocab_a, settings.base_pairs, rng), rng,
                              prefix="base")
    tests = {name: write_split(folder / "data", f"test_{name}", vocab, sample_items(vocab, settings.base_test, rng), rng)
             for name, vocab in VOCABULARIES.items()}
    say(f"base: pretraining on {settings.base_pairs} clean vocabulary-A pairs for {settings.base_epochs} epochs")
    started = time.perf_counter()
    result = train(train_split.path, config, checkpoint,
                   TrainConfig(epochs=settings.base_epochs, batch_size=settings.batch_size, lr=settings.base_lr,
                               weight_decay=settings.base_weight_decay, seed=settings.base_seed))
    seconds = time.perf_counter() - started
    loaded = load_model(config=config, checkpoint=checkpoint)
    retrieval = {name: retrieval_accuracy(loaded, split, VOCABULARIES[name]) for name, split in tests.items()}
    record = {"key": settings.base_key(), "seconds": seconds, "epoch_seconds": result.epoch_seconds,
              "final_loss_per_pair": result.final_loss, "retrieval": retrieval,
              "note": "one base shared by every cell of both regimes (pretrained once, cached)"}
    record_path.write_text(json.dumps(record, indent=1))
    say(f"base: {seconds:.0f}s, retrieval top-1 on clean vocabulary A {retrieval['A']['top1']:.3f} "
        f"(B, never seen: {retrieval['B']['top1']:.3f})")
    return Base(config, checkpoint, record)
