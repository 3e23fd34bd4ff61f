"""Quality per cost of each theta the product offers (issue 22, item 1): detection AUROC and the
audit's cost in training epochs (bench/RESULTS.md, "Theta: detection and cost").

    OMP_NUM_THREADS=1 python -m bench.theta_quality [--thetas projections,last-block,last-two]
        [--seeds 0,1] [--out bench/out/partners]

Runs on bench.quality's digits runs (20% shuffled captions, 600 pairs, B = 32, 30 epochs), trained
by `python -m bench.partners --parts quality` into OUT/runs (trained here when missing).

Per theta and seed (the trained model): the product's default audit with that theta; the AUROC
of the default ranking and of self_influence against the truth; the audit's wall time and its
gradients stage in training epochs of the same pairs (one AdamW epoch on every weight, the
fastest of 2).

Not here: the LDS of the block thetas. bench.quality's fidelity oracle (theta refitted to
convergence with the rest frozen, L2 towards the trained theta) was tried for the last two blocks:
one evaluation of the 600-pair objective costs about 1.2 s against 0.04 s for the projections,
and the base fit had not converged after 300 L-BFGS iterations (255 s, max |grad| 6.1, validation
loss 10.0 per pair against the trained model's 5.7 and 6.9 at chance: the blocks overfit the
600 pairs at the objective's minimum); 20 refits would take
hours on this machine (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ecif_core.metrics import auroc  # noqa: E402
from ecif_core.models.factory import block_theta_patterns, load_model  # noqa: E402

THETAS = {"projections": lambda model: ["visual.proj", "text_projection"],
          "last-block": lambda model: block_theta_patterns(model, 1),
          "last-two": lambda model: block_theta_patterns(model, 2)}


def detection_and_cost(run, name: str) -> dict:
    from bench.quality import scoring
    from bench.quality.runs import audit
    from bench.quality.settings import QualitySettings
    from bench.quality.tensors import load_batches
    from bench.scale import training_epoch_seconds

    settings = QualitySettings()
    loaded = load_model(config=run.config, checkpoint=run.checkpoint)
    patterns = THETAS[name](loaded.model)
    audited = audit(run, f"theta-{name}", {"theta": patterns})
    ranked = audited.ranked()
    ids = sorted(ranked)
    labels = scoring.truth_labels(run.data.truth, ids)
    batches = load_batches(run.data.train, loaded, settings.batch_size, run.seed, training=True)
    epoch = training_epoch_seconds(loaded.model, [(b.images, b.tokens) for b in batches], torch.device("cpu"), epochs=2)
    column = lambda c: np.array([float(ranked[i][c]) for i in ids])  # noqa: E731
    return {"theta": name, "seed": run.seed, "auroc_default": auroc(column("suspicion"), labels),
            "auroc_self_influence": auroc(column("self_influence"), labels),
            "audit_seconds": audited.seconds, "gradients_seconds": audited.stages.get("gradients"),
            "epoch_seconds": epoch, "audit_epochs": audited.seconds / epoch,
            "gradients_epochs": audited.stages.get("gradients", float("nan")) / epoch}


def _run(out: Path, seed: int):
    from bench.quality.runs import build_and_train, existing_run, run_name
    from bench.quality.settings import QualitySettings

    try:
        return existing_run(out / "runs", "shuffle", 0.2, seed)
    except FileNotFoundError:
        return build_and_train(out / "runs" / run_name("shuffle", 0.2, seed), QualitySettings(), "shuffle", 0.2, seed)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thetas", default=",".join(THETAS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="bench/out/partners")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    thetas = args.thetas.split(",")
    results: dict = {"command": "python -m bench.theta_quality " + " ".join(argv or []), "detection": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = _run(out, seed)
        for name in thetas:
            row = detection_and_cost(run, name)
            results["detection"].append(row)
            print(json.dumps(row), flush=True)
    (out / f"theta-quality-{'-'.join(thetas)}.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
