"""RESULTS.md for a results dict: the issue's targets, then one section per experiment (tables ready to paste)."""
from __future__ import annotations

from typing import Any

DETECTION_METRICS = (("auroc", "AUROC"), ("ap", "average precision"), ("p@10", "precision@10"),
                     ("p@50", "precision@50"), ("p@n_pos", "precision@k, k = number of corrupted pairs"))
DEFAULT = "ecif_self_is"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    mean, sd = value if isinstance(value, (list, tuple)) else (value, None)
    return f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def _cell(summary: dict, corruption: str, fraction: float) -> dict | None:
    return summary.get(corruption, {}).get(str(fraction))


def targets(results: dict) -> list[dict]:
    """Each target of the issue: its measured value and whether it is met (None = not measured)."""
    s, summary = results["settings"], results["detection"]["summary"]
    out = []
    shuffle20 = _cell(summary, "shuffle", 0.2)
    for metric, name, bound in (("auroc", "AUROC", 0.95), ("p@50", "precision@50", 0.9)):
        value = shuffle20["methods"][DEFAULT].get(metric) if shuffle20 else None
        out.append({"target": f"default ranking (self-IS) {name} >= {bound} at 20% shuffle",
                    "value": _fmt(value), "met": None if value is None else value[0] >= bound})
    cells, fails = 0, []
    for corruption, by_fraction in summary.items():
        for fraction, cell in by_fraction.items():
            m = cell["methods"]
            cells += 1
            for rival in ("clip_score", "neg_clip_loss"):
                if not m[DEFAULT]["auroc"][0] > m[rival]["auroc"][0]:
                    fails.append(f"{corruption} {float(fraction):.0%} vs {rival} "
                                 f"({m[DEFAULT]['auroc'][0]:.3f} <= {m[rival]['auroc'][0]:.3f})")
    out.append({"target": "default ranking strictly better mean AUROC than CLIPScore and negCLIPLoss on every "
                          "corruption and fraction", "value": f"{2 * cells - len(fails)} of {2 * cells} comparisons"
                + (": fails " + "; ".join(fails) if fails else ""), "met": not fails})
    out += _removal_targets(results, s)
    for k, projection in results["fidelity"]["projections"].items():
        for method in ("ecif_is_sum", "ecif_is_group"):
            value = projection["methods"][method]["spearman"]
            out.append({"target": f"LDS Spearman >= 0.6 ({projection['methods'][method]['label']}, projection k={k})",
                        "value": f"{value:.3f}", "met": value >= 0.6})
    return out


