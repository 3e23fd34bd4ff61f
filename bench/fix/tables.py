"""bench.fix's tables: what each action on each list did to the clean model, the edit's gap to retraining,
demotion against removal, the decision table and the issue's targets. Numbers in points are percentage
points of clean top-1 accuracy; deltas are against the audited fine-tune (`original`)."""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Iterable, Sequence

from bench.calibration import LEARNED_TOP1  # the one "learned its data" threshold (issue 23)
from ecif_core.edit.certificate import RETRAIN, contradicts

AUDIT_LISTS = ("suspected", "audit_top10", "audit_top20", "audit_estimated")
POINTS = 100.0
# each audit list and the list of the base model's lowest CLIPScores of the same size (the comparison)
SAME_SIZE = {"suspected": "reference_low_n", "audit_estimated": "reference_low_m", "audit_top10": "reference_low10",
             "audit_top20": "reference_low20"}


def _mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def organise(records: Sequence[dict]) -> dict[str, dict]:
    """{cell: {"spec", "original", "noises": [records], "acts": {(list, action): record}}} from the flat records."""
    cells: dict[str, dict] = defaultdict(lambda: {"acts": {}, "noises": []})
    for r in records:
        cell = cells[r["cell"]]
        if "spec_of_cell" in r:
            cell["spec"] = r["spec_of_cell"]
        if "list" in r:
            cell["acts"][(r["list"], r["action"])] = r
        elif r["name"].startswith("noise"):
            cell["noises"].append(r)
        else:
            cell[r["name"]] = r
    return {name: c for name, c in cells.items() if "original" in c}


def group_of(spec: dict) -> str:
    clean = spec["fraction"] == 0
    return (f"{spec['regime']} {spec['tuning']} " + ("clean control" if clean else
                                                      f"{spec['corruption']} {round(spec['fraction'] * 100)}%"))


def deltas(cell: dict, act: dict) -> dict[str, float]:
    base, m = cell["original"]["metrics"], act["metrics"]
    return {"i2t": (m["i2t_top1"] - base["i2t_top1"]) * POINTS, "t2i": (m["t2i_top1"] - base["t2i_top1"]) * POINTS,
            "loss": m["test_loss"] - base["test_loss"]}


def noise_points(cell: dict) -> float | None:
    """Mean |i2t difference| in points between two retrainings that differ only in seed: over every pair of
    the original fine-tune and its noise retrainings."""
    top1 = [r["metrics"]["i2t_top1"] for r in [cell["original"], *cell["noises"]]]
    gaps = [abs(a - b) * POINTS for i, a in enumerate(top1) for b in top1[i + 1:]]
    return statistics.fmean(gaps) if gaps else None


def edit_gaps(cells: dict[str, dict]) -> list[dict]:
    """Per (cell, list, verb) with both an edit and a retraining: the i2t gap, time ratio, verdict, match."""
    rows = []
    for name, cell in cells.items():
        for (lst, action), edit in cell["acts"].items():
            how, verb = action.split(":")
            retrain = cell["acts"].get((lst, f"retrain:{verb}"))
            if how != "edit" or "metrics" not in edit or retrain is None or "metrics" not in retrain:
                continue
            de, dr = deltas(cell, edit), deltas(cell, retrain)
            rows.append({"cell": name, "group": group_of(cell["spec"]), "list": lst, "verb": verb,
                         "gap": abs(de["i2t"] - dr["i2t"]), "edit_i2t": de["i2t"], "retrain_i2t": dr["i2t"],
                         "time_ratio": edit["seconds"] / retrain["seconds"],
                         "matches_retraining": not contradicts(dr["loss"], de["loss"]),
                         "contradicts_itself": _contradicts_itself(edit),
                         "retrain_recommended": edit.get("verdict") == RETRAIN})
    return rows


def _contradicts_itself(edit: dict) -> bool | None:
    """Whether the edit's measured clean-test change contradicts its own first-order prediction there (the
    certificate's rule, read on data the verdict never saw); None for a record from before it was measured."""
    held_out = edit.get("held_out")
    if held_out is None:
        return None
    return contradicts(held_out["predicted_change"], held_out["actual_change"])


