"""The demo: digits with misaligned captions -> tiny CLIP -> audit -> detection figures.

Shared by `ecif demo`, the test suite (at reduced size) and the benchmarks, so the numbers a
user sees in the demo are produced by the same code the benchmark reports.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from ecif_core.stages import Progress
from .datasets.digits import build_digits, read_truth
from ecif_core.metrics import detection_report
from ecif_core.train import TrainConfig, train


def tiny_model_config() -> dict[str, Any]:
    """The bundled tiny open_clip config (random init, trains in seconds on a CPU)."""
    return json.loads(resources.files("ecif_core.configs").joinpath("tiny-clip.json").read_text())


@dataclass
class DemoSettings:
    fraction: float = 0.2
    corruption: str = "shuffle"
    seed: int = 0
    n_train: int | None = None
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-2
    options: dict[str, Any] | None = None


@dataclass
class DemoResult:
    ranked_csv: Path
    report: dict[str, dict[str, float]]   # method -> detection metrics
    flags: dict[str, float]               # the suspected flag: flagged, precision, recall
    train_seconds: float
    epoch_seconds: float
    audit_seconds: float


AuditRunner = Callable[[Path, Path, "Progress | None"], Path]


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(),
             say: Callable[[str], None] = print, progress: Progress | None = None, *,
             runner: AuditRunner) -> DemoResult:
    """Build digits, train, audit with `runner(manifest, audit_dir, progress)` (the orchestrator lives in
    services: the CLI and the benchmarks pass services.embedded.run_audit; ecif_core imports no service), evaluate."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"building digits ({settings.fraction:.0%} {settings.corruption} captions) in {out / 'data'}")
    data = build_digits(out / "data", corruption=settings.corruption, fraction=settings.fraction,
                        seed=settings.seed, n_train=settings.n_train)
    config_path = out / "tiny-clip.json"
    config_path.write_text(json.dumps(tiny_model_config(), indent=1))
    say(f"training a tiny CLIP for {settings.epochs} epochs")
    started = time.perf_counter()
    trained = train(data.train, config_path, out / "model.pt",
                    TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                                weight_decay=settings.weight_decay, seed=settings.seed))
    train_seconds = time.perf_counter() - started
    manifest = {"model": {"config": "tiny-clip.json", "checkpoint": "model.pt"},
                "train": "data/train.jsonl", "validation": "data/val.jsonl", "options": settings.options or {}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    say("auditing")
    started = time.perf_counter()
    ranked = runner(out / "manifest.json", out / "audit", progress)
    audit_seconds = time.perf_counter() - started
    return DemoResult(ranked, evaluate_ranking(ranked, data.truth), evaluate_flags(ranked, data.truth), train_seconds,
                      sum(trained.epoch_seconds) / len(trained.epoch_seconds), audit_seconds)


def _rows_and_labels(ranked_csv: Path, truth_csv: Path) -> tuple[list[dict], list[int]]:
    truth = read_truth(truth_csv)
    with Path(ranked_csv).open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return rows, [int(truth[r["id"]]) for r in rows]


def evaluate_ranking(ranked_csv: Path, truth_csv: Path) -> dict[str, dict[str, float]]:
    """Detection metrics of the audit's ranking and of the columns users compare it with."""
    rows, labels = _rows_and_labels(ranked_csv, truth_csv)
    if not any(labels):
        return {}  # a clean control: nothing to detect
    n = len(rows)
    methods = {
        "ecif (default ranking)": [float(n - int(r["rank"])) for r in rows],
        "self_influence": [float(r["self_influence"]) for r in rows],
        "clip_score (lowest first)": [-float(r["clip_score"]) for r in rows],
    }
    if rows and rows[0]["influence"]:
        methods["influence (most negative first)"] = [-float(r["influence"]) for r in rows]
        methods["influence_pos only"] = [-float(r["influence_pos"]) for r in rows]
    return {name: detection_report(scores, labels) for name, scores in methods.items()}


def evaluate_flags(ranked_csv: Path, truth_csv: Path) -> dict[str, float]:
    """How many pairs suspected=true marks, and their precision and recall against the truth."""
    rows, labels = _rows_and_labels(ranked_csv, truth_csv)
    flagged = [label for row, label in zip(rows, labels) if row["suspected"] == "true"]
    return {"flagged": float(len(flagged)), "precision": sum(flagged) / len(flagged) if flagged else float("nan"),
            "recall": sum(flagged) / max(1, sum(labels))}
