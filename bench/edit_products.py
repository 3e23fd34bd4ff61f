"""The edit's Hessian-vector products with and without the trunk cache (issue 22, item 4).

CG runs one product per iteration over every training batch. With theta inside the towers (the
default: the last two blocks plus the projections), the blocks below theta give the same output at
every product; the objective keeps it per batch (ecif_core.edit.caches.trunk_outputs) and each
product runs only the blocks from theta up. This times both on random pairs, one thread:

    OMP_NUM_THREADS=1 python -m bench.edit_products [--layers 3 12] [--pairs 256] [--products 5]

`--layers`: tower depths to measure (3 = the bundled tiny CLIP; 12 = ViT-B-32's depth at the tiny
width). Prints ms per product and the ratio.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Sequence

import torch

from ecif_core.demo import tiny_model_config
from ecif_core.edit.solver import LeaveOutObjective, TrainingBatch
from ecif_core.models.factory import block_theta_patterns, load_model, restrict_grad_to, select_theta


def measure(layers: int, pairs: int, batch_size: int, products: int, seed: int = 0) -> dict:
    config = copy.deepcopy(tiny_model_config())
    config["vision_cfg"]["layers"] = config["text_cfg"]["layers"] = layers
    loaded = load_model(config=config, seed=seed)
    model = loaded.model.eval()
    theta = select_theta(model, block_theta_patterns(model, 2))
    restrict_grad_to(model, theta)
    generator = torch.Generator().manual_seed(seed)
    size = config["vision_cfg"]["image_size"]
    batches = []
    for start in range(0, pairs, batch_size):
        n = min(batch_size, pairs - start)
        images = torch.randn(n, 3, size, size, generator=generator)
        tokens = loaded.tokenizer([f"a photo of thing {start + i}" for i in range(n)])
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[0] = True
        batches.append(TrainingBatch(images, tokens, chosen))
    out = {"layers": layers, "pairs": pairs, "batch_size": batch_size, "theta": block_theta_patterns(model, 2)}
    vector = None
    for name, flag in (("recomputed", False), ("trunk_cache", None)):
        started = time.perf_counter()
        objective = LeaveOutObjective(model, theta, batches, 1e-2, use_feature_cache=flag)
        setup = time.perf_counter() - started
        if vector is None:
            vector = torch.randn(sum(p.numel() for _, p in theta), generator=generator, dtype=torch.float64)
        objective.hessian_vector_product(vector)  # warm-up
        started = time.perf_counter()
        for _ in range(products):
            objective.hessian_vector_product(vector)
        out[name] = {"setup_s": setup, "ms_per_product": 1000 * (time.perf_counter() - started) / products,
                     "trunk_cache": objective.uses_trunk_cache}
    out["speedup"] = out["recomputed"]["ms_per_product"] / out["trunk_cache"]["ms_per_product"]
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.edit_products", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 12])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--products", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [measure(layers, args.pairs, args.batch_size, args.products) for layers in args.layers]
    for r in results:
        print(f"{r['layers']} blocks per tower, {r['pairs']} pairs, B {r['batch_size']}: "
              f"{r['recomputed']['ms_per_product']:.0f} ms per product recomputing the trunk, "
              f"{r['trunk_cache']['ms_per_product']:.0f} ms with the trunk cache ({r['speedup']:.2f}x; "
              f"cache built in {r['trunk_cache']['setup_s']:.2f} s)")
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
