"""bench.fix's RESULTS.md from results.json's content (bench.fix.tables)."""
from __future__ import annotations

from typing import Any


def _f(value: float | None, digits: int = 2, signed: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    lines = ["# bench.fix: acting on a list (clean test split; deltas against the audited fine-tune)", "",
             "```", results["command"], "```", "",
             f"{results['cells']} cells whose fine-tune learned its data (clean i2t top-1 >= 0.5). i2t / t2i: top-1 "
             "accuracy change in points; loss: mean clean test loss change (negative = better); s: wall seconds of "
             "the action.", ""]
    if results["not_learned"]:
        lines += ["Left out, the fine-tune did not learn its data (clean i2t top-1): " + ", ".join(
            f"{name} {top1:.2f}" for name, top1 in sorted(results["not_learned"].items())), ""]
    for group, entries in sorted(results["groups"].items()):
        noise = results["noise"].get(group)
        lines += [f"## {group} (retrain-vs-retrain noise in i2t: {_f(noise, signed=False)} points)", "",
                  "| list | action | pairs | corrupted | i2t | t2i | loss | s | seeds |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for key, v in sorted(entries.items()):
            lst, action = key.split(" / ")
            lines.append(f"| {lst} | {action} | {v['pairs']:.0f} | {v['corrupted']:.2f} | {_f(v['i2t'])} | "
                         f"{_f(v['t2i'])} | {_f(v['loss'], 3)} | {v['seconds']:.1f} | {v['seeds']} |")
        lines.append("")
    lines += ["## Decision table", "",
              "| group | best (list, action) | i2t | cheapest within the noise of the best | i2t | s |",
              "| --- | --- | --- | --- | --- | --- |"]
    for group, d in sorted(results["decision"].items()):
        lines.append(f"| {group} | {' '.join(d['best'])} | {_f(d['best_i2t'])} | {' '.join(d['cheapest_near_best'])} | "
                     f"{_f(d['cheapest_i2t'])} | {d['cheapest_seconds']:.1f} |")
    choice = results.get("recommended")
    lines += ["", f"Recommended (among the audit's lists and every action within the mean noise of the best mean i2t "
                  f"over the corrupted groups, retraining without the list when it is there): "
                  f"{' on '.join(reversed(choice)) if choice else '-'}", "",
              "## The edit against retraining (same list, same verb)", "",
              "| cell | list | verb | edit i2t | retrain i2t | gap | time ratio | matches | verdict retrain |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in results["edit_gaps"]:
        lines.append(f"| {g['cell']} | {g['list']} | {g['verb']} | {_f(g['edit_i2t'])} | {_f(g['retrain_i2t'])} | "
                     f"{g['gap']:.2f} | {g['time_ratio']:.2f} | {g['matches_retraining']} | {g['retrain_recommended']} |")
    p = results.get("preview")
    if p:
        lines += ["", f"The report's removal preview (sum of stored influence, validation loss) against retraining's "
                      f"clean test-loss change: signs agree in {p['signs_agree']} of {p['lists']} lists, Pearson "
                      f"{'-' if p['pearson'] is None else format(p['pearson'], '.2f')}."]
    lines += ["", "## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in results["targets"]]
    return "\n".join(lines) + "\n"
