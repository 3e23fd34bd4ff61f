"""Removal sets: which training pairs a preview or a model edit takes out.

A spec is one string, so the CLI, the API and sidecars share it:
- `suspected`                 the pairs flagged in ranked.csv
- `estimated`                 as many of the top-ranked pairs as the audit estimates are misaligned
  (summary.json's `estimated_misaligned_pairs`: higher recall than `suspected`, lower precision)
- `top:Q:COLUMN`              the Q most suspicious pairs by a ranked.csv column
- `bottom:Q:COLUMN`           the Q least suspicious (the most valuable) by that column
- `random:Q[:SEED]`           a seeded random Q (the baseline every removal is compared with)
- `ids:PATH`                  the ids listed in a file, one per line, or a CSV with an `id` column
  (ranked.csv filtered, the report's download)

Q is a fraction in (0, 1] when it has a decimal point, else a count >= 1. "Suspicious" follows
each column's meaning: high self-influence, low (negative) influence, low CLIP score, small rank.

A keep list (ids a person reviewed and kept, in the same file formats) is taken out of whatever a
spec selects, after selecting: `top:100:rank` with 3 of those on the keep list acts on 97 pairs
and says it kept 3 back.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Literal, Sequence

import numpy as np

from ecif_core.errors import ConfigError
from ecif_core.data.storage import is_remote, location
from ecif_core.ranking import SUSPICION_SIGN

FIELD = "remove"
SPECS = "suspected, estimated, top:Q:COLUMN, bottom:Q:COLUMN, random:Q[:SEED] or ids:PATH"
Action = Literal["remove", "demote"]
# What an edit or a retraining does with the chosen pairs: take them out of their batches, or demote
# them (their own Pos terms dropped, kept as in-batch negatives: docs/METHOD.md, "Demotion").
ACTIONS: tuple[str, ...] = ("remove", "demote")


@dataclass(frozen=True)
class RemovalSet:
    """The chosen ids (in the audit's slot order), the spec that chose them and how many of its
    pairs the keep list took back out."""

    spec: str
    ids: tuple[str, ...]
    kept_back: int = 0


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


@dataclass(frozen=True)
class Estimate:
    """The audit's estimated number of misaligned pairs (summary.json), or why there is none."""

    pairs: int | None
    reason: str | None = None


def select(spec: str, ids: Sequence[str], columns: dict[str, np.ndarray], suspected: np.ndarray,
           base_dir: str | Path | None = None, field: str = FIELD, keep: Collection[str] = (),
           estimate: Estimate | None = None) -> RemovalSet:
    """The pairs `spec` names among the audit's usable pairs (`ids` with their ranked.csv columns),
    less those on the keep list. `field`: the option errors name (remove, demote). `estimate`: what
    `estimated` reads (the audit's calibration)."""
    try:
        return _select(spec, ids, columns, suspected, base_dir, keep, estimate)
    except ConfigError as exc:
        if exc.field == FIELD and field != FIELD:
            raise ConfigError(field, exc.message) from None
        raise


def _select(spec: str, ids: Sequence[str], columns: dict[str, np.ndarray], suspected: np.ndarray,
            base_dir: str | Path | None, keep: Collection[str], estimate: Estimate | None) -> RemovalSet:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(FIELD, f"give a removal spec: {SPECS}")
    kind, colon, rest = spec.strip().partition(":")
    if kind in ("suspected", "estimated") and colon:
        raise ConfigError(FIELD, f"`{kind}` takes no argument (got {spec!r})")
    if kind == "suspected":
        chosen = np.flatnonzero(suspected)
    elif kind == "estimated":
        if estimate is None or estimate.pairs is None:
            why = estimate.reason if estimate is not None and estimate.reason else "no estimate is available"
            raise ConfigError(FIELD, f"this audit could not estimate how many pairs are misaligned ({why}); use "
                              "suspected or top:Q:rank")
        if estimate.pairs < 1:
            raise ConfigError(FIELD, "the audit estimates that no pair is misaligned; nothing to act on")
        chosen = _most_suspicious(columns, "rank", min(estimate.pairs, len(ids)))
    elif kind in ("top", "bottom"):
        count_text, _, column = rest.partition(":")
        if column not in SUSPICION_SIGN:
            raise ConfigError(FIELD, f"unknown column {column!r}; one of {sorted(SUSPICION_SIGN)}")
        if np.isnan(np.asarray(columns[column], dtype=np.float64)).all():
            raise ConfigError(FIELD, f"column {column!r} is empty in this audit (influence needs a validation set)")
        chosen = _most_suspicious(columns, column, parse_count(count_text, len(ids)), least=kind == "bottom")
    elif kind == "random":
        count_text, _, seed_text = rest.partition(":")
        count, seed = parse_count(count_text, len(ids)), parse_seed(seed_text)
        chosen = np.sort(np.random.default_rng(seed).choice(len(ids), size=count, replace=False))
    elif kind == "ids":
        chosen = _ids_from_file(rest, ids, base_dir)
    else:
        raise ConfigError(FIELD, f"unknown removal spec {spec!r}; use {SPECS}")
    if len(chosen) == 0:
        raise ConfigError(FIELD, f"{spec!r} selects no pair")
    if len(chosen) >= len(ids):
        raise ConfigError(FIELD, f"{spec!r} selects every pair; nothing would be left to train on")
    kept = set(keep)
    unknown = sorted(kept - set(ids))
    if unknown:
        raise ConfigError("keep", f"{len(unknown)} ids of the keep list are not usable pairs of this audit: "
                          f"{unknown[:5]}")
    left = [i for i in chosen if ids[i] not in kept]
    if not left:
        raise ConfigError(FIELD, f"every pair {spec!r} selects is on the keep list; nothing to act on")
    return RemovalSet(spec.strip(), tuple(ids[i] for i in left), kept_back=len(chosen) - len(left))


def _most_suspicious(columns: dict[str, np.ndarray], column: str, count: int, least: bool = False) -> np.ndarray:
    """Slots of the `count` most (or least) suspicious pairs by a column, in slot order (ties: slot order)."""
    values = np.asarray(columns[column], dtype=np.float64)
    suspicion = SUSPICION_SIGN[column] * np.nan_to_num(values, nan=-np.inf * SUSPICION_SIGN[column])
    order = np.argsort(suspicion if least else -suspicion, kind="stable")
    return np.sort(order[:count])


def id_file(path_text: str, field: str = FIELD, base_dir: str | Path | None = None) -> list[str]:
    """The ids a file lists: one per line, or a CSV whose header has an `id` column (ranked.csv, a
    review's export). A relative path is read against `base_dir` when given."""
    return _read_ids(_id_path(path_text, field, base_dir))


def _id_path(path_text: str, field: str, base_dir: str | Path | None) -> Path:
    path = location(path_text, field)
    if base_dir is not None and not is_remote(path) and not path.is_absolute():
        path = location(base_dir) / path_text
    if not path_text or not path.is_file():
        raise ConfigError(field, f"id file not found: {path}")
    return path


def _read_ids(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    first = next((line for line in lines if line.strip()), "")
    if "id" in [name.strip() for name in next(csv.reader([first]), [])]:
        rows = csv.DictReader(lines[lines.index(first):], skipinitialspace=True)
        rows.fieldnames = [name.strip() for name in rows.fieldnames or []]
        return [row["id"].strip() for row in rows if (row.get("id") or "").strip()]
    return [line.strip() for line in lines if line.strip()]


def _ids_from_file(path_text: str, ids: Sequence[str], base_dir: str | Path | None) -> np.ndarray:
    path = _id_path(path_text, FIELD, base_dir)
    wanted = _read_ids(path)
    position = {pair_id: i for i, pair_id in enumerate(ids)}
    unknown = [i for i in wanted if i not in position]
    if unknown:
        raise ConfigError(FIELD, f"{len(unknown)} ids of {path} are not usable pairs of this audit: {unknown[:5]}")
    return np.array(sorted({position[i] for i in wanted}), dtype=np.int64)
