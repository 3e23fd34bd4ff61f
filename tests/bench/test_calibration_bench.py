"""bench.calibration's aggregate figures on made-up cells: the flag-precision gap is read on corrupted sets
only (a clean control's flags are wrong by construction; its own bar is the share flagged)."""
from bench.calibration import groups_table


def _cell(group: str, true: float, estimated_precision: float | None, measured: float | None,
          flagged: float, estimate: float) -> dict:
    summary = {"estimated_misaligned_fraction": estimate, "estimated_flag_precision": estimated_precision,
               "estimated_flag_recall": 0.5, "interval": [0.0, 0.5]}
    return {"group": group, "split": "test", "learned": True, "true_fraction": true, "summary": summary,
            "flagged_fraction": flagged, "measured_precision": measured, "measured_recall": 0.5,
            "error": estimate - true, "covered": True, "ece": 0.01}


def test_the_precision_gap_leaves_clean_controls_out_and_they_get_their_own_figures():
    cells = [_cell("a/0.2", 0.2, 0.90, 0.85, 0.1, 0.21), _cell("a/0.2", 0.2, 0.90, 0.95, 0.1, 0.19),
             _cell("clean/0", 0.0, 0.91, 0.0, 0.00125, 0.017), _cell("clean/0", 0.0, None, None, 0.0, 0.004)]
    _, aggregate = groups_table(cells)
    assert abs(aggregate["precision_gap"] - 0.05) < 1e-12
    assert aggregate["clean_max_estimate"] == 0.017 and aggregate["clean_max_flagged_fraction"] == 0.00125
