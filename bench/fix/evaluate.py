"""A model's quality on a cell's clean test split: what a user gains or loses by acting on a list.

- `i2t_top1`: each test image against the vocabulary's class prompts, correct when the best prompt names its
  shape and colour (bench.quality's retrieval accuracy; the figure the issue quotes).
- `t2i_top1`: each test caption against every test image, correct when the best image shows the caption's
  shape and colour (class level: many captions describe the same class).
- `test_loss`: the mean contrastive loss per test pair, batches of the fine-tune's size in file order.

`held_out_change` checks an edit's own first-order prediction on this split: the verdict is read on the
audit's validation split, and whether it holds on data it never saw is what the issue measures.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from bench.quality.finetune.cells import CellSpec, cell_items
from bench.quality.finetune.generator import Split, Vocabulary
from bench.quality.finetune.retrieval import retrieval_accuracy
from bench.quality.finetune.settings import FinetuneSettings
from ecif_core.data.images import load_batch
from ecif_core.data.sources import read_pairs
from ecif_core.influence.gradients import embed, temperature_scale
from ecif_core.influence.losses import batch_loss, pair_logits
from ecif_core.models.factory import LoadedModel
from ecif_core.models.runtime import flush_denormals


def test_split(settings: FinetuneSettings, spec: CellSpec, cell_folder: Path) -> tuple[Split, Vocabulary]:
    """The cell's clean test split as written, with what each image shows (drawn again from the cell's seed)."""
    vocab, _rng, _train, _val, test_items = cell_items(settings, spec)
    path = Path(cell_folder) / "data" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) != len(test_items):
        raise ValueError(f"{path} has {len(rows)} rows; the cell's settings draw {len(test_items)} test items")
    return Split(path, [r["id"] for r in rows], test_items, [r["caption"] for r in rows]), vocab


def _batch_losses(loaded: LoadedModel, split: Split, batch_size: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(caption embeddings, image embeddings, contrastive loss) of each batch of `batch_size` test pairs in file
    order: test_loss's batches. Gradients are kept or not as the caller's context says."""
    model = loaded.model
    model.eval()
    by_id = {p.id: p for p in read_pairs(split.path)[0]}
    for start in range(0, len(split.ids), batch_size):
        pairs = [by_id[i] for i in split.ids[start:start + batch_size]]
        image_tensors, tokens = load_batch(pairs, loaded.preprocess, loaded.tokenizer)
        text_emb, image_emb = embed(model, image_tensors, tokens)
        yield text_emb, image_emb, batch_loss(pair_logits(text_emb, image_emb, temperature_scale(model)))


def _test_loss(loaded: LoadedModel, split: Split, batch_size: int) -> torch.Tensor:
    """test_loss of clean_metrics as a tensor, with the autograd graph kept when gradients are on."""
    return sum(loss.double() for _, _, loss in _batch_losses(loaded, split, batch_size)) / len(split.ids)


def held_out_change(original: LoadedModel, edited: LoadedModel, split: Split, batch_size: int) -> dict[str, float]:
    """The edit's first-order prediction of the clean test loss's change, g_test . delta (delta: every parameter
    the edit changed, g_test the test loss's gradient at the original model), and the change measured."""
    changed = dict(edited.model.named_parameters())
    moved = [(p, (changed[name].detach() - p.detach())) for name, p in original.model.named_parameters()
             if name in changed and not torch.equal(changed[name].detach(), p.detach())]
    flags = [p.requires_grad for p, _ in moved]
    with flush_denormals():
        for p, _ in moved:
            p.requires_grad_(True)
        try:
            before = _test_loss(original, split, batch_size)
            grads = torch.autograd.grad(before, [p for p, _ in moved]) if moved else []
        finally:
            for (p, _), flag in zip(moved, flags):
                p.requires_grad_(flag)
        with torch.no_grad():
            after = _test_loss(edited, split, batch_size)
    predicted = float(sum((g.double() * d.double()).sum() for g, (_, d) in zip(grads, moved)))
    return {"predicted_change": predicted, "actual_change": float(after - before.detach())}


@torch.no_grad()
def clean_metrics(loaded: LoadedModel, split: Split, vocab: Vocabulary, batch_size: int) -> dict[str, float]:
    """i2t_top1, t2i_top1 and test_loss of a model on a clean split (module docstring)."""
    texts, images, loss = [], [], 0.0
    with flush_denormals():
        for text_emb, image_emb, batch in _batch_losses(loaded, split, batch_size):
            loss += float(batch)
            texts.append(torch.nn.functional.normalize(text_emb, dim=-1))
            images.append(torch.nn.functional.normalize(image_emb, dim=-1))
    labels = [it.label for it in split.items]
    best_image = (torch.cat(texts) @ torch.cat(images).T).argmax(dim=1).tolist()
    t2i = sum(labels[j] == labels[i] for i, j in enumerate(best_image)) / len(labels)
    i2t = retrieval_accuracy(loaded, split, vocab)["top1"]
    return {"i2t_top1": i2t, "t2i_top1": t2i, "test_loss": loss / len(labels)}
