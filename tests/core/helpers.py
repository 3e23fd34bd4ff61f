"""Tiny models and batches shared by the ecif_core tests."""
from __future__ import annotations

import torch

from ecif_core.models.factory import LoadedModel, load_model

MICRO_CONFIG = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 16, "patch_size": 8, "head_width": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}


def micro_model(seed: int = 0) -> LoadedModel:
    return load_model(config=MICRO_CONFIG, seed=seed)


def random_batch(model: LoadedModel, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 16, 16, generator=generator)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    captions = [f"a {words[i % 10]} {words[(i * 7 + seed) % 10]}" for i in range(size)]
    return images, model.tokenizer(captions)
