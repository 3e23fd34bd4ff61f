"""Per-pair gradient cost, today's path against the per-item cotangent basis, beside a training
step on the same batch (docs/METHOD.md, "Per-item cotangent basis"; bench/RESULTS.md).

    OMP_NUM_THREADS=1 python -m bench.basis [--models tiny,tiny-d512] [--batch-sizes 32,256]
        [--repeats 2] [--old today|onehot] [--thetas projections,last-block,last-two]

For each model (random init), batch size B and theta (the projections; the last block plus the
projections; the last two blocks plus the projections, today's default) on one synthetic batch,
one thread:
- train: one training step (AdamW on every weight, the contrastive loss), the fastest of 3;
- old: per_pair_gradients as before the basis: "per_item_onehot" (D directions) when D < 3B,
  else "per_pair" (3B), the trunk below theta recomputed per slice of items;
- new: method "auto" (choose_method's flop model: per item with min(D, B + 1) directions, or
  per pair where theta's layers make a direction cheap), the trunk replayed per slice.
Both with the audit's defaults (8 x 8 projection, chunk 64, CPU slices); the fastest of
--repeats runs. Times are ms per pair; ratios come from the same run (the machine is shared).
Models: tiny = ecif_core/configs/tiny-clip.json (D = 32); tiny-d512 = the same towers with
embed_dim 512 (D = 512 as ViT-B-32, whose 12 blocks are too slow for this CPU bench).
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from importlib import resources
from typing import Iterator

import torch

from ecif_core.influence import gradients
from ecif_core.influence.gradients import per_pair_gradients
from ecif_core.influence.memory import TERMS_PER_PAIR, item_directions
from ecif_core.influence.projection import Projector, ProjectionSpec
from ecif_core.models.factory import block_theta_patterns, load_model, restrict_grad_to, select_theta


def model_config(name: str) -> dict:
    config = json.loads(resources.files("ecif_core.configs").joinpath("tiny-clip.json").read_text())
    if name == "tiny-d512":
        config["embed_dim"] = 512
    elif name != "tiny":
        raise SystemExit(f"unknown model {name!r}: tiny or tiny-d512")
    return config


def synthetic_batch(loaded, config: dict, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    side = config["vision_cfg"]["image_size"]
    images = torch.randn(size, 3, side, side, generator=generator)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    order = torch.randint(0, 10, (size, 3), generator=generator).tolist()
    return images, loaded.tokenizer([" ".join(["a"] + [words[w] for w in row]) for row in order])


def train_step_seconds(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, repeats: int = 3) -> float:
    """The fastest of `repeats` training steps (as ecif_core.train: AdamW, every weight)."""
    from ecif_core.influence.losses import batch_loss, pair_logits

    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        logits = pair_logits(model.encode_text(tokens), model.encode_image(images), model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        batch_loss(logits).backward()
        optimizer.step()
        best = min(best, time.perf_counter() - started)
    model.eval()
    return best


class _NoTrunk:
    """TrunkCache that replays nothing: the forward before the trunk cache (the old path)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    @contextmanager
    def capture(self) -> Iterator[None]:
        yield

    @contextmanager
    def replay(self, start: int, stop: int) -> Iterator[None]:
        yield


def old_method(batch: int, dim: int) -> str:
    """What per_pair_gradients ran before the basis: D one-hot directions when D < 3B."""
    return "per_item_onehot" if dim < TERMS_PER_PAIR * batch else "per_pair"


def gradient_seconds(model, params, projector, images, tokens, methods: list[tuple[str, bool]],
                     repeats: int) -> tuple[list[float], list[str]]:
    """The fastest of `repeats` runs of each (method, old) on the batch, interleaved (A B A B) so
    a change in the shared machine's load hits both; and the path each one ran."""
    best = [float("inf")] * len(methods)
    ran = [""] * len(methods)
    real, real_slice = gradients.TrunkCache, gradients._gradients_of_slice
    for _ in range(repeats):
        for position, (method, old) in enumerate(methods):
            gradients.TrunkCache = _NoTrunk if old else real
            gradients._gradients_of_slice = lambda *a, _p=position, **k: ran.__setitem__(_p, a[0]) or real_slice(*a, **k)
            try:
                started = time.perf_counter()
                per_pair_gradients(model, params, projector, images, tokens, "exact", 64, method)
                best[position] = min(best[position], time.perf_counter() - started)
            finally:
                gradients.TrunkCache, gradients._gradients_of_slice = real, real_slice
    return best, ran


THETA_NAMES = ("projections", "last-block", "last-two")


def run(models: list[str], batch_sizes: list[int], repeats: int, old: str = "today",
        thetas_wanted: list[str] | None = None) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for name in models:
        config = model_config(name)
        loaded = load_model(config=config, seed=0)
        model = loaded.model.eval()
        dim = config["embed_dim"]
        thetas = {"projections": ["visual.proj", "text_projection"],
                  "last block + projections": block_theta_patterns(model, 1),
                  "last two blocks + projections (blocks:2)": block_theta_patterns(model, 2)}
        short = dict(zip(thetas, THETA_NAMES))
        thetas = {k: v for k, v in thetas.items() if not thetas_wanted or short[k] in thetas_wanted}
        for batch in batch_sizes:
            images, tokens = synthetic_batch(loaded, config, batch)
            train = train_step_seconds(model, images, tokens)
            for label, patterns in thetas.items():
                theta = select_theta(model, patterns)
                restrict_grad_to(model, theta)
                params = [p for _, p in theta]
                projector = Projector.for_theta(theta, ProjectionSpec(8, 8, 0))
                old_path = old_method(batch, dim) if old == "today" else "per_item_onehot"
                (old, new), (_, new_path) = gradient_seconds(model, params, projector, images, tokens,
                                                             [(old_path, True), ("auto", False)], repeats)
                new_directions = item_directions(batch, dim) if new_path == "per_item" else 3 * batch
                row = {"model": name, "D": dim, "B": batch, "theta": label, "k": projector.dim,
                       "old_path": old_path, "old_directions": dim if old_path == "per_item_onehot" else 3 * batch,
                       "new_path": new_path, "new_directions": new_directions,
                       "train_ms_per_pair": 1e3 * train / batch, "old_ms_per_pair": 1e3 * old / batch,
                       "new_ms_per_pair": 1e3 * new / batch, "old_over_new": old / new,
                       "old_over_train": old / train, "new_over_train": new / train}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model (D) | B | theta | train ms/pair | old path (directions) | new path (directions) "
             "| old ms/pair | new ms/pair | old / new | old / train | new / train |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['model']} ({r['D']}) | {r['B']} | {r['theta']} | {r['train_ms_per_pair']:.3f} "
                     f"| {r['old_path']} ({r['old_directions']}) | {r['new_path']} ({r['new_directions']}) "
                     f"| {r['old_ms_per_pair']:.2f} | {r['new_ms_per_pair']:.2f} | {r['old_over_new']:.2f} "
                     f"| {r['old_over_train']:.1f} | {r['new_over_train']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,tiny-d512")
    parser.add_argument("--batch-sizes", default="32,256")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--old", choices=["today", "onehot"], default="today",
                        help="old = the path chosen before the basis, or always the one-hot per-item path")
    parser.add_argument("--thetas", default="", help="comma list of projections, last-block, last-two (default: all)")
    args = parser.parse_args(argv)
    rows = run(args.models.split(","), [int(b) for b in args.batch_sizes.split(",")], args.repeats, args.old,
               [t for t in args.thetas.split(",") if t])
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
