"""The top-m partner approximation (options.partners): its cost, its score error, and what it does to
detection (AUROC) and fidelity (LDS) (docs/METHOD.md, "Top-m partners"; bench/RESULTS.md).

    OMP_NUM_THREADS=1 python -m bench.partners [--parts timing,quality,lds] [--partners 4,8,16]
        [--seeds 0,1] [--models tiny,tiny-d512] [--batch-sizes 32,256] [--out bench/out/partners]

timing: one synthetic batch per model and B (random init), default theta (the last two blocks plus
  the projections), one thread: ms per pair of the exact path ("auto") and of each m, the fastest of
  2 interleaved runs, beside a training step on the same batch (bench.basis).
quality: digits with 20% shuffled captions, bench.quality's recipe (600 pairs, B = 32, 30 epochs),
  per seed: the clean test split's zero-shot accuracy (the model learned its data), then the audit
  with the product's default options, exact and with each m. Per m: the relative error of the
  per-pair score columns against the exact audit (median over pairs of |approx - exact| / the
  column's median |exact|), their Spearman correlation with it, the median dropped mass, the
  AUROC of the default ranking and of self_influence and influence against the truth, and the
  gradients stage's seconds.
lds: bench.quality's fidelity experiment on seed 0's run (50 refits without 10% subsets, theta = the
  projections, k = 8) with the exact audit and each m: Spearman(predicted, actual) per method.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.basis import model_config, synthetic_batch, train_step_seconds  # noqa: E402
from ecif_core.influence.partners import batch_gradients  # noqa: E402
from ecif_core.influence.projection import Projector, ProjectionSpec  # noqa: E402
from ecif_core.metrics import auroc, spearman  # noqa: E402
from ecif_core.models.factory import block_theta_patterns, load_model, restrict_grad_to, select_theta  # noqa: E402

SCORE_COLUMNS = ("suspicion", "influence", "influence_pos", "influence_neg", "self_influence", "self_influence_clip")


def timing(models: list[str], batch_sizes: list[int], partners: list[int], repeats: int = 2) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for name in models:
        config = model_config(name)
        loaded = load_model(config=config, seed=0)
        model = loaded.model.eval()
        theta = select_theta(model, block_theta_patterns(model, 2))
        for batch in batch_sizes:
            images, tokens = synthetic_batch(loaded, config, batch)
            train = train_step_seconds(model, images, tokens)
            restrict_grad_to(model, theta)
            params = [p for _, p in theta]
            projector = Projector.for_theta(theta, ProjectionSpec(8, 8, 0))
            variants = [None, *partners]
            best = {m: float("inf") for m in variants}
            results = {}
            for _ in range(repeats):
                for m in variants:
                    started = time.perf_counter()
                    results[m] = batch_gradients(model, params, projector, images, tokens, partners=m)
                    best[m] = min(best[m], time.perf_counter() - started)
            exact = results[None]
            for m in partners:
                error = _relative_row_error(results[m].pos, exact.pos), _relative_row_error(results[m].neg, exact.neg)
                row = {"model": name, "D": config["embed_dim"], "B": batch, "m": m,
                       "train_ms_per_pair": 1e3 * train / batch, "exact_ms_per_pair": 1e3 * best[None] / batch,
                       "partners_ms_per_pair": 1e3 * best[m] / batch, "exact_over_partners": best[None] / best[m],
                       "exact_over_train": best[None] / train, "partners_over_train": best[m] / train,
                       "median_row_error_pos": error[0], "median_row_error_neg": error[1],
                       "median_dropped_mass": float(results[m].dropped_mass.median())}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _relative_row_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Median over pairs of |g_m - g| / |g| (projected gradients)."""
    return float(((approx - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-30)).median())


def quality(out: Path, seeds: list[int], partners: list[int]) -> list[dict]:
    from bench.quality.evaluation import clean_test_metrics
    from bench.quality.runs import audit, build_and_train, existing_run, run_name
    from bench.quality.settings import QualitySettings
    from bench.quality.tensors import load_batches
    from bench.quality import scoring

    settings = QualitySettings()
    rows = []
    for seed in seeds:
        try:  # a run this bench trained before (same recipe)
            run = existing_run(out / "runs", "shuffle", 0.2, seed)
        except FileNotFoundError:
            run = build_and_train(out / "runs" / run_name("shuffle", 0.2, seed), settings, "shuffle", 0.2, seed)
        loaded = load_model(config=run.config, checkpoint=run.checkpoint)
        clean = clean_test_metrics(loaded, load_batches(run.data.test, loaded, settings.batch_size, seed, training=False))
        columns, seconds, ids = {}, {}, []
        for m in [None, *partners]:
            result = audit(run, "exact" if m is None else f"partners{m}", {} if m is None else {"partners": m})
            ranked = result.ranked()
            ids = ids or sorted(ranked)   # the exact audit's pairs, in one order for every m
            columns[m] = {c: np.array([float(ranked[i][c] or "nan") for i in ids])
                          for c in (*SCORE_COLUMNS, "dropped_partner_mass")}
            seconds[m] = result.stages.get("gradients", float("nan"))
        labels = scoring.truth_labels(run.data.truth, ids)
        exact = columns[None]
        for m in [None, *partners]:
            ours = columns[m]
            row = {"seed": seed, "m": m, "clean_zero_shot_accuracy": clean["zero_shot_accuracy"],
                   "gradients_seconds": seconds[m],
                   "auroc_default": auroc(ours["suspicion"], labels),
                   "auroc_self_influence": auroc(ours["self_influence"], labels),
                   "auroc_influence": auroc(-ours["influence"], labels)}
            if m is not None:
                row["median_dropped_mass"] = float(np.nanmedian(ours["dropped_partner_mass"]))
                for c in SCORE_COLUMNS[1:]:
                    scale = float(np.median(np.abs(exact[c])))
                    row[f"{c}_median_error"] = float(np.median(np.abs(ours[c] - exact[c]))) / scale
                    row[f"{c}_spearman"] = spearman(ours[c], exact[c])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def lds(out: Path, partners: list[int]) -> dict:
    from bench.quality.fidelity import fidelity
    from bench.quality.settings import QualitySettings

    settings = QualitySettings(fidelity_projections=[8], fidelity_partners=partners)
    result = fidelity(settings, out / "runs")
    methods = result["projections"]["8"]["methods"]
    summary = {m: v["spearman"] for m, v in methods.items()}
    print(json.dumps({"lds": summary, "noise_floor": result["checks"].get("noise_floor")}), flush=True)
    return {"lds": summary, "checks": result["checks"], "audit_seconds": result["projections"]["8"]["audit_seconds"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="timing,quality,lds")
    parser.add_argument("--partners", default="4,8,16")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--models", default="tiny,tiny-d512")
    parser.add_argument("--batch-sizes", default="32,256")
    parser.add_argument("--out", default="bench/out/partners")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    partners = [int(m) for m in args.partners.split(",")]
    parts = args.parts.split(",")
    results: dict = {"command": "python -m bench.partners " + " ".join(argv or [])}
    if "timing" in parts:
        results["timing"] = timing(args.models.split(","), [int(b) for b in args.batch_sizes.split(",")], partners)
    if "quality" in parts:
        results["quality"] = quality(out, [int(s) for s in args.seeds.split(",")], partners)
    if "lds" in parts:
        results["lds"] = lds(out, partners)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
