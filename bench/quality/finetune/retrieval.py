"""Clean image-to-text retrieval accuracy: does a model know the concepts of a domain?

Each image of a clean split is matched against the class prompts of its vocabulary ("a red circle", one per
shape x colour); top-1 is correct when the best prompt names the image's shape and colour. A model that did
not learn its fine-tuning domain makes every audit of it meaningless, so every cell reports this number.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ecif_core.data.images import load_batch
from ecif_core.data.sources import read_pairs
from ecif_core.models.factory import LoadedModel
from ecif_core.models.runtime import flush_denormals

from .generator import Split, Vocabulary


@torch.no_grad()
def retrieval_accuracy(loaded: LoadedModel, split: Split, vocab: Vocabulary, batch: int = 256) -> dict[str, float]:
    """top1 (shape and colour right), shape and colour accuracy, over the split's images (clean labels)."""
    model = loaded.model
    model.eval()
    by_id = {p.id: p for p in read_pairs(split.path)[0]}
    classes = vocab.classes()
    with flush_denormals():
        prompts = torch.nn.functional.normalize(model.encode_text(loaded.tokenizer(vocab.prompts())), dim=-1)
        predicted: list[int] = []
        for start in range(0, len(split.ids), batch):
            pairs = [by_id[i] for i in split.ids[start:start + batch]]
            images, _ = load_batch(pairs, loaded.preprocess, loaded.tokenizer)
            image_emb = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
            predicted += (image_emb @ prompts.T).argmax(dim=1).tolist()
    return _accuracies([classes[k] for k in predicted], [it.label for it in split.items], len(classes))


def _accuracies(predicted: Sequence[tuple[str, str]], truth: Sequence[tuple[str, str]],
                classes: int) -> dict[str, float]:
    n = max(1, len(truth))
    return {"top1": sum(p == t for p, t in zip(predicted, truth)) / n,
            "shape": sum(p[0] == t[0] for p, t in zip(predicted, truth)) / n,
            "colour": sum(p[1] == t[1] for p, t in zip(predicted, truth)) / n,
            "chance_top1": 1.0 / classes, "n": len(truth)}
