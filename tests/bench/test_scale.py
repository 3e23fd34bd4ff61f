"""bench.scale at reduced size: the store part's stages run and report time and memory."""
import pytest
import torch

from bench import scale


def test_quick_store_part_reports_curvature_and_scores(tmp_path):
    before = torch.get_num_threads()
    try:
        result = scale.main(["--quick", "--parts", "store", "--out", str(tmp_path), "--threads", str(before)])
    finally:
        torch.set_num_threads(before) if torch.get_num_threads() != before else None
    rows = result["store"]
    assert [r["pairs"] for r in rows] == [500, 2000]
    for row in rows:
        for stage in ("curvature", "scores"):
            assert row["stages"][stage]["s"] > 0 and 0 < row["stages"][stage]["peak_rss_gb"] < 64
    assert (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_quick_estimate_part_compares_the_estimate_with_the_real_audit(tmp_path):
    """`ecif validate --estimate` and the staged audit, each in a fresh process, on the same tiny data."""
    before = torch.get_num_threads()
    try:
        rows = scale.main(["--quick", "--parts", "estimate", "--out", str(tmp_path), "--threads", "1",
                           "--device", "cpu"])["estimate"]
    finally:
        torch.set_num_threads(before) if torch.get_num_threads() != before else None
    (row,) = rows
    assert row["pairs"] == 64 and row["batches_timed"] == 1 and row["store_bytes_estimated"] == row["store_bytes_written"]
    assert row["estimated_s"] > 0 and row["actual_s"] > 0 and set(row["stages"]) >= {"gradients", "scores"}
