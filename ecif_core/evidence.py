"""How well a per-pair alignment score finds misaligned pairs on THIS data, without labels.

The audit's validation pairs are clean by assumption. Corrupting copies of them in the two ways
misalignment usually takes (a caption of another pair; one word of the caption replaced by a word
of another caption) gives labelled negatives for free, and the AUROC of a score on clean vs
corrupted validation pairs measures how much that score knows about this domain. A reference
model pretrained on other concepts is blind here (AUROC near 0.5); one that knows the domain is
not. The default ranking weighs the reference model's evidence by it (ecif_core/ranking.py).
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from ecif_core.metrics import auroc

CORRUPTIONS = ("shuffle", "word_swap")


def corrupted_captions(captions: Sequence[str], seed: int) -> dict[str, list[str]]:
    """Per corruption, one corrupted caption per input caption (same order).

    shuffle: the next caption of the batch (cyclic; never the pair's own when captions differ);
    word_swap: one word replaced by a different word taken from the next caption (the caption
    is kept whole when no word differs)."""
    rng = random.Random(seed)
    size = len(captions)
    shuffled = [captions[(i + 1) % size] for i in range(size)]
    swapped = []
    for i, caption in enumerate(captions):
        words, donor = caption.split(), [w for w in captions[(i + 1) % size].split()]
        candidates = [w for w in donor if w not in words]
        if not words or not candidates:
            swapped.append(shuffled[i])
            continue
        position = rng.randrange(len(words))
        words[position] = rng.choice(candidates)
        swapped.append(" ".join(words))
    return {"shuffle": shuffled, "word_swap": swapped}


def separation(clean: np.ndarray, corrupted: dict[str, np.ndarray]) -> dict[str, float]:
    """AUROC of -cosine at telling corrupted from clean validation pairs, per corruption and mean."""
    out = {}
    for name, values in corrupted.items():
        scores = -np.concatenate([clean, values])
        labels = np.concatenate([np.zeros(len(clean)), np.ones(len(values))])
        out[name] = auroc(scores, labels)
    out["mean"] = float(np.mean([out[name] for name in corrupted]))
    return out
