"""Audit cost and memory at scale: audit / training-epoch ratios, peak memory per stage, and the
curvature and scoring stages at N = 1k..100k pairs.

    python -m bench.scale [--parts tiny,vit,probe,store] [--out bench/out/scale] [--quick]

- tiny: digits (1200 pairs), the tiny CLIP trained one epoch at B = 32, 128, 256 (the epoch is
  timed), then audited with the default theta; ratio = audit seconds / epoch seconds.
- vit: ViT-B-32 (random init, 224 px, a seeded local checkpoint), synthetic pairs, a few
  batches at each B in --vit-batch-sizes; default theta and theta = the two projections. The
  training epoch is the same objective's loop (AdamW, every weight) on the same device, with
  preprocessed tensors in memory as `ecif train` keeps them; the audit also decodes its images.
- probe: ViT-B-32 at B = --probe-batch, default theta, per_pair_gradients under memory_limit,
  stopped after --probe-backwards batched backwards (the later ones repeat the same shapes):
  the peak memory of the gradients stage without running all of it.
- store: synthetic audit stores of N random pairs (k = the tiny CLIP's default-theta size)
  with their shard partial sums; the curvature and scoring stages are timed with peak memory.
- marginal: digits pairs (cycled past its 1,797 images) at --marginal-sizes, the tiny CLIP trained on
  each at every B of --marginal-batch-sizes, each audited in a fresh process; the audit's cost per
  added pair (the slope between the smallest and largest size) over a training epoch's cost per
  pair, and the whole largest audit over one epoch of its pairs (issue 22's figures).
- estimate: digits (--estimate-pairs, 60 validation pairs), the tiny CLIP trained one epoch at each
  B of --estimate-batch-sizes; `ecif validate --estimate` in a fresh process, then the staged audit
  in another fresh process (each imports its libraries, as a user's two commands do), both with
  --threads; ratio = estimated / measured wall time, per stage and in total, and the estimated
  store bytes against those the audit wrote.

Peak memory is the process's resident set (sampled every 5 ms) on CPU and
torch.cuda.max_memory_allocated on a GPU. Results: OUT/results.json (and printed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ecif_core import stages as audit
from ecif_core.data.manifest import load_manifest
from ecif_core.stages.curvature import curvature
from ecif_core.stages.finalize import finalize
from ecif_core.stages.gradients import shard_gradients
from ecif_core.stages.prepare import prepare
from ecif_core.stages.scores import shard_scores
from ecif_core.stages.validation import validation
from ecif_core.models.runtime import set_threads


class Meter:
    """Wall time and peak memory of named stages."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        peak = [_rss()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.005):
                peak[0] = max(peak[0], _rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            stop.set()
            sampler.join()
            entry = self.stages.setdefault(name, {"s": 0.0, "peak_rss_gb": 0.0})
            entry["s"] += seconds
            entry["peak_rss_gb"] = max(entry["peak_rss_gb"], max(peak[0], _rss()) / 2**30)
            if self.device.type == "cuda":
                entry["peak_gpu_gb"] = max(entry.get("peak_gpu_gb", 0.0), torch.cuda.max_memory_allocated() / 2**30)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def staged_audit(manifest: Path, out: Path, meter: Meter, deadline: float | None = None) -> "audit.Ranking | int":
    """The stage functions of the table, each under the meter (gradients and scores summed over
    shards), without the pipeline's database bookkeeping; returns the final ranking (no ranked.csv).

    With a `deadline` (perf_counter seconds) the gradients stage stops after the first shard that
    ends past it and the number of finished shards is returned instead."""
    models = audit.ModelCache()
    with meter.stage("prepare"):
        plan = prepare(load_manifest(manifest), out)
    for shard in range(plan.shards):
        with meter.stage("gradients"):
            shard_gradients(out, shard, models)
        if deadline is not None and time.perf_counter() > deadline and shard + 1 < plan.shards:
            return shard + 1
    with meter.stage("curvature"):
        curvature(out)
    with meter.stage("validation"):
        validation(out, models)
    for shard in range(plan.shards):
        with meter.stage("scores"):
            shard_scores(out, shard)
    with meter.stage("finalize"):
        return finalize(out)


def training_epoch_seconds(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                           device: torch.device, epochs: int = 1) -> float:
    """Seconds of one epoch of the training objective (as ecif_core.train: AdamW on every weight,
    contrastive loss), preprocessed batches in memory; the fastest of `epochs`."""
    from ecif_core.influence.losses import batch_loss, pair_logits

    model = model.to(device).train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    best = float("inf")
    for _ in range(epochs):
        _sync(device)
        started = time.perf_counter()
        for images, tokens in batches:
            logits = pair_logits(model.encode_text(tokens.to(device)), model.encode_image(images.to(device)),
                                 model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            batch_loss(logits).backward()
            optimizer.step()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    model.eval()
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- parts

def tiny_part(out: Path, batch_sizes: list[int], n_train: int, device: torch.device) -> list[dict]:
    from ecif_core.datasets.digits import build_digits
    from ecif_core.demo import tiny_model_config
    from ecif_core.influence.memory import choose_method
    from ecif_core.train import TrainConfig, train

    data = build_digits(out / "digits", fraction=0.2, seed=0, n_train=n_train, n_val=60, n_test=20)
    (out / "tiny.json").write_text(json.dumps(tiny_model_config()))
    rows = []
    for batch in batch_sizes:
        model = out / f"tiny-b{batch}.pt"
        trained = train(data.train, out / "tiny.json", model, TrainConfig(epochs=2, batch_size=batch, lr=1e-3, seed=0))
        epoch = min(trained.epoch_seconds)
        manifest = out / f"tiny-b{batch}.manifest.json"
        manifest.write_text(json.dumps({"model": {"config": "tiny.json", "checkpoint": model.name},
                                        "train": str(data.train), "options": {}}))
        meter = Meter(device)
        folder = out / f"tiny-b{batch}-audit"
        _fresh(folder)
        staged_audit(manifest, folder, meter)
        total = sum(s["s"] for s in meter.stages.values())
        embed_dim = tiny_model_config()["embed_dim"]
        rows.append({"model": "tiny", "B": batch, "pairs": n_train, "path": choose_method(batch, embed_dim, True),
                     "epoch_s": epoch, "audit_s": total, "audit_per_epoch": total / epoch, "stages": meter.stages})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def vit_checkpoint(out: Path) -> Path:
    """A seeded random-init ViT-B-32 state dict (nothing can be downloaded)."""
    from ecif_core.models.factory import build_model, resolve_model_config

    path = out / "vit-b-32-random.pt"
    if not path.exists():
        torch.save(build_model(resolve_model_config("ViT-B-32"), seed=0).state_dict(), path)
    return path


def synthetic_pairs(out: Path, n: int, size: int = 32, seed: int = 0) -> Path:
    """n pairs of random small PNG images (the model's transform resizes them) and captions."""
    from PIL import Image

    path = out / f"pairs-{n}.jsonl"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    words = "cat dog car tree house boat bird plane red green blue small large photo of a the".split()
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    palette = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(64)]
    for i in range(64):
        Image.fromarray(palette[i]).save(images / f"{i}.png")
    with path.open("w") as handle:
        for i in range(n):
            caption = " ".join(rng.choice(words, size=6))
            handle.write(json.dumps({"id": f"p{i}", "image": f"images/{i % 64}.png", "caption": caption}) + "\n")
    return path


def vit_part(out: Path, batch_sizes: list[int], batches: int, device: torch.device, thetas: dict,
             pairs_total: int | None = None, epoch_batches: int | None = None,
             memory_limit: str | None = None) -> list[dict]:
    from ecif_core.data.images import load_batch
    from ecif_core.data.sources import read_pairs
    from ecif_core.influence.memory import choose_method
    from ecif_core.models.factory import load_model

    checkpoint = vit_checkpoint(out)
    rows = []
    for batch in batch_sizes:
        n = pairs_total or batch * batches
        data = synthetic_pairs(out, n)
        loaded = load_model("ViT-B-32", checkpoint=checkpoint)
        pairs, _, _ = read_pairs(data)
        timed = pairs[:batch * (epoch_batches or batches)]
        cached = [load_batch(timed[i:i + batch], loaded.preprocess, loaded.tokenizer)
                  for i in range(0, len(timed), batch)]
        epoch = training_epoch_seconds(loaded.model, cached, device, epochs=2) * n / len(timed)
        del loaded, cached
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for label, theta in thetas.items():
            options = {"batch_size": batch, "shard_batches": 8}
            if theta is not None:
                options["theta"] = theta
            if memory_limit:
                options["memory_limit"] = memory_limit
            manifest = out / f"vit-b{batch}-{label}.manifest.json"
            manifest.write_text(json.dumps({"model": {"arch": "ViT-B-32", "checkpoint": checkpoint.name},
                                            "train": data.name, "options": options}))
            folder = out / f"vit-b{batch}-{label}-audit"
            _fresh(folder)
            meter = Meter(device)
            staged_audit(manifest, folder, meter)
            total = sum(s["s"] for s in meter.stages.values())
            grad_s = meter.stages["gradients"]["s"]
            rows.append({"model": "ViT-B-32", "theta": label, "B": batch, "pairs": n,
                         "path": "head" if theta in (None, thetas.get("projections")) else choose_method(batch, 512, True),
                         "epoch_s": epoch, "audit_s": total,
                         "audit_per_epoch": total / epoch, "gradients_pairs_per_s": n / grad_s,
                         "audit_pairs_per_s": n / total, "stages": meter.stages})
            print(json.dumps(rows[-1]), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


class _Stop(Exception):
    pass


def probe_part(out: Path, batch: int, backwards: int, memory_limit: str | None, device: torch.device,
               chunk: int = 64) -> dict:
    """Peak memory of the ViT-B-32 gradients stage at batch B, stopped after a few backwards."""
    from ecif_core.data.images import load_batch
    from ecif_core.data.sources import read_pairs
    from ecif_core.influence.gradients import per_pair_gradients
    from ecif_core.influence.memory import parse_bytes
    from ecif_core.models.factory import load_model, restrict_grad_to, select_theta
    from ecif_core.influence.projection import Projector, ProjectionSpec
    from ecif_core.influence import memory

    loaded = load_model("ViT-B-32", checkpoint=vit_checkpoint(out))
    loaded.model.to(device)
    theta = select_theta(loaded.model)
    restrict_grad_to(loaded.model, theta)
    projector = Projector.for_theta(theta, ProjectionSpec(8, 8, 0))
    pairs, _, _ = read_pairs(synthetic_pairs(out, batch))
    images, tokens = load_batch(pairs[:batch], loaded.preprocess, loaded.tokenizer)
    plans, calls = [], [0]
    real_plan, real_grad = memory.plan_chunks, torch.autograd.grad
    memory.plan_chunks = lambda *a: plans.append(real_plan(*a)) or plans[-1]

    def counted(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            calls[0] += 1
            if calls[0] > backwards:
                raise _Stop
        return real_grad(*args, **kwargs)

    torch.autograd.grad = counted
    meter = Meter(device)
    started = time.perf_counter()
    try:
        with meter.stage("gradients"):
            per_pair_gradients(loaded.model, [p for _, p in theta], projector, images, tokens, chunk=chunk,
                               memory_limit=parse_bytes(memory_limit or None))
    except _Stop:
        pass
    finally:
        torch.autograd.grad, memory.plan_chunks = real_grad, real_plan
    row = {"model": "ViT-B-32", "B": batch, "memory_limit": memory_limit, "plan_items_chunk": plans[:1],
           "backwards_run": min(calls[0], backwards), "seconds": time.perf_counter() - started, **meter.stages["gradients"]}
    print(json.dumps(row), flush=True)
    return row


def store_part(out: Path, sizes: list[int], dim: int, shard_rows: int) -> list[dict]:
    """Curvature and scoring of synthetic stores of N pairs (random gradients, real partial sums)."""
    from ecif_core.influence.curvature import fisher_sum
    from ecif_core.data.manifest import AuditOptions

    rows = []
    for n in sizes:
        folder = out / f"store-{n}"
        _fresh(folder)
        folder.mkdir(parents=True)
        shards = -(-n // shard_rows)
        store = audit.open_store(folder)
        store.create(rows=shards * shard_rows, dim=dim, shard_rows=shard_rows, shards=shards, attrs={})
        rng = np.random.default_rng(0)
        for shard in range(shards):
            grads = {name: rng.standard_normal((shard_rows, dim), dtype=np.float32) * 1e-2 for name in ("pos", "neg")}
            store.write_gradients(shard * shard_rows, grads)
            if shard_rows >= 2 * dim:  # as the gradients stage does (stages.curvature.partial_sums_pay)
                store.write_fisher_partial(shard, fisher_sum([torch.from_numpy(grads["pos"])], dim).numpy())
            store.mark_done("gradients", shard)
        manifest = {"train": "x", "validation": None, "model": {"arch": "x", "config": None, "checkpoint": "x"},
                    "options": AuditOptions().__dict__, "excluded": [], "ids_digest": None}
        plan = {"manifest": manifest, "batch_size": 32, "n_batches": shards * shard_rows // 32,
                "shard_batches": shard_rows // 32, "shards": shards, "dim": dim, "pairs_total": n,
                "pairs_rejected": 0, "blocks": [{"name": "all", "start": 0, "stop": dim}], "shard_offsets": []}
        (folder / "plan.json").write_text(json.dumps(plan))
        meter = Meter(torch.device("cpu"))
        with meter.stage("curvature"):
            curvature(folder)
        for shard in range(shards):
            with meter.stage("scores"):
                shard_scores(folder, shard)
        rows.append({"pairs": n, "k": dim, "shards": shards, "stages": meter.stages})
        print(json.dumps(rows[-1]), flush=True)
        _fresh(folder)
    return rows


def estimate_part(out: Path, batch_sizes: list[int], n_train: int, threads: int, batches: int | None) -> list[dict]:
    """The estimate against the real audit on the same data, each in a fresh process (module docstring)."""
    import subprocess
    import sys

    from ecif_core.datasets.digits import build_digits
    from ecif_core.demo import tiny_model_config
    from ecif_core.train import TrainConfig, train

    data = build_digits(out / "digits", fraction=0.2, seed=0, n_train=n_train, n_val=60, n_test=20)
    (out / "tiny.json").write_text(json.dumps(tiny_model_config()))
    root, env = _child_env(threads)
    rows = []
    for batch in batch_sizes:
        model = out / f"tiny-b{batch}.pt"
        if not model.exists():
            train(data.train, out / "tiny.json", model, TrainConfig(epochs=1, batch_size=batch, lr=1e-3, seed=0))
        manifest = out / f"estimate-b{batch}.manifest.json"
        manifest.write_text(json.dumps({"model": {"config": "tiny.json", "checkpoint": model.name},
                                        "train": str(data.train), "validation": str(data.validation), "options": {}}))
        command = [sys.executable, "-m", "services.cli", "validate", "--estimate", "--threads", str(threads),
                   "--device", "cpu", str(manifest)]
        if batches:
            command[5:5] = ["--estimate-batches", str(batches)]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=root)
        estimate_wall = time.perf_counter() - started
        estimate = json.loads(done.stdout)["estimate"]
        folder = out / f"estimate-b{batch}-audit"
        _fresh(folder)
        audited = subprocess.run([sys.executable, "-m", "bench.scale", "--child-audit", str(manifest), str(folder),
                                  "--threads", str(threads), "--device", "cpu"],
                                 env=env, capture_output=True, text=True, check=True, cwd=root)
        stages = json.loads(audited.stdout.strip().splitlines()[-1])
        actual = sum(v["s"] for v in stages.values())
        written = audit.open_store(folder).written_bytes()
        rows.append({"model": "tiny", "B": batch, "pairs": n_train, "threads": threads,
                     "batches_timed": len(estimate["measured"]["batch_s"]), "estimate_wall_s": estimate_wall,
                     "estimated_s": estimate["total_s"], "actual_s": actual, "ratio": estimate["total_s"] / actual,
                     "stages": {name: {"estimated_s": estimate["stages"][name], "actual_s": stages[name]["s"]}
                                for name in estimate["stages"]},
                     "store_bytes_estimated": estimate["store_bytes"], "store_bytes_written": written,
                     "summary": estimate["summary"], "measured": estimate["measured"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def repeated_pairs(source: Path, n: int, out: Path) -> Path:
    """The first n rows of `source` cycled, the k-th repeat's ids suffixed "-rk" (digits holds 1,797
    images; the cost of a pair does not depend on whether its image repeats)."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    with out.open("w") as handle:
        for i in range(n):
            row = dict(rows[i % len(rows)])
            if i >= len(rows):
                row["id"] = f"{row['id']}-r{i // len(rows)}"
            handle.write(json.dumps(row) + "\n")
    return out


def marginal_part(out: Path, batch_sizes: list[int], sizes: list[int], threads: int, thetas: list[str]) -> list[dict]:
    """Per B: the tiny CLIP trained two epochs on each size of digits pairs (the fastest epoch of the
    largest set is the yardstick), then each size audited with each theta ("default" = the product's;
    "blocks:N"; or comma-free fnmatch patterns joined by "+") in a fresh process (bench.scale
    --child-audit: everything `ecif audit` pays but the interpreter's start; the open_clip import is
    timed apart first: a worker pays it once). Cost per added pair = (audit(N_large) - audit(N_small)) /
    (N_large - N_small) over the epoch's cost per pair; the whole largest audit over one epoch of its pairs,
    without and with the import."""
    import subprocess
    import sys

    from ecif_core.datasets.digits import build_digits
    from ecif_core.demo import tiny_model_config
    from ecif_core.train import TrainConfig, train

    data = build_digits(out / "digits-marginal", fraction=0.2, seed=0, n_train=None, n_val=60, n_test=20)
    (out / "tiny.json").write_text(json.dumps(tiny_model_config()))
    root, env = _child_env(threads)
    rows = []
    for batch in batch_sizes:
        epochs, manifests = {}, {}
        for n in sizes:
            pairs = repeated_pairs(data.train, n, data.train.parent / f"train-{n}.jsonl")
            model = out / f"marginal-b{batch}-n{n}.pt"
            trained = train(pairs, out / "tiny.json", model, TrainConfig(epochs=2, batch_size=batch, lr=1e-3, seed=0))
            epochs[n], manifests[n] = min(trained.epoch_seconds), (model, pairs)
        for theta in thetas:
            row: dict = {"model": "tiny", "B": batch, "threads": threads, "theta": theta, "sizes": {}}
            for n in sizes:
                model, pairs = manifests[n]
                label = re.sub(r"[^A-Za-z0-9]+", "-", theta)
                manifest = out / f"marginal-b{batch}-n{n}-{label}.manifest.json"
                options = {} if theta == "default" else {"theta": theta.split("+")}
                manifest.write_text(json.dumps({"model": {"config": "tiny.json", "checkpoint": model.name},
                                                "train": str(pairs), "validation": str(data.validation),
                                                "options": options}))
                folder = out / f"marginal-b{batch}-n{n}-{label}-audit"
                _fresh(folder)
                audited = subprocess.run([sys.executable, "-m", "bench.scale", "--child-audit", str(manifest),
                                          str(folder), "--child-import-apart", "--threads", str(threads),
                                          "--device", "cpu"],
                                         env=env, capture_output=True, text=True, check=True, cwd=root)
                stages = json.loads(audited.stdout.strip().splitlines()[-1])
                imported = stages.pop("import")["s"]
                row["sizes"][n] = {"epoch_s": epochs[n], "audit_s": sum(v["s"] for v in stages.values()),
                                   "import_s": imported, "stages": {name: round(v["s"], 3) for name, v in stages.items()}}
            small, large = min(sizes), max(sizes)
            a, b = row["sizes"][small], row["sizes"][large]
            epoch_per_pair = b["epoch_s"] / large
            per_added = (b["audit_s"] - a["audit_s"]) / (large - small)
            row.update({"epoch_ms_per_pair": 1000 * epoch_per_pair, "audit_ms_per_added_pair": 1000 * per_added,
                        "added_pair_over_epoch_pair": per_added / epoch_per_pair,
                        "fixed_s": a["audit_s"] - per_added * small,
                        "largest_audit_over_epoch": b["audit_s"] / b["epoch_s"],
                        "largest_audit_with_import_over_epoch": (b["audit_s"] + b["import_s"]) / b["epoch_s"]})
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _child_env(threads: int) -> tuple[Path, dict[str, str]]:
    """(the repository root, the environment) for a fresh `python -m bench.scale` or `services.cli` process."""
    root = Path(__file__).resolve().parent.parent
    return root, {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
                  "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def child_audit(manifest: Path, folder: Path, import_apart: bool = False) -> None:
    """--child-audit: the staged audit in this (fresh) process; prints its stages' seconds as one JSON line.
    `import_apart`: open_clip is imported first and timed as its own entry "import" (a worker pays it
    once; otherwise prepare pays it, as `ecif audit` does)."""
    meter = Meter(torch.device("cpu"))
    if import_apart:
        with meter.stage("import"):
            import open_clip  # noqa: F401
    staged_audit(manifest, folder, meter)
    print(json.dumps(meter.stages), flush=True)


def _fresh(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="tiny,vit,probe,store")
    parser.add_argument("--out", default="bench/out/scale")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiny-batch-sizes", default="32,128,256")
    parser.add_argument("--tiny-pairs", type=int, default=1200)
    parser.add_argument("--vit-batch-sizes", default="32")
    parser.add_argument("--vit-batches", type=int, default=2, help="batches per B (pairs = B x this)")
    parser.add_argument("--vit-pairs", type=int, default=None, help="pairs per ViT audit (overrides --vit-batches)")
    parser.add_argument("--vit-epoch-batches", type=int, default=None, help="batches timed for the epoch figure")
    parser.add_argument("--vit-thetas", default="default,projections")
    parser.add_argument("--memory-limit", default=None, help="the audits' memory_limit option")
    parser.add_argument("--probe-batch", type=int, default=256)
    parser.add_argument("--probe-backwards", type=int, default=3)
    parser.add_argument("--probe-memory-limit", default="6GB")
    parser.add_argument("--store-sizes", default="1000,10000,100000")
    parser.add_argument("--store-dim", type=int, default=1152)
    parser.add_argument("--store-shard-rows", type=int, default=2048)
    parser.add_argument("--estimate-batch-sizes", default="32,256")
    parser.add_argument("--estimate-pairs", type=int, default=1400)
    parser.add_argument("--estimate-batches", type=int, default=None, help="batches the estimate times (default 3)")
    parser.add_argument("--marginal-batch-sizes", default="32,256")
    parser.add_argument("--marginal-sizes", default="1400,5600", help="pairs per audit (the smallest and largest give the slope)")
    parser.add_argument("--marginal-thetas", default="default,blocks:1,blocks:2",
                        help="comma-separated thetas: default (the product's), blocks:N, or patterns joined by +")
    parser.add_argument("--child-import-apart", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-audit", nargs=2, metavar=("MANIFEST", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a reduced run (tests, a CPU rehearsal)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = set_threads(args.threads)
    if args.child_audit:
        os.environ["ECIF_DEVICE"] = args.device
        child_audit(Path(args.child_audit[0]), Path(args.child_audit[1]), args.child_import_apart)
        return {}
    if args.quick:
        args.tiny_batch_sizes, args.tiny_pairs, args.vit_batches = "8,16", 64, 1
        args.store_sizes, args.store_dim, args.store_shard_rows = "500,2000", 64, 256
        args.probe_batch, args.probe_backwards = 8, 1
        args.estimate_batch_sizes, args.estimate_pairs, args.estimate_batches = "8", 64, 1
        args.marginal_batch_sizes, args.marginal_sizes = "8", "64,128"
    device = torch.device(args.device)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    ints = lambda text: [int(x) for x in text.split(",") if x]
    thetas = {"default": None, "projections": ["visual.proj", "text_projection"], "blocks2": ["blocks:2"]}
    result: dict = {"device": str(device), "torch": torch.__version__, "threads": threads,
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    if "tiny" in parts:
        result["tiny"] = tiny_part(out, ints(args.tiny_batch_sizes), args.tiny_pairs, device)
    if "vit" in parts:
        result["vit"] = vit_part(out, ints(args.vit_batch_sizes), args.vit_batches, device,
                                 {k: thetas[k] for k in args.vit_thetas.split(",")}, args.vit_pairs,
                                 args.vit_epoch_batches, args.memory_limit)
    if "probe" in parts:
        result["probe"] = probe_part(out, args.probe_batch, args.probe_backwards, args.probe_memory_limit, device)
    if "store" in parts:
        result["store"] = store_part(out, ints(args.store_sizes), args.store_dim, args.store_shard_rows)
    if "estimate" in parts:
        result["estimate"] = estimate_part(out, ints(args.estimate_batch_sizes), args.estimate_pairs, threads,
                                           args.estimate_batches)
    if "marginal" in parts:
        result["marginal"] = marginal_part(out, ints(args.marginal_batch_sizes), ints(args.marginal_sizes), threads,
                                           args.marginal_thetas.split(","))
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
