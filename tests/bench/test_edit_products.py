"""bench.edit_products on tiny sizes: both variants run, the cached one uses the trunk cache."""
from __future__ import annotations

import torch

from bench.edit_products import measure


def test_both_variants_are_timed_and_only_one_caches_the_trunk() -> None:
    threads = torch.get_num_threads()
    try:
        result = measure(layers=3, pairs=8, batch_size=4, products=1)
    finally:
        torch.set_num_threads(threads)
    assert result["trunk_cache"]["trunk_cache"] and not result["recomputed"]["trunk_cache"]
    assert result["recomputed"]["ms_per_product"] > 0 and result["speedup"] > 0
