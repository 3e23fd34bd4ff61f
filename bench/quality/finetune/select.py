"""Choose the default ranking on the development seeds: every candidate rule, re-ranked from the
cells' finished audits (no gradient recomputed), scored against the truth; the test seeds are not read.

    python -m bench.quality.finetune.select --out /work/bench-out/finetune [--split dev]

Candidates are the product's own ranking rules (`ecif_core.stages.misalignment_columns`), the
evidence-weighted variants below (the default, `evidence`, is the one chosen here: clip_score_loo with
z-scores and weights 2 AUROC - 1) and, for comparison, the benchmark's baselines from each cell's scores.npz.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

import torch

from ecif_core.stages import audit_evidence, collect_scores, misalignment_columns
from ecif_core.ranking import DEFAULT_RANK_BY, EVIDENCE_RULE, evidence_weighted

from .evaluate import detection, truth_labels
from .scores import aligned


# Variants the default was chosen from: (audited column, weight power, "rank" or "z").
VARIANTS: dict[str, tuple[str, float, str]] = {
    "evidence_self_rank": ("self_influence", 1.0, "rank"),
    "evidence_self_rank_sq": ("self_influence", 2.0, "rank"),
    "evidence_self_z": ("self_influence", 1.0, "z"),
    "evidence_clip_rank": ("self_influence_clip", 1.0, "rank"),
    "evidence_loo_rank": ("clip_score_loo", 1.0, "rank"),
    "evidence_loo_z": ("clip_score_loo", 1.0, "z"),
    "evidence_loo_z_sq": ("clip_score_loo", 2.0, "z"),
}


def cell_candidates(folder: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(ids, {candidate: score}) of one finished cell: the product's rules, the variants and the
    saved baselines."""
    ids, rules = misalignment_columns(folder / "audit")
    saved = np.load(folder / "scores.npz")
    saved_ids = [str(i) for i in saved["ids"]]
    out = {f"rank_by:{name}": values for name, values in rules.items()}
    pairs, columns = collect_scores(folder / "audit")
    assert [p.id for p in pairs] == list(ids)
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in columns.items()}
    evidence = audit_evidence(folder / "audit")
    for name, rule in VARIANTS.items():
        out[f"variant:{name}"] = evidence_weighted(tensors, *rule, evidence).numpy()
    # what the default gives a user with fewer inputs: no validation set (no evidence: equal weights);
    # without a reference it is clip_score_loo alone (rank_by:clip_score_loo)
    out["inputs:no_validation"] = evidence_weighted(tensors, *EVIDENCE_RULE, None).numpy()
    # the aggregations of the per-example validation influence (the product keeps the harmful parts)
    for name in ("influence_per_example", "influence_per_example_mean", "influence_per_example_min"):
        if not np.isnan(columns[name]).all():
            out[f"aggregation:{name}"] = -np.asarray(columns[name], dtype=np.float64)
    for key in saved.files:
        if key.startswith("baseline__"):
            out[key.replace("__", ":")] = aligned(saved[key], saved_ids, ids)
    return ids, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality.finetune.select", description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="dev", choices=["dev", "test"])
    parser.add_argument("--top", type=int, default=14, help="candidates listed per group")
    parser.add_argument("--flag-rules", nargs="*", default=[DEFAULT_RANK_BY],
                        help="z-scaled rules whose threshold the suspected flag could use")
    parser.add_argument("--thresholds", nargs="*", type=float, default=[1.5, 2.0, 2.5, 3.0, 3.5])
    args = parser.parse_args(argv)
    table: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    flags: dict[tuple, list[tuple[float, float, float]]] = defaultdict(list)
    for record_path in sorted((Path(args.out) / "cells").glob("*.json")):
        record = json.loads(record_path.read_text())
        spec = record["spec"]
        if spec["split"] != args.split:
            continue
        folder = record_path.with_suffix("")
        ids, candidates = cell_candidates(folder)
        labels = truth_labels(folder / "truth.csv", ids)
        metrics = detection(candidates, labels, [])
        group = (spec["regime"], spec["corruption"], spec["tuning"], spec["fraction"])
        for name, m in metrics.items():
            table[group][name].append(m["auroc"])
        for name in args.flag_rules:
            values = candidates.get(f"rank_by:{name}")
            if values is None:
                continue
            for z in args.thresholds:
                flagged = values > z
                precision = float(labels[flagged].mean()) if flagged.any() else float("nan")
                flags[(group, name, z)].append((float(flagged.mean()), precision, float(labels[flagged].sum() / max(labels.sum(), 1))))
    overall: dict[str, list[float]] = defaultdict(list)
    for group, scores in sorted(table.items()):
        print(" ".join(map(str, group)))
        for name, values in sorted(scores.items(), key=lambda kv: -np.mean(kv[1]))[:args.top]:
            print(f"   {name:48s} {np.mean(values):.3f} ({len(values)})")
        best_baseline = max(np.mean(v) for n, v in scores.items() if n.startswith("baseline:"))
        for name, values in scores.items():
            overall[name].append(np.mean(values) - best_baseline)
    print("flag: (flagged fraction, precision, recall) mean over seeds")
    for (group, name, z), values in sorted(flags.items()):
        frac, prec, rec = (np.nanmean([v[i] for v in values]) for i in range(3))
        print(f"   {' '.join(map(str, group)):40s} {name:16s} z>{z:<4} flagged {frac:.3f} precision {prec:.3f} recall {rec:.3f}")
    print("mean margin over the best baseline of each group (min):")
    for name, margins in sorted(overall.items(), key=lambda kv: -np.mean(kv[1]))[:20]:
        print(f"   {name:48s} {np.mean(margins):+.3f} (min {np.min(margins):+.3f})")


if __name__ == "__main__":
    main()
