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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ecif_core.errors import ConfigError
from ecif_core.data.storage import is_remote, location
from ecif_core.ranking import SUSPICION_SIGN

FIELD = "remove"


@dataclass(frozen=True)
class RemovalSet:
    """The chosen ids (in the audit's slot order) and the spec that chose them."""

    spec: str
    ids: tuple[str, ...]


# The grammar of Q and SEED, matched whole (ASCII digits only: `float()` and `int()` also take
# "nan", "inf", "1_0", signs and other scripts' digits, which are no count).
_COUNT = re.compile(r"[0-9]+")
_FRACTION = re.compile(r"(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+")
MAX_SEED = 2**63 - 1  # numpy's generators take any size; the bound keeps a seed storable as int64
MAX_DIGITS = 19       # 2^63 has 19 digits; longer digit strings are refused before int() reads them


def parse_count(text: str, total: int) -> int:
    """A fraction in (0, 1] ("0.1", "1e-1") or a count >= 1 ("50") as a number of pairs out of `total`."""
    if _FRACTION.fullmatch(text):
        value = float(text)  # the pattern leaves only finite decimals (or inf for a huge exponent)
        if not 0 < value <= 1:
            raise ConfigError(FIELD, f"fraction {text} must lie in (0, 1]")
        return max(1, int(round(value * total)))
    if not _COUNT.fullmatch(text):
        raise ConfigError(FIELD, f"{text!r} is neither a fraction in (0, 1] (with a decimal point) nor a count "
                          "(digits)")
    if len(text) > MAX_DIGITS:
        raise ConfigError(FIELD, f"count {text[:MAX_DIGITS]}... is not below the audit's {total} pairs")
    count = int(text)
    if count < 1:
        raise ConfigError(FIELD, f"count {text} must be an integer >= 1")
    if count >= total:
        raise ConfigError(FIELD, f"count {text} is not below the audit's {total} pairs; nothing would be left "
                          "to train on")
    return count


def parse_seed(text: str) -> int:
    """The seed of `random:Q:SEED`: digits, at most 2^63 - 1 (0 when absent)."""
    if text == "":
        return 0
    if not _COUNT.fullmatch(text) or len(text) > MAX_DIGITS or int(text) > MAX_SEED:
        raise ConfigError(FIELD, f"random seed {text!r} is not an integer in [0, 2^63 - 1]")
    return int(text)


def select(spec: str, ids: Sequence[str], columns: dict[str, np.ndarray], suspected: np.ndarray,
           base_dir: str | Path | None = None) -> RemovalSet:
    """The pairs `spec` names among the audit's usable pairs (`ids` with their ranked.csv columns)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(FIELD, "give a removal spec: suspected, top:Q:COLUMN, bottom:Q:COLUMN, random:Q[:SEED] "
                          "or ids:PATH")
    kind, colon, rest = spec.strip().partition(":")
    if kind == "suspected":
        if colon:
            raise ConfigError(FIELD, f"`suspected` takes no argument (got {spec!r})")
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
        count, seed = parse_count(count_text, len(ids)), parse_seed(seed_text)
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
