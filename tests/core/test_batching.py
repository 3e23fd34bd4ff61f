"""The partition depends on (ids, seed, batch size) only; removals leave other batches intact."""
import random

from ecif_core.data.batching import partition


def test_same_partition_for_shuffled_input_order():
    ids = [f"pair-{i:04d}" for i in range(103)]
    shuffled = ids[:]
    random.Random(7).shuffle(shuffled)
    assert partition(ids, 16, seed=3) == partition(shuffled, 16, seed=3)
    assert partition(ids, 16, seed=3) != partition(ids, 16, seed=4)


def test_partition_covers_every_id_once_in_batches_of_b():
    ids = [str(i) for i in range(50)]
    batches = partition(ids, 8, seed=0)
    assert sorted(i for b in batches for i in b) == sorted(ids)
    assert [len(b) for b in batches] == [8] * 6 + [2]


def test_dropping_ids_keeps_every_other_batch():
    ids = [str(i) for i in range(40)]
    full = partition(ids, 8, seed=1)
    dropped = {full[2][0], full[4][3]}
    reduced = partition(ids, 8, seed=1, drop=dropped)
    assert len(reduced) == len(full)
    for before, after in zip(full, reduced):
        assert after == [i for i in before if i not in dropped]
