"""Aggregation of finished cells into results.json and RESULTS.md (works on a partial grid too).

Tables: per regime x fraction x (corruption, tuning), mean ± sd over the test seeds of AUROC, AP and P@k for
every score; the same for the development seeds, separately; the retrieval accuracies (base and fine-tuned,
clean split of the fine-tuning domain); the cost of each step, in seconds and in fine-tunes.
"""
from __future__ import annotations

import statistics
from typing import Any, Iterable, Sequence

Group = tuple[str, str, str, float]  # regime, corruption, tuning, fraction
PK = "p@50"


def _mean_sd(values: Sequence[float]) -> list[float | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return [None, None]
    return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None]


def groups(records: Iterable[dict], split: str) -> dict[Group, list[dict]]:
    out: dict[Group, list[dict]] = {}
    for r in records:
        s = r["spec"]
        if s["split"] == split:
            out.setdefault((s["regime"], s["corruption"], s["tuning"], s["fraction"]), []).append(r)
    return dict(sorted(out.items()))


def summarise(records: list[dict], split: str) -> dict[str, Any]:
    """{"regime/corruption/tuning/fraction": {"seeds", "scores": {score: {metric: [mean, sd]}}, "retrieval"}}."""
    out = {}
    for (regime, corruption, tuning, fraction), cells in groups(records, split).items():
        names = sorted({n for c in cells for n in c["metrics"]})
        per_score = {}
        for name in names:
            reports = [c["metrics"][name] for c in cells if name in c["metrics"]]
            metrics = sorted({m for rep in reports for m in rep if m != "non_finite"})
            per_score[name] = {m: _mean_sd([rep.get(m) for rep in reports]) for m in metrics}
            per_score[name]["cells"] = len(reports)
        out[f"{regime}/{corruption}/{tuning}/{fraction}"] = {
            "seeds": sorted(c["spec"]["seed"] for c in cells), "scores": per_score,
            "retrieval_finetuned_top1": _mean_sd([c["retrieval"]["finetuned"]["top1"] for c in cells]),
            "retrieval_base_top1": _mean_sd([c["retrieval"]["base"]["top1"] for c in cells]),
            "n_corrupted": [c["n_corrupted"] for c in cells], "n_pairs": [c["n_pairs"] for c in cells]}
    return out


DEFAULT = "rank_by:evidence"
CROSSFIT = "baseline:clip_score_crossfit"


def targets(records: list[dict], out_dir: str | None, split: str = "test") -> list[dict[str, Any]]:
    """Per group of the split: the default ranking against the best single baseline and cross-fitting
    (the issue's targets: default >= best baseline + 0.02 where any score is above 0.6 AUROC, and
    >= 0.95 of cross-fitting's AUROC at <= 1/3 of its cost), the retrieval accuracy and the flags."""
    from pathlib import Path

    from .evaluate import flag_metrics

    rows = []
    for (regime, corruption, tuning, fraction), cells in groups(records, split).items():
        def mean(name: str) -> float | None:
            values = [c["metrics"][name]["auroc"] for c in cells if name in c["metrics"]]
            return statistics.mean(values) if values else None
        baselines = {n for c in cells for n in c["metrics"] if n.startswith("baseline:") and n != CROSSFIT}
        if not baselines:
            continue  # a clean control (0% corrupted): nothing to detect; bench.calibration reads its flags
        best = max(baselines, key=lambda n: mean(n) or 0.0)
        every = [mean(n) for c in cells[:1] for n in c["metrics"]]
        flags = [flag_metrics(Path(out_dir) / "cells" / c["name"]) for c in cells] if out_dir else []
        crossfit_cost = [c["timings"]["crossfit"] for c in cells if "crossfit" in c["timings"]]
        audit_cost = [c["timings"]["audit"] for c in cells if "crossfit" in c["timings"]]
        rows.append({
            "group": f"{regime}/{corruption}/{tuning}/{fraction}", "seeds": sorted(c["spec"]["seed"] for c in cells),
            "default": _mean_sd([c["metrics"][DEFAULT]["auroc"] for c in cells if DEFAULT in c["metrics"]]),
            "best_baseline": best.split(":", 1)[1], "best_baseline_auroc": _mean_sd(
                [c["metrics"][best]["auroc"] for c in cells if best in c["metrics"]]),
            "crossfit": _mean_sd([c["metrics"][CROSSFIT]["auroc"] for c in cells if CROSSFIT in c["metrics"]]),
            "any_above_0.6": any(v is not None and v > 0.6 for v in every),
            "audit_over_crossfit_cost": (statistics.mean(audit_cost) / statistics.mean(crossfit_cost)
                                         if crossfit_cost else None),
            "retrieval_finetuned_top1": _mean_sd([c["retrieval"]["finetuned"]["top1"] for c in cells]),
            "flagged": _mean_sd([f["flagged"] for f in flags]), "precision": _mean_sd([f["precision"] for f in flags
                                                                                      if f["precision"] == f["precision"]]),
        })
    return rows


