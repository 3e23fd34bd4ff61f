"""ranked.csv: its columns and how one row is written, for the embedded and the service writers.

One module so the two files a user may download (the audit folder's and the API's) cannot
drift apart: both call `csv_row` with the same values.
"""
from __future__ import annotations

import math
from typing import Mapping

# Number columns between caption and suspected, in file order (sign conventions: ranking.SUSPICION_SIGN).
VALUE_COLUMNS = ("suspicion", "influence", "influence_pos", "influence_neg", "influence_per_example", "self_influence",
                 "self_influence_clip", "leave_own_out", "clip_score", "clip_score_loo", "reference_clip_score",
                 "reference_negclip", "misaligned_probability", "dropped_partner_mass")
RANKED_COLUMNS = ("rank", "id", "image", "caption", *VALUE_COLUMNS, "suspected")


def fmt(value: float | None) -> str:
    """Shortest round-trip text of a float; empty for a missing value (NaN or NULL)."""
    if value is None:
        return ""
    value = float(value)
    return "" if math.isnan(value) else repr(value)


def csv_row(rank: int, pair_id: str, image: str, caption: str, values: Mapping[str, float | None],
            suspected: bool) -> list[str | int]:
    """One data row of ranked.csv."""
    return [rank, pair_id, image, caption, *(fmt(values.get(name)) for name in VALUE_COLUMNS),
            "true" if suspected else "false"]
