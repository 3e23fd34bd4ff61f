"""Small, real image-text data sets with known misaligned pairs, for auditing benchmarks."""
from __future__ import annotations

from ecif_core.datasets.digits import (
    CLOSE_CLASS,
    CORRUPTIONS,
    DigitsDataset,
    build_digits,
    class_prompts,
    label_of_caption,
    read_truth,
)

__all__ = [
    "CLOSE_CLASS",
    "CORRUPTIONS",
    "DigitsDataset",
    "build_digits",
    "class_prompts",
    "label_of_caption",
    "read_truth",
]