def by_group(cells: dict[str, dict]) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    """{group: {(list, action): mean deltas, seconds, pairs, corrupted share, seeds}}."""
    collected: dict[str, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    for cell in cells.values():
        for key, act in cell["acts"].items():
            if "metrics" in act:
                collected[group_of(cell["spec"])][key].append((deltas(cell, act), act))
    out: dict[str, dict] = {}
    for group, entries in collected.items():
        out[group] = {key: {"i2t": _mean(d["i2t"] for d, _ in rows), "t2i": _mean(d["t2i"] for d, _ in rows),
                            "loss": _mean(d["loss"] for d, _ in rows), "seconds": _mean(a["seconds"] for _, a in rows),
                            "pairs": _mean(a["pairs"] for _, a in rows),
                            "corrupted": _mean(a["corrupted_share"] for _, a in rows), "seeds": len(rows)}
                      for key, rows in entries.items()}
    return out


def decision(groups: dict[str, dict], noise: dict[str, float | None]) -> dict[str, dict]:
    """Per group: the best (list, action) by clean i2t, and the cheapest within the group's noise of it."""
    out = {}
    for group, entries in groups.items():
        if not entries:
            continue
        best = max(entries, key=lambda k: entries[k]["i2t"])
        slack = noise.get(group) or 0.0
        near = [k for k in entries if entries[k]["i2t"] >= entries[best]["i2t"] - slack]
        cheapest = min(near, key=lambda k: entries[k]["seconds"])
        out[group] = {"best": best, "best_i2t": entries[best]["i2t"], "cheapest_near_best": cheapest,
                      "cheapest_i2t": entries[cheapest]["i2t"], "cheapest_seconds": entries[cheapest]["seconds"],
                      "noise": slack}
    return out


def recommended(groups: dict[str, dict], noise: dict[str, float | None]) -> tuple[str, str] | None:
    """The product's recommendation: among the audit's lists and every action, those whose mean clean i2t over
    the corrupted groups is within the mean noise of the best; of them, retraining without the list (any trainer
    can do it) when one is there, else the best."""
    scores: dict[tuple, list[float]] = defaultdict(list)
    for group, entries in groups.items():
        if "clean control" in group:
            continue
        for key, v in entries.items():
            if key[0] in AUDIT_LISTS:
                scores[key].append(v["i2t"])
    if not scores:
        return None
    means = {k: statistics.fmean(v) for k, v in scores.items() if len(v) == max(map(len, scores.values()))}
    slack = _mean(v for g, v in noise.items() if "clean control" not in g) or 0.0
    near = [k for k in means if means[k] >= max(means.values()) - slack]
    simplest = [k for k in near if k[1] == "retrain:remove"] or near
    return max(simplest, key=means.__getitem__)


def preview_agreement(cells: dict[str, dict]) -> dict[str, Any] | None:
    """The report's removal preview (predicted validation-loss change) against retraining's clean test-loss
    change, over every (cell, list) retrained without the list: sign agreement and Pearson correlation."""
    rows = [(act["preview_change"], deltas(cell, act)["loss"]) for cell in cells.values()
            for (lst, action), act in cell["acts"].items()
            if action == "retrain:remove" and "metrics" in act and act.get("preview_change") is not None]
    if len(rows) < 2:
        return None
    predicted, measured = zip(*rows)
    agree = sum((p > 0) == (m > 0) for p, m in rows)
    pearson = statistics.correlation(predicted, measured) if len(set(predicted)) > 1 and len(set(measured)) > 1 else None
    return {"lists": len(rows), "signs_agree": agree, "pearson": pearson}


def summarise(records: Sequence[dict]) -> dict[str, Any]:
    every = organise(records)
    cells = {n: c for n, c in every.items() if c["original"]["metrics"]["i2t_top1"] >= LEARNED_TOP1}
    not_learned = {n: c["original"]["metrics"]["i2t_top1"] for n, c in every.items() if n not in cells}
    groups = by_group(cells)
    noise_by_group: dict[str, list[float]] = defaultdict(list)
    for cell in cells.values():
        if (n := noise_points(cell)) is not None:
            noise_by_group[group_of(cell["spec"])].append(n)
    noise = {g: _mean(v) for g, v in noise_by_group.items()}
    gaps = edit_gaps(cells)
    choice = recommended(groups, noise)
    return {"cells": len(cells), "not_learned": not_learned, "preview": preview_agreement(cells), "groups": groups, "noise": noise, "edit_gaps": gaps,
            "decision": decision(groups, noise), "recommended": choice,
            "targets": targets(groups, gaps, noise, choice)}


def targets(groups: dict, gaps: list[dict], noise: dict, choice: tuple | None) -> list[dict]:
    """The issue's bench.fix targets, each with its measured value (met or not)."""
    out = []
    corrupted_gaps = [g["gap"] for g in gaps if g["verb"] == "remove" and "clean control" not in g["group"]]
    mean_noise = _mean(v for g, v in noise.items() if "clean control" not in g)
    if corrupted_gaps:
        gap = statistics.fmean(corrupted_gaps)
        out.append({"target": "mean |edit - retrain| in i2t top-1 <= 0.3 points (removal, corrupted cells)",
                    "value": f"{gap:.2f} points over {len(corrupted_gaps)} edits (retrain-vs-retrain noise "
                             f"{mean_noise if mean_noise is None else round(mean_noise, 2)})", "met": gap <= 0.3})
    matched = [g for g in gaps if g["matches_retraining"]]
    missed = [g for g in gaps if not g["matches_retraining"]]
    if gaps:
        false_alarms = sum(g["retrain_recommended"] for g in matched)
        caught = sum(g["retrain_recommended"] for g in missed)
        out.append({"target": "verdict: every edit that contradicts retraining flagged, <= 10% false alarms",
                    "value": f"{caught} of {len(missed)} contradicting edits flagged; {false_alarms} of {len(matched)} "
                             "matching edits flagged", "met": caught == len(missed) and false_alarms <= 0.1 * max(len(matched), 1)})
    measured = [g for g in gaps if g["contradicts_itself"] is not None]
    if measured:  # the literal reading: the edit's own prediction, checked on a held-out split
        wrong = [g for g in measured if g["contradicts_itself"]]
        caught = sum(g["retrain_recommended"] for g in wrong)
        false_alarms = sum(g["retrain_recommended"] for g in measured if g["matches_retraining"])
        fair = sum(g["matches_retraining"] for g in measured)
        out.append({"target": "verdict on the clean test split: every edit whose measured change contradicts its own "
                              "prediction there flagged, <= 10% false alarms on edits that matched retraining",
                    "value": f"{caught} of {len(wrong)} self-contradicting edits flagged; {false_alarms} of {fair} "
                             "edits that matched retraining flagged",
                    "met": caught == len(wrong) and false_alarms <= 0.1 * max(fair, 1)})
    for group, entries in groups.items():
        reference = None if choice is None else entries.get((SAME_SIZE[choice[0]], "retrain:remove"))
        if "clean control" in group:
            slack = noise.get(group) or 0.0
            scopes = [("any list", entries)]
            if choice is not None:  # the recommended list: the one a user is told to act on
                scopes.insert(0, (f"the recommended list ({choice[0]})", {k: v for k, v in entries.items()
                                                                          if k[0] == choice[0]}))
            for scope, chosen in scopes:
                if not chosen:
                    out.append({"target": f"{group}: {scope} hurts no more than the noise",
                                "value": "selects no pair on clean data", "met": True})
                    continue
                worst = min(chosen.items(), key=lambda kv: kv[1]["i2t"])
                out.append({"target": f"{group}: {scope} hurts no more than the noise",
                            "value": f"worst {worst[0][1]} on {worst[0][0]}: {worst[1]['i2t']:+.2f} points "
                                     f"(noise {slack:.2f})", "met": worst[1]["i2t"] >= -slack})
        elif choice is not None and choice in entries and reference is not None:
            ours = entries[choice]["i2t"]
            out.append({"target": f"{group}: recommended action ({choice[1]} on {choice[0]}) >= retraining without "
                                  f"as many lowest base-CLIPScore pairs ({SAME_SIZE[choice[0]]}) - 0.5 points",
                        "value": f"{ours:+.2f} vs {reference['i2t']:+.2f} points", "met": ours >= reference["i2t"] - 0.5})
    for g in gaps:
        if g["group"].startswith("same_domain full attribute") and g["list"] == "suspected" and g["verb"] == "remove":
            out.append({"target": f"{g['cell']}: edit --remove suspected >= +1 point, within 1 of retraining, "
                                  "<= 0.25x its time",
                        "value": f"{g['edit_i2t']:+.2f} points (retrain {g['retrain_i2t']:+.2f}), time {g['time_ratio']:.2f}x",
                        "met": g["edit_i2t"] >= 1 and g["gap"] <= 1 and g["time_ratio"] <= 0.25})
    return out
