"""PNG plots of a results dict (matplotlib, Agg): ROC curves, accuracy against removal, fidelity scatter."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .scoring import FPR_GRID  # noqa: E402

ROC_METHODS = ("ecif_self_is", "ecif_is", "pos_only_if", "tracin_self", "clip_score", "neg_clip_loss", "own_loss")


def make_all(results: dict, out: Path) -> list[str]:
    """Write every plot under `out`; returns the file names."""
    names = [roc_plot(results, corruption, out) for corruption in results["detection"]["summary"]]
    names.append(removal_plot(results, out))
    names += [fidelity_plot(results, k, out) for k in results["fidelity"]["projections"]]
    return names


def roc_plot(results: dict, corruption: str, out: Path) -> str:
    """Mean ROC over seeds, one panel per corruption fraction."""
    cells = results["detection"]["summary"][corruption]
    labels = results["detection"]["labels"]
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 4.2), squeeze=False)
    for ax, (fraction, cell) in zip(axes[0], cells.items()):
        for method in ROC_METHODS:
            if method in cell["roc"]:
                auc = cell["methods"][method]["auroc"][0]
                ax.plot(FPR_GRID, cell["roc"][method], label=f"{labels[method].split(' (')[0]} ({auc:.3f})", lw=1.3)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set(title=f"{corruption}, {float(fraction):.0%} corrupted (seeds {cell['seeds']})", xlabel="false positive rate",
               ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    name = f"roc_{corruption}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def removal_plot(results: dict, out: Path) -> str:
    """Clean zero-shot accuracy and test loss against the removed fraction, per method."""
    removal = results["removal"]["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for method, by_percent in removal["methods"].items():
        percents = [0.0] + [float(p) for p in by_percent]
        for ax, key in zip(axes, ("zero_shot_accuracy", "test_loss")):
            means = [removal["none"][key][0]] + [v[key][0] for v in by_percent.values()]
            sds = [removal["none"][key][1] or 0.0] + [v[key][1] or 0.0 for v in by_percent.values()]
            ax.errorbar(np.array(percents) * 100, means, yerr=sds, marker="o", ms=3, capsize=2, lw=1.2,
                        label=results["removal"]["labels"][method].split(" (")[0])
    axes[0].set(xlabel="pairs removed (%)", ylabel="zero-shot accuracy (clean test)")
    axes[1].set(xlabel="pairs removed (%)", ylabel="contrastive loss per pair (clean test)")
    axes[0].legend(fontsize=7)
    seeds = results["settings"]["removal_seeds"]
    fig.suptitle(f"removal then retraining ({results['settings']['removal_corruption']} "
                 f"{results['settings']['removal_fraction']:.0%}, seeds {seeds})", fontsize=10)
    fig.tight_layout()
    name = "removal_accuracy.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def fidelity_plot(results: dict, k: str, out: Path) -> str:
    """Predicted against actual change of the validation loss, one panel per method."""
    methods = results["fidelity"]["projections"][k]["methods"]
    actual = np.array(results["fidelity"]["actual"])
    cols = min(3, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, m) in zip(axes.flat, methods.items()):
        ax.scatter(m["predicted"], actual, s=9)
        ax.axhline(0, color="grey", lw=0.6, ls=":")
        ax.axvline(0, color="grey", lw=0.6, ls=":")
        ax.set(title=f"{m['label']}\nSpearman {m['spearman']:.3f}", xlabel="predicted change", ylabel="actual change")
        ax.title.set_fontsize(8)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fraction = results["settings"]["fidelity_subset_fraction"]
    fig.suptitle(f"validation loss change after removing {fraction:.0%} subsets (projection k={k})", fontsize=10)
    fig.tight_layout()
    name = f"fidelity_k{k}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
