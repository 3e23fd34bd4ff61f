"""The GPU check, as one script for one device run (prepared and rehearsed on CPU first).

    python -m bench.device --out DIR [--budget-s 380] [--quick]

1. equality: the tiny CLIP trained on 128 digits pairs, audited on CPU and on CUDA (default
   theta, B = 32): max relative difference of every score column, identical ranking.
2. ViT-B-32 (random init), B = 256, --pairs synthetic pairs, theta = the two projections:
   the whole audit, pairs/s, audit / training epoch, peak GPU memory per stage.
3. the same with the default theta, under memory_limit, until the time budget ends: the
   gradients stage's measured pairs/s over the shards that finished (whole audit if all did).
Every part writes DIR/device.json as it ends, so a cut-off run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from bench import scale
from ecif_core import stages as audit
from services.embedded import run_audit


def equality(work: Path, pairs: int, device: str) -> dict:
    from ecif_core.datasets.digits import build_digits
    from ecif_core.demo import tiny_model_config
    from ecif_core.train import TrainConfig, train

    data = build_digits(work / "digits", fraction=0.2, seed=0, n_train=pairs, n_val=40, n_test=10)
    (work / "tiny.json").write_text(json.dumps(tiny_model_config()))
    train(data.train, work / "tiny.json", work / "tiny.pt", TrainConfig(epochs=3, batch_size=32, lr=1e-3, seed=0))
    (work / "m.json").write_text(json.dumps({"model": {"config": "tiny.json", "checkpoint": "tiny.pt"},
                                             "train": str(data.train), "validation": str(data.validation), "options": {}}))
    results = {}
    for name in ("cpu", device):
        folder = work / f"eq-{name}"
        scale._fresh(folder)
        started = time.perf_counter()
        if name == "cpu":
            with mock.patch("torch.cuda.is_available", return_value=False):
                run_audit(work / "m.json", folder)
        else:
            run_audit(work / "m.json", folder)
        ranking = audit.final_ranking(folder)
        results[name] = (ranking, time.perf_counter() - started)
    (cpu, cpu_s), (gpu, gpu_s) = results["cpu"], results[device]
    out = {"pairs": pairs, "cpu_s": cpu_s, "device_s": gpu_s, "same_order": bool(np.array_equal(cpu.order, gpu.order)),
           "same_suspected": bool(np.array_equal(cpu.suspected, gpu.suspected))}
    for column in ("influence", "influence_pos", "influence_neg", "self_influence", "leave_own_out", "clip_score"):
        a, b = cpu.columns[column].astype(np.float64), gpu.columns[column].astype(np.float64)
        out[f"max_rel_{column}"] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    from scipy.stats import spearmanr

    out["spearman_self_influence"] = float(spearmanr(cpu.columns["self_influence"], gpu.columns["self_influence"])[0])
    first = np.flatnonzero(cpu.order != gpu.order)
    out["first_rank_that_differs"] = int(first[0]) + 1 if len(first) else None
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/ecif-device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, default=10240)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--budget-s", type=float, default=380.0, help="seconds for the whole script")
    parser.add_argument("--memory-limit", default="60GB")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="equality,vit_projections,vit_default")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    result: dict = {"device": args.device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - started
        (out / "device.json").write_text(json.dumps(result, indent=1))

    def part(name: str, fn) -> None:
        try:
            result[name] = fn()
        except Exception:  # keep what the other parts measure
            result[name] = {"error": traceback.format_exc()[-3000:]}
        print(name, json.dumps(result[name])[:3000], flush=True)
        save()

    parts = args.parts.split(",")
    if "equality" in parts:
        part("equality", lambda: equality(work, 32 if args.quick else 128, args.device))
    projections = {"projections": ["visual.proj", "text_projection"]}
    if "vit_projections" in parts:
        part("vit_projections", lambda: scale.vit_part(work, [args.batch], 1, device, projections, args.pairs,
                                                       epoch_batches=min(8, args.pairs // args.batch))[0])
    deadline = started + args.budget_s
    if "vit_default" in parts:
        part("vit_default", lambda: vit_default(work, args, device, deadline))
    return result


def vit_default(work: Path, args: argparse.Namespace, device: torch.device, deadline: float) -> dict:
    """Default theta until the deadline: measured over the shards that finished."""
    checkpoint = scale.vit_checkpoint(work)
    data = scale.synthetic_pairs(work, args.pairs)
    options = {"batch_size": args.batch, "shard_batches": 1, "memory_limit": args.memory_limit}
    manifest = work / "vit-default.manifest.json"
    manifest.write_text(json.dumps({"model": {"arch": "ViT-B-32", "checkpoint": checkpoint.name},
                                    "train": data.name, "options": options}))
    folder = work / "vit-default-audit"
    scale._fresh(folder)
    meter = scale.Meter(device)
    finished = scale.staged_audit(manifest, folder, meter, deadline=deadline)
    shards = finished if isinstance(finished, int) else audit.load_plan(folder).shards
    pairs = min(args.pairs, shards * args.batch)
    row = {"model": "ViT-B-32", "theta": "default", "B": args.batch, "memory_limit": args.memory_limit,
           "pairs_planned": args.pairs, "pairs_with_gradients": pairs, "complete": not isinstance(finished, int),
           "gradients_pairs_per_s": pairs / meter.stages["gradients"]["s"], "stages": meter.stages}
    if row["complete"]:
        row["audit_s"] = sum(s["s"] for s in meter.stages.values())
    return row


if __name__ == "__main__":
    main()
