"""Clean held-out evaluation of a model: zero-shot digit accuracy and contrastive test loss."""
from __future__ import annotations

from typing import Sequence

import torch

from ecif_core.datasets.digits import class_prompts, label_of_caption
from ecif_core.influence.gradients import embed, temperature_scale
from ecif_core.influence.losses import batch_loss, pair_logits
from ecif_core.models.factory import LoadedModel
from ecif_core.models.runtime import flush_denormals

from .tensors import Batch


@torch.no_grad()
def clean_test_metrics(loaded: LoadedModel, test: Sequence[Batch]) -> dict[str, float]:
    """zero_shot_accuracy over class_prompts() (the test split is clean, so each caption names the
    image's class) and test_loss = mean contrastive loss per pair over the test batches."""
    model = loaded.model
    model.eval()
    with flush_denormals():
        prompts = torch.nn.functional.normalize(model.encode_text(loaded.tokenizer(class_prompts())), dim=-1)
    correct, loss, count = 0, 0.0, 0
    for b in test:
        with flush_denormals():
            text_emb, image_emb = embed(model, b.images, b.tokens)
        loss += float(batch_loss(pair_logits(text_emb, image_emb, temperature_scale(model))))
        predicted = (torch.nn.functional.normalize(image_emb, dim=-1) @ prompts.T).argmax(dim=1)
        labels = torch.tensor([label_of_caption(c) for c in b.captions])
        correct += int((predicted == labels).sum())
        count += len(b.ids)
    return {"zero_shot_accuracy": correct / count, "test_loss": loss / count}
