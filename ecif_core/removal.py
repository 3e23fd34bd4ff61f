"""Removal sets: which training pairs a preview or a model edit takes out.

A spec is one string, so the CLI, the API and sidecars share it:
- `suspected`                 the pairs flagged in ranked.csv
- `top:Q:COLUMN`              the Q most suspicious pairs by a ranked.csv column
- `bottom:Q:COLUMN`           the Q least suspicious (the most valuable) by that column
- `random:Q[:SEED]`           a seeded random Q (the baseline every removal is compared with)
- `ids:PATH`                  the ids listed in a file, one per line

Q is a fraction in (0, 1] when it has a decimal point, else a count >= 1. "Suspicious" follows
each column's meaning: high self-influence, low (negative) influence, low CLIP score, small rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError
from .storage import is_remote, location
from .scores import SUSPICION_SIGN

FIELD = "remove"



@dataclass(frozen=True)
class RemovalSet:
    """The chosen ids (in the audit's slot order) and the spec that chose them."""

    spec: str
    ids: tuple[str, ...]


def parse_count(text: str, total: int) -> int:
    """A fraction in (0, 1] ("0.1") or a count >= 1 ("50") as a number of pairs out of `total`."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(FIELD, f"{text!r} is neither a fraction in (0, 1] nor a count") from None
    if "." in text or "e" in text.lower():
        if not 0 < value <= 1:
            raise ConfigError(FIELD, f"fraction {text} must lie in (0, 1]")
        return max(1, int(round(value * total)))
    if value < 1 or value != int(value):
        raise ConfigError(FIELD, f"count {text} must be an integer >= 1")
    return min(int(value), total)


def select(spec: str, ids: Sequence[str], columns: dict[str, np.ndarray], suspected: np.ndarray,
           base_dir: str | Path | None = None) -> RemovalSet:
    """The pairs `spec` names among the audit's usable pairs (`ids` with their ranked.csv columns)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(FIELD, "give a removal spec: suspected, top:Q:COLUMN, bottom:Q:COLUMN, random:Q[:SEED] "
                          "or ids:PATH")
    kind, _, rest = spec.strip().partition(":")
    if kind == "suspected":
        chosen = np.flatnonzero(suspected)
    elif kind in ("top", "bottom"):
        count_text, _, column = rest.partition(":")
        if column not in SUSPICION_SIGN:
            raise ConfigError(FIELD, f"unknown column {column!r}; one of {sorted(SUSPICION_SIGN)}")
        values = np.asarray(columns[column], dtype=np.float64)
        if np.isnan(values).all():
            raise ConfigError(FIELD, f"column {column!r} is empty in this audit (influence needs a validation set)")
        count = parse_count(count_text, len(ids))
        suspicion = SUSPICION_SIGN[column] * np.nan_to_num(values, nan=-np.inf * SUSPICION_SIGN[column])
        order = np.argsort(-suspicion if kind == "top" else suspicion, kind="stable")
        chosen = np.sort(order[:count])
    elif kind == "random":
        count_text, _, seed_text = rest.partition(":")
        count = parse_count(count_text, len(ids))
        try:
            seed = int(seed_text or 0)
        except ValueError:
            raise ConfigError(FIELD, f"random seed {seed_text!r} is not an integer") from None
        chosen = np.sort(np.random.default_rng(seed).choice(len(ids), size=count, replace=False))
    elif kind == "ids":
        chosen = _ids_from_file(rest, ids, base_dir)
    else:
        raise ConfigError(FIELD, f"unknown removal spec {spec!r}; use suspected, top:Q:COLUMN, bottom:Q:COLUMN, "
                          "random:Q[:SEED] or ids:PATH")
    if len(chosen) == 0:
        raise ConfigError(FIELD, f"{spec!r} selects no pair")
    if len(chosen) >= len(ids):
        raise ConfigError(FIELD, f"{spec!r} selects every pair; nothing would be left to train on")
    return RemovalSet(spec.strip(), tuple(ids[i] for i in chosen))


def _ids_from_file(path_text: str, ids: Sequence[str], base_dir: str | Path | None) -> np.ndarray:
    path = location(path_text, FIELD)
    if base_dir is not None and not is_remote(path) and not path.is_absolute():
        path = location(base_dir) / path_text
    if not path_text or not path.is_file():
        raise ConfigError(FIELD, f"id file not found: {path}")
    wanted = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    position = {pair_id: i for i, pair_id in enumerate(ids)}
    unknown = [i for i in wanted if i not in position]
    if unknown:
        raise ConfigError(FIELD, f"{len(unknown)} ids of {path} are not usable pairs of this audit: {unknown[:5]}")
    return np.array(sorted({position[i] for i in wanted}), dtype=np.int64)
