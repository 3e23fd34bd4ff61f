"""How long a trace takes, against an audit: the demo size and 100k synthetic pairs.

    python -m bench.trace [--workdir bench/out/service] [--rows 100000]

1. Demo size: the audit folder `WORKDIR/embedded` that `python -m bench.service` leaves
   (digits, 1200 pairs, default options), audited again here if missing, timed. A trace of
   one zero-shot test example is timed cold (model loaded) and warm (a worker's cached model).
2. 100k pairs: a synthetic audit folder with the demo's projection size and curvature and
   random gradients and Gram entries for ROWS pairs; the ranking pass over stored numbers
   (`trace_terms`) is timed. The audit of 100k pairs is not run (about half an hour of gradients
   here); its time is the demo audit's per-pair time times ROWS, an extrapolation.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ecif_core import stages as audit
from ecif_core.datasets.digits import class_prompts, label_of_caption
from ecif_core.trace.query import TraceExample, trace, trace_loss_gradient, trace_terms


def demo_audit(workdir: Path) -> tuple[Path, float | None]:
    folder = workdir / "embedded"
    if (folder / "ranked.csv").exists():
        return folder, None
    from bench.service import manifest, prepare_workdir
    from services.embedded import run_audit

    prepare_workdir(workdir)
    started = time.perf_counter()
    run_audit(manifest(workdir, "demo-manifest.json", {}), folder)
    return folder, time.perf_counter() - started


def synthetic_audit(demo: Path, out: Path, rows: int, shard_rows: int = 256) -> Path:
    """A finished audit folder of `rows` random pairs sharing the demo's curvature."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    plan = audit.load_plan(demo)
    shards = -(-rows // shard_rows)
    store = audit.open_store(out)
    store.create(rows=shards * shard_rows, dim=plan.dim, shard_rows=shard_rows, shards=shards, attrs={})
    demo_store = audit.open_store(demo)
    eigvals, eigvecs = demo_store.curvature()
    store.write_curvature(eigvals, eigvecs, {})
    generator = np.random.default_rng(0)
    scale = float(np.abs(demo_store.pos_gradients(0, plan.shard_rows)).mean())
    for shard in range(shards):
        start = shard * shard_rows
        grads = {name: (generator.standard_normal((shard_rows, plan.dim)) * scale).astype(np.float32)
                 for name in ("pos", "neg")}
        store.write_gradients(start, grads)
        gram = {f"gram_{a}_{b}": np.abs(generator.standard_normal(shard_rows)) + 1.0
                for a, b in (("pos", "pos"), ("pos", "neg"), ("neg", "neg"))}
        gram["gram_pos_neg"] *= 0.1
        store.write_scores(start, gram)
        store.write_curvature_shift(shard, float(demo_store.curvature_shifts()[0]))
        store.mark_done("scores", shard)
    fields = json.loads((demo / "plan.json").read_text())
    fields.update(n_batches=shards * shard_rows // plan.batch_size, shard_batches=shard_rows // plan.batch_size,
                  shards=shards, pairs_total=rows, pairs_rejected=0, shard_offsets=[])
    (out / "plan.json").write_text(json.dumps(fields))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="bench/out/service")
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    demo, audit_seconds = demo_audit(workdir)
    if audit_seconds is None:
        timing = json.loads((workdir / "result.json").read_text()) if (workdir / "result.json").exists() else {}
        audit_seconds = timing.get("embedded_s")
    row = json.loads((workdir / "data" / "test.jsonl").read_text().splitlines()[0])
    example = TraceExample(str((workdir / "data" / row["image"]).resolve()), prompts=class_prompts(),
                           label=label_of_caption(row["caption"]))
    started = time.perf_counter()
    models = audit.ModelCache()
    trace(demo, [example], k=20, models=models)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    trace(demo, [example], k=20, models=models)
    warm = time.perf_counter() - started
    loaded, params, projector = models.get(audit.manifest_of(audit.load_plan(demo)))
    started = time.perf_counter()
    grad, _ = trace_loss_gradient(loaded, params, projector, example, [])
    gradient_seconds = time.perf_counter() - started
    synthetic = synthetic_audit(demo, workdir / "synthetic-100k", args.rows)
    started = time.perf_counter()
    trace_terms(synthetic, grad.to(torch.float64))
    pass_seconds = time.perf_counter() - started
    pairs = audit.load_plan(demo).pairs_total
    result = {"demo_pairs": pairs, "demo_audit_s": audit_seconds, "demo_trace_cold_s": cold, "demo_trace_warm_s": warm,
              "test_gradient_s": gradient_seconds, "synthetic_pairs": args.rows, "synthetic_ranking_pass_s": pass_seconds,
              "synthetic_trace_s": gradient_seconds + pass_seconds,
              "synthetic_audit_s_extrapolated": audit_seconds * args.rows / pairs if audit_seconds else None}
    print(json.dumps(result, indent=1))
    (workdir / "trace-result.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(synthetic, ignore_errors=True)


if __name__ == "__main__":
    main()
