"""Calibration benchmark: is the audit's estimated misaligned fraction right, and does its flag keep its precision?

    python -m bench.calibration --out OUT --digits-seeds 0 1 2        # digits sets (no reference model)
    python -m bench.calibration --out OUT --quality Q                 # + every finished bench.quality cell in Q

Digits (scikit-learn's, through the demo's recipe, tiny CLIP from random init, a clean validation split, no
reference model): 15% systematic class swaps (1<->7, 3<->8, 4<->9), a clean control (0%) and 20% shuffled
captions. The fine-tuning benchmark's cells (bench.quality --regime all) add shapes with a reference model: every
regime, corruption and fraction it ran. Each audit's calibration is recomputed from its store with the current
code (`final_ranking`), so a change of the estimator needs no new audit. Writes OUT/calibration.json and
OUT/CALIBRATION.md; the truth is read only after the estimate is made.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from bench.quality.scoring import truth_labels
from ecif_core.metrics import auroc
from ecif_core.stages import final_ranking

LEARNED_TOP1 = 0.5   # "learned its data": clean-split image-to-text top-1 at least this
ECE_BINS = 10


def evaluate(audit_dir: Path, truth_csv: Path) -> dict[str, Any]:
    """The calibration of one finished audit against its truth file."""
    result = final_ranking(audit_dir)
    summary = result.calibration.summary()
    labels = truth_labels(truth_csv, [p.id for p in result.pairs]).astype(bool)
    flags = result.suspected
    hits = int(labels[flags].sum())
    out: dict[str, Any] = {"pairs": len(labels), "true_fraction": float(labels.mean()), "summary": summary,
                           "flagged": int(flags.sum()), "flagged_fraction": float(flags.mean()),
                           "measured_precision": hits / int(flags.sum()) if flags.any() else None,
                           "measured_recall": hits / int(labels.sum()) if labels.any() else None}
    if 0 < labels.sum() < len(labels):  # the default ranking's AUROC with the current code (not the cell's record)
        position = np.empty(len(labels))
        position[result.order] = np.arange(len(labels))
        out["default_auroc"] = auroc(-position, labels)
    if summary["estimable"]:
        low, high = summary["interval"]
        out["error"] = summary["estimated_misaligned_fraction"] - out["true_fraction"]
        out["covered"] = bool(low - 1e-9 <= out["true_fraction"] <= high + 1e-9)
        out["ece"] = expected_calibration_error(result.calibration.probability, labels)
    return out


def expected_calibration_error(probability: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Binned ECE: sum over equal-width bins of (share of pairs) x |mean probability - share misaligned|."""
    which = np.minimum((probability * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(probability[inside].mean() - labels[inside].mean())
    return float(total)


# ---------------------------------------------------------------------------------------------- digits

DIGITS_SETS = (("swap", 0.15), (None, 0.0), ("shuffle", 0.2))


def digits_cells(out: Path, seeds: Iterable[int]) -> list[dict[str, Any]]:
    """Train and audit each digits set (cached: a finished audit is re-evaluated, not re-run)."""
    from ecif_core.demo import DemoSettings, run_demo
    from services.embedded import run_audit

    cells = []
    for seed in seeds:
        for corruption, fraction in DIGITS_SETS:
            name = f"digits-{corruption or 'clean'}-f{round(fraction * 100):02d}-s{seed}"
            folder = out / "digits" / name
            if not (folder / "audit" / "summary.json").is_file():
                run_demo(folder, DemoSettings(corruption=corruption, fraction=fraction, seed=seed),
                         say=lambda s: None, runner=run_audit)
            top1 = digits_retrieval(folder)
            record = {"name": name, "group": f"digits/{corruption or 'clean'}/{fraction:g}", "seed": seed,
                      "top1": top1, "learned": top1 >= LEARNED_TOP1, "reference": False}
            record.update(evaluate(folder / "audit", folder / "data" / "truth.csv"))
            cells.append(record)
            print(_line(record), flush=True)
    return cells


@torch.no_grad()
def digits_retrieval(folder: Path) -> float:
    """Image-to-text top-1 over the ten class prompts on the clean test split."""
    from PIL import Image

    from ecif_core.datasets.digits import class_prompts, label_of_caption
    from ecif_core.models.factory import load_model

    loaded = load_model(config=folder / "tiny-clip.json", checkpoint=folder / "model.pt")
    rows = [json.loads(line) for line in (folder / "data" / "test.jsonl").read_text().splitlines() if line.strip()]
    images = torch.stack([loaded.preprocess(Image.open(folder / "data" / r["image"]).convert("RGB")) for r in rows])
    text = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(class_prompts())), dim=-1)
    image = torch.nn.functional.normalize(loaded.model.encode_image(images), dim=-1)
    predicted = (image @ text.T).argmax(dim=1).numpy()
    truth = np.array([label_of_caption(r["caption"]) for r in rows])
    return float((predicted == truth).mean())


# ---------------------------------------------------------------------------------------------- shapes

