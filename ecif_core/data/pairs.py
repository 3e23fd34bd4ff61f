"""The two kinds of row a pair source yields: a usable pair, or a rejected row with its reason."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    id: str
    image: str      # resolved path
    caption: str


@dataclass(frozen=True)
class RejectedRow:
    row: int        # 1-based data row number in the file
    id: str
    reason: str
    unreadable: bool = False  # the row itself could not be parsed: it has no id of its own
    duplicate: bool = False   # a later row repeating an id: the id's place is the first row's
