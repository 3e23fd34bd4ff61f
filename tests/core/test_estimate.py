"""The cost estimate before an audit (ecif_core.estimate): its arithmetic on fake timings, and its
store size against the arrays a real audit writes (exact, so the comparison is equality)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ecif_core.data.batching import batch_count, training_batches
from ecif_core.data.manifest import load_manifest
from ecif_core.datasets.digits import build_digits
from ecif_core.estimate import FINALIZE_PAIR_S, Measured, duration, estimate_audit, extrapolate, size
from ecif_core.stages.plan import load_plan, open_store
from ecif_core.stages.table import STAGES
from ecif_core.train import TrainConfig, train
from services.embedded import run_audit
from tests.core.helpers import MICRO_CONFIG


def _measured(**changes) -> Measured:
    values = dict(batch_size=32, load_s=5.0, warmup_s=1.0, batch_s=[3.2, 3.2, 3.2], prepare_row_s=0.001,
                  fisher_shard_s=0.5, eigh_s=2.0, score_shard_s=0.25, validation_pair_s=0.2, startup_s=4.0)
    return Measured(**{**values, **changes})


def test_extrapolation_of_fake_timings_gives_the_hand_computed_stages():
    # 12,000 pairs at B = 32: 375 batches, 47 shards of 8 batches (256 rows); k = 1,152 is too wide
    # for the shards' partial sums (256 x 4 < 1,152 x 8), so curvature sums the rows itself.
    estimate = extrapolate(_measured(), pairs=12_000, validation_pairs=300, shard_batches=8, dim=1152)
    assert estimate.shards == 47 and tuple(estimate.stages) == tuple(s.name for s in STAGES)
    assert estimate.stages["prepare"] == pytest.approx(4.0 + 12_000 * 0.001)
    assert estimate.stages["gradients"] == pytest.approx(5.0 + 1.0 + 12_000 * 0.1)  # 3.2 s / 32 pairs
    assert estimate.stages["curvature"] == pytest.approx(2.0 + 47 * 0.5)
    assert estimate.stages["validation"] == pytest.approx(300 * 0.001 + 300 * 0.2)
    assert estimate.stages["scores"] == pytest.approx(47 * 0.25)
    assert estimate.stages["finalize"] == pytest.approx(12_000 * FINALIZE_PAIR_S)
    assert estimate.total_s == pytest.approx(16.0 + 1206.0 + 25.5 + 60.3 + 11.75 + 0.36)
    assert estimate.fixed_s == pytest.approx(10.0)
    # two workers split the shards of the sharded stages, not the fixed overhead
    two = extrapolate(_measured(), pairs=12_000, validation_pairs=300, shard_batches=8, dim=1152, workers=2)
    assert two.stages["gradients"] == pytest.approx(6.0 + 600.0) and two.stages["scores"] == pytest.approx(47 * 0.125)
    assert two.stages["curvature"] == estimate.stages["curvature"]


def test_extrapolation_moves_the_fisher_sums_into_the_shards_when_they_pay_and_skips_a_lone_validation_pair():
    # k = 64: a shard of 256 rows stores its 64 x 64 sum (256 x 4 >= 64 x 8), in the gradients stage
    estimate = extrapolate(_measured(validation_pair_s=None), pairs=1_000, validation_pairs=0, shard_batches=8, dim=64)
    assert estimate.shards == 4  # 31 full batches + one of 8 = 32 batches
    assert estimate.stages["gradients"] == pytest.approx(6.0 + 100.0 + 4 * 0.5)
    assert estimate.stages["curvature"] == pytest.approx(2.0) and estimate.stages["validation"] == 0.0
    with_lone = extrapolate(_measured(), pairs=1_000, validation_pairs=33, shard_batches=8, dim=64)
    assert with_lone.stages["validation"] == pytest.approx(33 * 0.001 + 32 * 0.2)  # the 33rd is alone in its batch


def test_store_io_counts_per_shard_and_is_split_between_workers_where_the_stage_is_sharded():
    io = {"gradients": 0.1, "curvature": 0.01, "scores": 0.2}
    base = extrapolate(_measured(), pairs=12_000, validation_pairs=300, shard_batches=8, dim=1152)
    with_io = extrapolate(_measured(io_shard_s=io, create_s=0.5, finalize_s=0.3), pairs=12_000, validation_pairs=300,
                          shard_batches=8, dim=1152, workers=2)
    two = extrapolate(_measured(), pairs=12_000, validation_pairs=300, shard_batches=8, dim=1152, workers=2)
    assert with_io.stages["prepare"] == pytest.approx(base.stages["prepare"] + 0.5)
    assert with_io.stages["gradients"] == pytest.approx(two.stages["gradients"] + 47 * 0.1 / 2)
    assert with_io.stages["curvature"] == pytest.approx(base.stages["curvature"] + 47 * 0.01)  # one task
    assert with_io.stages["scores"] == pytest.approx(two.stages["scores"] + 47 * 0.2 / 2)
    assert with_io.stages["finalize"] == pytest.approx(base.stages["finalize"] + 0.3)  # columns read once


def test_one_steady_batch_rate_and_the_summary_line():
    estimate = extrapolate(_measured(batch_s=[6.4]), pairs=12_000, validation_pairs=0, shard_batches=8, dim=1152)
    assert estimate.measured.pair_s == pytest.approx(0.2)
    line = estimate.summary()
    assert line.startswith(f"Expected: about {duration(estimate.total_s)} for 12,000 pairs (prepare 16 s, gradients 40 min 6 s")
    assert f"store about {size(estimate.store_bytes)}; measured on 1 batch of 32 on cpu, 1 thread" in line
    assert json.loads(json.dumps(estimate.to_json()))["total_s"] == pytest.approx(estimate.total_s)


def test_durations_and_sizes_read_as_a_person_says_them():
    assert [duration(s) for s in (0.4, 45, 250, 3600, 12_000)] == ["0 s", "45 s", "4 min 10 s", "1 h", "3 h 20 min"]
    assert [size(n) for n in (512, 1_200_000_000, 830_000_000, 12_345)] == ["512 bytes", "1.2 GB", "830 MB", "12 kB"]


@pytest.mark.parametrize("pairs", [2, 3, 31, 32, 33, 34, 63, 64, 65, 100])
@pytest.mark.parametrize("size_b", [2, 3, 8, 32])
def test_batch_count_is_the_number_of_training_batches(pairs, size_b):
    batches, _ = training_batches([f"p{i}" for i in range(pairs)], size_b, seed=0)
    assert batch_count(pairs, size_b) == len(batches)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Digits (44 train pairs: a short last batch at B = 8; 9 validation pairs: a lone one), a micro CLIP."""
    root = tmp_path_factory.mktemp("estimate")
    data = build_digits(root / "data", fraction=0.25, seed=3, n_train=44, n_val=9, n_test=4)
    (root / "cfg.json").write_text(json.dumps(MICRO_CONFIG))
    train(data.train, root / "cfg.json", root / "model.pt", TrainConfig(epochs=1, batch_size=8, lr=1e-3, seed=3))
    return root


@pytest.mark.parametrize("options, validation", [
    ({"projection": {"k_in": 4, "k_out": 4}}, True),                       # k too wide for partial sums
    ({"projection": {"k_in": 2, "k_out": 2}, "theta": ["visual.proj", "text_projection"]}, False),  # k = 8: sums pay
])
def test_the_store_size_estimate_equals_the_bytes_the_real_audit_writes(workspace, tmp_path, options, validation):
    manifest = {"model": {"config": str(workspace / "cfg.json"), "checkpoint": str(workspace / "model.pt")},
                "train": str(workspace / "data/train.jsonl"),
                "options": {**options, "batch_size": 8, "shard_batches": 2}}
    if validation:
        manifest["validation"] = str(workspace / "data/val.jsonl")
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    estimate = estimate_audit(load_manifest(path), batches=1)
    run_audit(path, tmp_path / "audit")
    plan = load_plan(tmp_path / "audit")
    assert (estimate.pairs, estimate.shards, estimate.dim) == (plan.pairs_usable, plan.shards, plan.dim)
    assert estimate.store_bytes == open_store(tmp_path / "audit").written_bytes()