def quality_cells(quality_out: Path) -> list[dict[str, Any]]:
    """Every finished bench.quality fine-tuning cell, re-evaluated."""
    cells = []
    for path in sorted((quality_out / "cells").glob("*.json")):
        record = json.loads(path.read_text())
        folder = path.with_suffix("")
        if not (folder / "audit").is_dir():
            continue
        spec = record["spec"]
        top1 = record["retrieval"]["finetuned"]["top1"]
        cell = {"name": record["name"], "seed": spec["seed"], "split": spec["split"], "top1": top1,
                "learned": top1 >= LEARNED_TOP1, "reference": True,
                "group": f"{spec['regime']}/{spec['corruption'] if spec['fraction'] else 'clean'}/{spec['tuning']}/"
                         f"{spec['fraction']:g}",
                "default_auroc": record["metrics"].get("ranked:rank", {}).get("auroc"),
                "best_baseline": _best_baseline(record["metrics"])}
        cell.update(evaluate(folder / "audit", folder / "truth.csv"))
        cells.append(cell)
        print(_line(cell), flush=True)
    return cells


def _best_baseline(metrics: dict[str, dict[str, float]]) -> list | None:
    found = [(name, m["auroc"]) for name, m in metrics.items() if name.startswith("baseline:") and "auroc" in m]
    return list(max(found, key=lambda kv: kv[1])) if found else None


# ---------------------------------------------------------------------------------------------- tables

def _line(c: dict[str, Any]) -> str:
    s = c["summary"]
    est = "not estimable" if not s["estimable"] else (f"est {s['estimated_misaligned_fraction']:.3f} "
                                                      f"[{s['interval'][0]:.3f}, {s['interval'][1]:.3f}]")
    return (f"{c['name']}: top1 {c['top1']:.2f}; true {c['true_fraction']:.3f}, {est}; flagged {c['flagged']} "
            f"est prec {_f(s['estimated_flag_precision'])} meas {_f(c['measured_precision'])}, "
            f"est rec {_f(s['estimated_flag_recall'])} meas {_f(c['measured_recall'])}; ece {_f(c.get('ece'))}")


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def groups_table(cells: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Markdown rows per group (mean over seeds) and the aggregate figures the issue's targets name."""
    by_group: dict[str, list[dict]] = {}
    for c in cells:
        by_group.setdefault(c["group"] + ("" if c.get("split", "test") == "test" else " (dev)"), []).append(c)
    lines = ["| group | seeds | learned | true | estimate | abs error | covered | flagged | est. precision | "
             "measured precision | est. recall | measured recall | ECE | default - best baseline |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    learned_test = []
    for group, members in sorted(by_group.items()):
        s = [m["summary"] for m in members]
        est = _mean([x["estimated_misaligned_fraction"] for x in s])
        margin = _mean([m["default_auroc"] - m["best_baseline"][1] for m in members
                        if m.get("default_auroc") is not None and m.get("best_baseline")])
        lines.append("| " + " | ".join([
            group, str(len(members)), f"{sum(m['learned'] for m in members)}/{len(members)}",
            _f(_mean([m["true_fraction"] for m in members])), _f(est),
            _f(_mean([abs(m["error"]) for m in members if "error" in m])),
            f"{sum(bool(m.get('covered')) for m in members)}/{len(members)}",
            _f(_mean([m["flagged_fraction"] for m in members])),
            _f(_mean([x["estimated_flag_precision"] for x in s])), _f(_mean([m["measured_precision"] for m in members])),
            _f(_mean([x["estimated_flag_recall"] for x in s])), _f(_mean([m["measured_recall"] for m in members])),
            _f(_mean([m.get("ece") for m in members])), "-" if margin is None else f"{margin:+.3f}"]) + " |")
        if not group.endswith("(dev)") and all(m["learned"] for m in members):
            learned_test.extend(members)
    estimable = [m for m in learned_test if "error" in m]
    aggregate = {"learned_test_cells": len(learned_test), "estimable": len(estimable),
                 "mean_abs_error": _mean([abs(m["error"]) for m in estimable]),
                 "coverage": _mean([float(m["covered"]) for m in estimable]),
                 "mean_ece": _mean([m["ece"] for m in estimable]),
                 # a clean control's flags are all wrong by construction: its bar is the share flagged, below
                 "precision_gap": _mean([abs(m["summary"]["estimated_flag_precision"] - m["measured_precision"])
                                         for m in estimable if m["measured_precision"] is not None
                                         and m["summary"]["estimated_flag_precision"] is not None
                                         and m["true_fraction"] > 0]),
                 "clean_max_estimate": max((m["summary"]["estimated_misaligned_fraction"] for m in estimable
                                            if m["true_fraction"] == 0), default=None),
                 "clean_max_flagged_fraction": max((m["flagged_fraction"] for m in learned_test
                                                    if m["true_fraction"] == 0), default=None)}
    return "\n".join(lines), aggregate


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out/calibration")
    parser.add_argument("--digits-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--quality", default=None, help="a bench.quality --regime all output folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells = digits_cells(out, args.digits_seeds)
    if args.quality:
        cells += quality_cells(Path(args.quality))
    table, aggregate = groups_table(cells)
    (out / "calibration.json").write_text(json.dumps({"cells": cells, "aggregate": aggregate}, indent=1, default=str))
    text = f"{table}\n\nLearned test groups: {json.dumps(aggregate)}\n"
    (out / "CALIBRATION.md").write_text(text)
    print(text)
    return aggregate


if __name__ == "__main__":
    main()