def targets_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Targets: default ranking vs the best baseline and cross-fitting (test seeds)", "",
             "Default = `rank_by: evidence` (chosen on the development seeds). Best baseline = the best single "
             "baseline of the group on these test seeds (an oracle choice a user cannot make), cross-fitting "
             "excluded; margin target +0.02 where any score is above 0.6 AUROC. Cross-fitting: K = 5 fine-tunes "
             "on 4/5 of the pairs; its cost against the audit's (which includes the reference scores). "
             "`suspected`: flagged share of the pairs and its precision.", "",
             "| group | fine-tuned retrieval | default AUROC | best baseline | margin | cross-fit AUROC | default / cross-fit "
             "| audit / cross-fit cost | flagged | precision |",
             "| --- |" + " --- |" * 9]
    for r in rows:
        d, b, x = r["default"][0], r["best_baseline_auroc"][0], r["crossfit"][0]
        margin = "–" if d is None or b is None else f"{d - b:+.3f}" + ("" if r["any_above_0.6"] else " (all <= 0.6)")
        ratio = "–" if d is None or x is None else f"{d / x:.3f}"
        cost = "–" if r["audit_over_crossfit_cost"] is None else f"{r['audit_over_crossfit_cost']:.2f}"
        lines.append(f"| {r['group']} | {_fmt(r['retrieval_finetuned_top1'])} | {_fmt(r['default'])} | "
                     f"{r['best_baseline']} {_fmt(r['best_baseline_auroc'])} | {margin} | {_fmt(r['crossfit'])} | "
                     f"{ratio} | {cost} | {_fmt(r['flagged'])} | {_fmt(r['precision'])} |")
    return lines + [""]


def cost_summary(records: list[dict]) -> dict[str, Any]:
    """Per regime/tuning: mean seconds of each timed step and its multiple of the cell's own fine-tune."""
    out: dict[str, Any] = {}
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(f"{r['spec']['regime']}/{r['spec']['tuning']}", []).append(r)
    for key, cells in sorted(by.items()):
        steps = sorted({k for c in cells for k in c["timings"]})
        out[key] = {step: {"seconds": _mean_sd([c["timings"][step] for c in cells if step in c["timings"]]),
                           "finetunes": _mean_sd([c["cost_in_finetunes"][step] for c in cells
                                                  if step in c["cost_in_finetunes"]]),
                           "cells": sum(step in c["timings"] for c in cells)} for step in steps}
    return out


def _fmt(pair: Sequence[float | None], digits: int = 3) -> str:
    mean, sd = pair
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _score_label(name: str) -> str:
    kind, _, column = name.partition(":")
    return {"ranked": f"`{column}` (ranked.csv)", "rank_by": f"rank_by `{column}`",
            "baseline": f"{column} (benchmark)"}.get(kind, name)


