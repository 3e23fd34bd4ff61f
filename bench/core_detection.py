"""Benchmark for the ecif_core issue: detection of shuffled captions on digits, and audit cost.

    python -m bench.core_detection --seeds 0 1 2 [--out bench/out/core]

For each seed: digits with 20% shuffled captions -> tiny CLIP trained with the deterministic
trainer (30 epochs) -> audit with default options and the clean validation split -> AUROC,
average precision and precision@50 of each ranking against the hidden truth, and the audit's
wall time divided by one training epoch's wall time, measured in the same run. Prints a
markdown table for bench/RESULTS.md and writes the raw numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ecif_core.stages import collect_scores  # noqa: E402
from ecif_core.datasets.digits import read_truth  # noqa: E402
from ecif_core.demo import DemoSettings, evaluate_ranking, run_demo  # noqa: E402
from ecif_core.metrics import detection_report  # noqa: E402
from services.embedded import run_audit  # noqa: E402


def run_seed(out: Path, seed: int, epochs: int, options: dict | None) -> dict:
    result = run_demo(out, DemoSettings(seed=seed, epochs=epochs, options=options), say=lambda _: None,
                      runner=run_audit)
    report = evaluate_ranking(result.ranked_csv, out / "data" / "truth.csv")
    flags = result.flags
    pairs, columns = collect_scores(out / "audit")
    truth = read_truth(out / "data" / "truth.csv")
    labels = [int(truth[p.id]) for p in pairs]
    report["own loss Pos(n) (highest first)"] = detection_report(columns["pos_terms"], labels)
    timing = json.loads((out / "audit" / "timing.json").read_text())
    return {"seed": seed, "report": report, "flags": flags, "epoch_seconds": result.epoch_seconds,
            "train_seconds": result.train_seconds, "audit_seconds": result.audit_seconds, "stages": timing,
            "audit_over_epoch": result.audit_seconds / result.epoch_seconds}


def markdown(runs: list[dict]) -> str:
    methods = list(runs[0]["report"])
    lines = ["| ranking | AUROC | AP | P@50 |", "| --- | --- | --- | --- |"]
    for method in methods:
        cells = []
        for metric in ("auroc", "ap", "p@50"):
            values = [r["report"][method][metric] for r in runs]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{spread}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("suspected=true flags: " + "; ".join(
        f"seed {r['seed']}: {r['flags']['flagged']:.0f} flagged, precision {r['flags']['precision']:.2f}, "
        f"recall {r['flags']['recall']:.2f}" for r in runs))
    ratios = [r["audit_over_epoch"] for r in runs]
    stages = {k: statistics.mean(r["stages"][k] for r in runs) for k in runs[0]["stages"]}
    lines.append("")
    lines.append(f"Audit wall time / one training epoch: {statistics.mean(ratios):.1f} "
                 f"(per seed: {', '.join(f'{x:.1f}' for x in ratios)}); mean epoch "
                 f"{statistics.mean(r['epoch_seconds'] for r in runs):.2f} s, mean audit "
                 f"{statistics.mean(r['audit_seconds'] for r in runs):.1f} s; stages (s): "
                 + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--options", type=json.loads, default=None, help="audit options as JSON")
    parser.add_argument("--out", default="bench/out/core")
    args = parser.parse_args()
    out = Path(args.out)
    runs = []
    for seed in args.seeds:
        started = time.perf_counter()
        runs.append(run_seed(out / f"seed{seed}", seed, args.epochs, args.options))
        print(f"seed {seed} done in {time.perf_counter() - started:.0f}s", flush=True)
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    print(markdown(runs))


if __name__ == "__main__":
    main()