def _removal_targets(results: dict, s: dict) -> list[dict]:
    summary, out = results["removal"]["summary"], []
    percent = "0.1" if "0.1" in next(iter(summary["methods"].values()), {}) else None
    none = summary["none"]["zero_shot_accuracy"][0]
    for method in ("ecif_self_is", "ecif_is"):
        if method not in summary["methods"] or percent is None:
            continue
        acc = summary["methods"][method][percent]["zero_shot_accuracy"][0]
        rand = summary["methods"].get("random", {}).get(percent, {}).get("zero_shot_accuracy", [float("nan")])[0]
        out.append({"target": f"removing the top 10% by {method} gives higher clean accuracy than no removal and than "
                              f"random removal (seeds {s['removal_seeds']})",
                    "value": f"{acc:.3f} vs none {none:.3f}, random {rand:.3f}", "met": acc > none and acc > rand})
    if "valuable" in summary["methods"] and "random" in summary["methods"]:
        pairs = [(p, summary["methods"]["valuable"][p]["zero_shot_accuracy"][0],
                  summary["methods"]["random"][p]["zero_shot_accuracy"][0]) for p in summary["methods"]["valuable"]]
        out.append({"target": "brittleness: removing the most valuable pairs lowers accuracy more than random removal",
                    "value": "; ".join(f"{float(p):.0%}: {v:.3f} vs {r:.3f}" for p, v, r in pairs),
                    "met": all(v < r for _, v, r in pairs)})
    return out


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = ["# Quality benchmark (bench.quality)", "", "```", results.get("command", "python -m bench.quality"), "```", "",
             _setup(results), "", "## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    for t in results["targets"]:
        met = {True: "**yes**", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['value']} | {met} |")
    lines += ["", _detection(results), "", _removal(results), "", _fidelity(results), "", _cost(results), "",
              "## Plots", ""]
    lines += [f"![{name}]({name})" for name in results.get("plots", [])]
    lines += ["", _notes(s)]
    return "\n".join(lines) + "\n"


def _setup(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    theta = "the two final projections" if s["theta"] == ["visual.proj", "text_projection"] else (s["theta"] or "default")
    return (f"Digits ({s['n_train']} train pairs, {s['n_val']} clean validation, {s['n_test']} clean test), tiny "
            f"open_clip ViT (`ecif_core/configs/tiny-clip.json`) trained from scratch with `ecif train`'s trainer "
            f"({s['epochs']} epochs, B={s['batch_size']}, lr {s['lr']}, weight decay {s['weight_decay']}, "
            f"{s['checkpoints']} checkpoints for TracIn); audit theta = {theta}, projection "
            f"{s['projection']}x{s['projection']}, default damping, exact Neg unless stated. Seeds {s['seeds']} "
            f"(the data split, corruption, init and partition all change with the seed). Machine: {m['cpus']} CPUs, "
            f"{m['workers']} worker process(es) x {m['threads_per_worker']} torch thread(s), torch {m['torch']}, "
            f"open_clip {m['open_clip']}, {m['date']}. Wall time: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in results["stage_seconds"].items()) + ".")


def _detection(results: dict) -> str:
    summary, labels = results["detection"]["summary"], results["detection"]["labels"]
    columns = [(c, f) for c, by_fraction in summary.items() for f in by_fraction]
    methods = [m for m in labels if any(m in summary[c][f]["methods"] for c, f in columns)]
    variants = results["settings"]["neg_variant_fractions"]
    out = ["## 1. Detection", "", "Mean ± standard deviation over seeds; higher is better"
           + ("." if variants is None else
              f"; — = not run (first-order / published Neg audits only at fractions {variants}).")]
    for key, title in DETECTION_METRICS:
        out += ["", f"**{title}**", "", "| ranking | " + " | ".join(f"{c} {float(f):.0%}" for c, f in columns) + " |",
                "| --- |" + " --- |" * len(columns)]
        for m in methods:
            cells = [_fmt(summary[c][f]["methods"].get(m, {}).get(key)) for c, f in columns]
            out.append(f"| {labels[m]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _removal(results: dict) -> str:
    r, s = results["removal"], results["settings"]
    summary, labels = r["summary"], r["labels"]
    percents = list(next(iter(summary["methods"].values())).keys()) if summary["methods"] else []
    out = ["## 2. Removal and retraining", "",
           f"{s['removal_corruption']} {s['removal_fraction']:.0%}, seeds {s['removal_seeds']}: the top x% by each ranking "
           "removed, the model retrained from scratch with the same recipe and seed (`TrainConfig.exclude`), evaluated on "
           "the clean test split. Mean ± sd over seeds."]
    for key, title in (("zero_shot_accuracy", "zero-shot accuracy (clean test)"),
                       ("test_loss", "contrastive loss per pair (clean test)"),
                       ("corrupted_share", "share of corrupted pairs among the removed")):
        out += ["", f"**{title}**", "", "| removed by | " + " | ".join(f"{float(p):.0%}" for p in percents) + " |",
                "| --- |" + " --- |" * len(percents)]
        if key != "corrupted_share":
            out.append("| no removal | " + " | ".join([_fmt(summary["none"][key])] * len(percents)) + " |")
        for m, by_percent in summary["methods"].items():
            out.append(f"| {labels[m]} | " + " | ".join(_fmt(by_percent[p][key]) for p in percents) + " |")
    return "\n".join(out)


def _fidelity(results: dict) -> str:
    f = results["fidelity"]
    checks, s = f["checks"], results["settings"]
    ks = list(f["projections"])
    methods = list(next(iter(f["projections"].values()))["methods"])
    out = ["## 3. Fidelity (linear datamodeling score)", "",
           f"{s['fidelity_subsets']} random subsets of {s['fidelity_subset_fraction']:.0%} of the {f['n_pairs']} training "
           f"pairs ({f['subset_size']} each) of the {s['removal_corruption']} {s['removal_fraction']:.0%} seed "
           f"{s['fidelity_seed']} model; oracle = the two projections refitted to convergence with the towers frozen "
           f"(cached features, L2 {checks['base_fit']['l2']:g} towards the trained projections), with and without "
           "each subset. Spearman of predicted vs actual change of the mean validation loss:", "",
           "| prediction | " + " | ".join(f"projection k={k}" for k in ks) + " |", "| --- |" + " --- |" * len(ks)]
    for m in methods:
        label = f["projections"][ks[0]]["methods"][m]["label"]
        out.append(f"| {label} | " + " | ".join(f"{f['projections'][k]['methods'][m]['spearman']:.3f}" for k in ks) + " |")
    o, b, n = checks["objective_vs_forward"], checks["base_fit"], checks["noise_floor"]
    out += ["", "Checks: cached-feature objective vs `batch_loss` on the real forward at the trained model: "
            f"{o['cached']:.4f} vs {o['real_forward']:.4f} (relative {o['relative_difference']:.1e}); base fit "
            f"{b['iterations']} L-BFGS iterations, max |grad| {b['max_grad']:.1e} (L2 weights tried, final max |grad|: "
            + ", ".join(f"{k}: {v:.1e}" for k, v in b["max_grad_per_l2_tried"].items())
            + f"); refit from a perturbed start changes the validation loss by {n['refit_from_perturbed_abs_change']:.1e} "
            f"against a spread of actual changes of {n['actual_std']:.1e} (sd); "
            + "; ".join(f"k={k}: cached vs stored per-pair gradients max relative error "
                        f"{f['projections'][k]['checks']['pair_gradient_max_relative_error']:.1e}, validation loss "
                        f"{f['projections'][k]['checks']['val_loss_cached']:.5f} vs audit "
                        f"{f['projections'][k]['checks']['val_loss_audit']:.5f}" for k in ks) + "."]
    return "\n".join(out)


def _cost(results: dict) -> str:
    c = results["cost"]
    out = ["## 4. Cost", "", f"Audit wall time / full retraining wall time, measured in the same process for each of "
           f"{c['runs']} detection runs: **{_fmt(c['audit_over_train'])}**.", "", "| stage | seconds per run |",
           "| --- | --- |"]
    out += [f"| {k} | {_fmt(v, 2)} |" for k, v in c["seconds"].items()]
    if "default_theta" in c:
        d = c["default_theta"]
        out += ["", f"theta blocks:2 (last 2 blocks of each tower + projections, the default before issue 22), run {d['run']}: audit "
                f"{d['audit_seconds']:.1f} s / retraining {d['train_seconds']:.1f} s = **{d['audit_over_train']:.3f}** "
                f"(projections-only audit on the same run: {d['projections_audit_seconds']:.1f} s); its self-IS AUROC "
                f"{d['self_is']['auroc']:.3f}, P@50 {d['self_is'].get('p@50', float('nan')):.2f} vs "
                f"{d['self_is_projections_theta']['auroc']:.3f}, "
                f"{d['self_is_projections_theta'].get('p@50', float('nan')):.2f} with the projections."]
    return "\n".join(out)


def _notes(s: dict) -> str:
    return "\n".join([
        "## Definitions", "",
        "- Scores are oriented so that higher = more likely corrupted: self-IS, Pos(n) and self-TracIn highest first; "
        "IS, Pos-only IF (`influence_pos`), TracIn on the validation loss, CLIPScore and negCLIPLoss lowest first.",
        f"- TracIn: {s['checkpoints']} checkpoints saved by the trainer (`TrainConfig.checkpoints`, the last = the final "
        "model), per-pair gradients of Pos(n) + Neg(n) with the audit's theta and projection, weight w_c = summed "
        "learning rate of the steps since the previous checkpoint / steps per epoch. `self-TracIn` = sum_c w_c "
        "|g_pos|^2 (the classic mislabel detector, the one compared); `TracIn on validation loss` = "
        "sum_c w_c (g_pos + g_neg) . grad L'.",
        f"- negCLIPLoss (Wang et al. 2024): s_ii - (tau/2)[log sum_k exp(s_ik/tau) + log sum_k exp(s_ki/tau)] over "
        f"{s['neg_clip_repeats']} random batches of {s['batch_size']} holding i, with the audited model's cosines and "
        "temperature (the paper scores with an external teacher CLIP; here no other model exists).",
        "- Removal `valuable` = highest ECIF IS (the pairs whose removal is predicted to raise the validation loss most).",
        "- The ground truth (truth.csv) is read only by `bench/quality/scoring.py`; audits and rankings see train.jsonl, "
        "val.jsonl and the checkpoint only.",
    ])