def detection_tables(summary: dict[str, Any], title: str) -> list[str]:
    """Per regime and fraction: rows = scores, columns = corruption/tuning with AUROC, AP, P@50."""
    lines = [f"## {title}", ""]
    by_rf: dict[tuple[str, str], dict[str, Any]] = {}
    for key, cell in summary.items():
        regime, corruption, tuning, fraction = key.split("/")
        by_rf.setdefault((regime, fraction), {})[f"{corruption}/{tuning}"] = cell
    for (regime, fraction), columns in sorted(by_rf.items()):
        heads = sorted(columns)
        seeds = sorted({s for c in columns.values() for s in c["seeds"]})
        lines += [f"### {regime}, {float(fraction):.0%} corrupted (seeds {seeds})", "",
                  "AUROC / AP / P@50, mean ± sd over seeds; higher = better at finding corrupted pairs.", "",
                  "| score | " + " | ".join(heads) + " |", "| --- |" + " --- |" * len(heads)]
        names = sorted({n for c in columns.values() for n in c["scores"]})
        for name in names:
            row = []
            for head in heads:
                s = columns[head]["scores"].get(name)
                row.append("–" if s is None else
                           f"{_fmt(s['auroc'])} / {_fmt(s['ap'])} / {_fmt(s.get(PK, [None, None]), 2)}")
            lines.append(f"| {_score_label(name)} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def retrieval_table(summary_test: dict[str, Any], summary_dev: dict[str, Any], base: dict[str, Any]) -> list[str]:
    lines = ["## Retrieval accuracy (clean image-to-text top-1 over the 16 class prompts)", "",
             f"Base (one base shared by every cell, pretrained once): vocabulary A {base['A']['top1']:.3f}, "
             f"vocabulary B (never seen) {base['B']['top1']:.3f}; chance {base['A']['chance_top1']:.3f}.", "",
             "| seeds | regime / corruption / tuning / fraction | base on this split | fine-tuned |",
             "| --- | --- | --- | --- |"]
    for split, summary in (("test", summary_test), ("dev", summary_dev)):
        for key, cell in summary.items():
            lines.append(f"| {split} {cell['seeds']} | {key} | {_fmt(cell['retrieval_base_top1'])} | "
                         f"{_fmt(cell['retrieval_finetuned_top1'])} |")
    return lines + [""]


def cost_table(costs: dict[str, Any]) -> list[str]:
    lines = ["## Cost per cell (wall seconds, and multiples of the cell's own fine-tune)", ""]
    for key, steps in costs.items():
        lines += [f"### {key}", "", "| step | seconds | x fine-tune | cells |", "| --- | --- | --- | --- |"]
        for step, v in steps.items():
            lines.append(f"| {step} | {_fmt(v['seconds'], 1)} | {_fmt(v['finetunes'], 2)} | {v['cells']} |")
        lines.append("")
    return lines


def markdown(results: dict[str, Any]) -> str:
    done, total = results["cells_finished"], results["cells_total"]
    lines = ["# Fine-tuning benchmark (synthetic shapes, tiny CLIP)", "",
             f"`{results['command']}` — {done} of {total} cells finished"
             + (" (partial: the tables hold the finished cells only)" if done < total else "") + ".", "",
             "The audited models are fine-tunes of one base (pretrained once on clean vocabulary-A pairs and "
             "shared by every cell, for cost). `same_domain` fine-tunes on new vocabulary-A images, `domain_shift` "
             "on vocabulary B, which the base never saw. Scores are oriented so that higher = more suspicious: "
             "ranked.csv columns by `ecif_core.edit.removal.SUSPICION_SIGN`, baselines as in "
             "`bench/quality/finetune/scores.py`.", ""]
    if results.get("errors"):
        lines += ["Failed cells: " + ", ".join(f"{k} ({v})" for k, v in results["errors"].items()), ""]
    lines += targets_table(results.get("targets", []))
    lines += detection_tables(results["test"], "Test seeds")
    lines += detection_tables(results["dev"], "Development seeds")
    lines += retrieval_table(results["test"], results["dev"], results["base"]["retrieval"])
    lines += cost_table(results["cost"])
    return "\n".join(lines) + "\n"
