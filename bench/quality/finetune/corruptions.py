"""Corrupted captions for a fraction of the fine-tuning pairs, and the truth file only scoring reads.

Three kinds, each a different difficulty for an audit:
- `shuffle`: the caption of another pair of another class (both concepts usually wrong; the easy case);
- `attribute`: one colour or one shape word replaced by another word of the same vocabulary (half right);
- `systematic`: one shape consistently renamed (every corrupted pair showing shape S is captioned as shape
  T); a model fine-tuned on it learns the wrong name, so the pairs stop looking unusual to it. When the
  corrupted fraction exceeds what one shape's pairs can hold, a second shape gets its own renaming.
Exactly round(fraction * n) pairs are corrupted, and every corrupted caption differs from the clean one.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .generator import Item, Vocabulary, caption_of, with_attribute

CORRUPTIONS: tuple[str, ...] = ("shuffle", "attribute", "systematic")
TRUTH_FIELDS: tuple[str, ...] = ("id", "split", "corrupted", "kind", "clean_caption", "caption", "detail")


@dataclass(frozen=True)
class Corruption:
    """Captions to write (index-aligned with the items), which are corrupted, and what was changed."""

    captions: list[str]
    corrupted: np.ndarray          # bool per pair
    details: list[str]             # "" for clean pairs, e.g. "colour red->blue"
    mapping: dict[str, str]        # systematic: source shape -> target shape; empty otherwise


def corrupt(items: Sequence[Item], vocab: Vocabulary, kind: str, fraction: float,
            rng: np.random.Generator) -> Corruption:
    """Corrupt round(fraction * len(items)) pairs of `items` with `kind` (see the module doc)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {kind!r}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
    n = len(items)
    n_bad = int(round(fraction * n))
    captions = [caption_of(it) for it in items]
    details = [""] * n
    mapping: dict[str, str] = {}
    if kind == "shuffle":
        clean = list(captions)  # the source is always a clean caption (never one corrupted a moment ago)
        chosen = rng.choice(n, size=n_bad, replace=False)
        for i in chosen:
            others = [j for j in range(n) if items[j].label != items[i].label]
            j = int(rng.choice(others))
            captions[i], details[i] = clean[j], f"caption of {j}"
    elif kind == "attribute":
        chosen = rng.choice(n, size=n_bad, replace=False)
        for i in chosen:
            item = items[i]
            if rng.random() < 0.5:
                new = str(rng.choice([c for c in vocab.colour_words if c != item.colour]))
                captions[i], details[i] = caption_of(with_attribute(item, colour=new)), f"colour {item.colour}->{new}"
            else:
                new = str(rng.choice([s for s in vocab.shapes if s != item.shape]))
                captions[i], details[i] = caption_of(with_attribute(item, shape=new)), f"shape {item.shape}->{new}"
    else:
        chosen, mapping = _systematic_choice(items, vocab, n_bad, rng)
        for i in chosen:
            item = items[i]
            target = mapping[item.shape]
            captions[i], details[i] = caption_of(with_attribute(item, shape=target)), f"shape {item.shape}->{target}"
    corrupted = np.zeros(n, dtype=bool)
    corrupted[np.asarray(chosen, dtype=np.int64)] = True
    clean = [caption_of(it) for it in items]
    if any(captions[i] == clean[i] for i in np.flatnonzero(corrupted)):  # never a clean "corrupted" pair
        raise RuntimeError(f"{kind}: a corrupted caption equals its clean caption")
    return Corruption(captions, corrupted, details, mapping)


def _systematic_choice(items: Sequence[Item], vocab: Vocabulary, n_bad: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, dict[str, str]]:
    """The fewest source shapes whose pairs hold n_bad, each renamed to its own target shape (no target is a
    source, so a renamed caption never names a shape that is itself being renamed); n_bad drawn among them."""
    order = [str(s) for s in rng.permutation(list(vocab.shapes))]
    shapes = np.array([it.shape for it in items])
    for k in range(1, len(order) // 2 + 1):
        sources = order[:k]
        eligible = np.flatnonzero(np.isin(shapes, sources))
        if len(eligible) >= n_bad:
            mapping = dict(zip(sources, order[k:2 * k]))
            return np.sort(rng.choice(eligible, size=n_bad, replace=False)), mapping
    raise ValueError(f"systematic: {n_bad} corrupted pairs do not fit in half of the shapes' pairs")


def write_truth(path: str | Path, ids: Sequence[str], items: Sequence[Item], result: Corruption, kind: str) -> Path:
    """truth.csv (the columns ecif_core.datasets.digits.read_truth reads, plus what was changed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(TRUTH_FIELDS)
        for i, (pair_id, item) in enumerate(zip(ids, items)):
            writer.writerow([pair_id, "train", int(result.corrupted[i]), kind if result.corrupted[i] else "",
                             caption_of(item), result.captions[i], result.details[i]])
    return path
