"""One benchmark run: build a digits set, train a tiny CLIP with `ecif train`'s trainer, audit it.

The audit sees only the run's train.jsonl, val.jsonl and the checkpoint; truth.csv, written by
build_digits next to them, is read by `scoring` alone.
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ecif_core.datasets.digits import DigitsDataset, build_digits
from ecif_core.demo import tiny_model_config
from ecif_core.data.manifest import SIDECAR_SUFFIX
from ecif_core.train import TrainConfig, train
from services.embedded import run_audit

from .settings import QualitySettings


@dataclass
class Run:
    """A trained run: its data set, model config and final checkpoint, with wall times."""

    root: Path
    corruption: str
    fraction: float
    seed: int
    data: DigitsDataset
    config: Path
    checkpoint: Path
    build_seconds: float
    train_seconds: float

    @property
    def sidecar(self) -> dict[str, Any]:
        return json.loads(Path(str(self.checkpoint) + SIDECAR_SUFFIX).read_text())


@dataclass
class AuditRun:
    folder: Path
    seconds: float
    stages: dict[str, float]

    def ranked(self) -> dict[str, dict[str, str]]:
        """ranked.csv's rows by pair id (values as written: text, empty for a missing number)."""
        with (self.folder / "ranked.csv").open(newline="", encoding="utf-8") as handle:
            return {row["id"]: row for row in csv.DictReader(handle)}


def run_name(corruption: str, fraction: float, seed: int) -> str:
    return f"{corruption}-{round(fraction * 100):02d}-s{seed}"


def train_config(settings: QualitySettings, seed: int, exclude: Sequence[str] = (), checkpoints: int = 0) -> TrainConfig:
    return TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                       weight_decay=settings.weight_decay, seed=seed, exclude=tuple(exclude), checkpoints=checkpoints)


def build_and_train(root: Path, settings: QualitySettings, corruption: str, fraction: float, seed: int) -> Run:
    """Fresh folder -> digits with the corruption -> model.pt (+ TracIn checkpoints, listed in its sidecar)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    started = time.perf_counter()
    data = build_digits(root / "data", corruption=corruption, fraction=fraction, seed=seed,
                        n_train=settings.n_train, n_val=settings.n_val, n_test=settings.n_test)
    build_seconds = time.perf_counter() - started
    config = root / "tiny-clip.json"
    config.write_text(json.dumps(tiny_model_config(), indent=1))
    started = time.perf_counter()
    train(data.train, config, root / "model.pt", train_config(settings, seed, checkpoints=settings.checkpoints))
    return Run(root, corruption, fraction, seed, data, config, root / "model.pt", build_seconds,
               time.perf_counter() - started)


def retrain(run: Run, settings: QualitySettings, out: Path, exclude: Sequence[str]) -> tuple[Path, float]:
    """The same recipe from scratch without `exclude` (same seed: same init and partition)."""
    started = time.perf_counter()
    train(run.data.train, run.config, out, train_config(settings, run.seed, exclude))
    return out, time.perf_counter() - started


def audit(run: Run, name: str, options: dict[str, Any], checkpoint: Path | None = None) -> AuditRun:
    """Run the in-process audit of `checkpoint` (default: the run's model) into run.root/audit-<name>."""
    checkpoint = checkpoint or run.checkpoint
    folder = run.root / f"audit-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    manifest = {"model": {"config": str(run.config), "checkpoint": str(checkpoint)},
                "train": str(run.data.train), "validation": str(run.data.validation), "options": options}
    manifest_path = run.root / f"manifest-{name}.json"
    manifest_path.write_text(json.dumps(manifest, indent=1))
    started = time.perf_counter()
    run_audit(manifest_path, folder)
    seconds = time.perf_counter() - started
    return AuditRun(folder, seconds, json.loads((folder / "timing.json").read_text()))


def snapshot_checkpoints(run: Run) -> list[Path]:
    """The intermediate checkpoints the trainer saved (the sidecar lists them relative to its folder,
    last = final epoch)."""
    return [run.checkpoint.parent / p for p in run.sidecar.get("checkpoints", [])]


def existing_run(runs_dir: Path, corruption: str, fraction: float, seed: int) -> Run:
    """A run that `build_and_train` finished earlier (wall times unknown: NaN)."""
    root = runs_dir / run_name(corruption, fraction, seed)
    data_dir = root / "data"
    data = DigitsDataset(root=data_dir, train=data_dir / "train.jsonl", validation=data_dir / "val.jsonl",
                         test=data_dir / "test.jsonl", truth=data_dir / "truth.csv")
    if not (root / "model.pt").is_file():
        raise FileNotFoundError(f"no trained run in {root}")
    return Run(root, corruption, fraction, seed, data, root / "tiny-clip.json", root / "model.pt",
               float("nan"), float("nan"))
