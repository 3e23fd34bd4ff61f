"""Trace a test example back to training pairs (docs/METHOD.md, "Relative-IS: tracing a test example").

A test example is an image with its caption, or an image with the class prompts of a
zero-shot task and the true class. Its test loss is a cross-entropy over texts:
- zero-shot: -log softmax_j(s * cos(image, prompt_j)) at the true class;
- caption: the same with the caption as the right text and the captions of the audit's
  validation set (else of its first training pairs) as the alternatives,
where s = exp(logit_scale) is the model's own temperature. Only C, the projected gradient of
that loss, is computed; ranking reads the numbers stored at scoring time.

The model's prediction comes from the same logits: the text it ranks first among those the
example is contrasted with. The top-k pairs (largest relative-IS) are listed by sign(influence)
x relative-IS: harmful pairs first (negative influence: removing them lowers the test loss),
strongest first, then helpful ones, strongest first; a pair the audit flagged is `suspected`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ecif_core.models.cache import ModelCache
from ecif_core.stages.curvature import stored_curvature
from ecif_core.stages.finalize import final_ranking
from ecif_core.stages.plan import load_plan, load_slots, manifest_of, open_store, roots_of
from ecif_core.stages.scores import scored_curvature_shift
from ecif_core.influence.curvature import DampedInverse
from ecif_core.influence.scores import relative_is
from ecif_core.data.images import load_image
from ecif_core.data.sources import read_pairs
from ecif_core.errors import ConfigError
from ecif_core.influence.gradients import embed, temperature_scale
from ecif_core.models.factory import LoadedModel
from ecif_core.influence.projection import Projector
from ecif_core.models.runtime import flush_denormals
from ecif_core.progress import Progress

MAX_ALTERNATIVES = 256
TRACE_COLUMNS = ("test", "rank", "id", "image", "caption", "relative_is", "influence", "influence_pos",
                 "influence_neg", "signed_relative_is", "suspected")


@dataclass
class TraceExample:
    image: str
    caption: str | None = None
    prompts: list[str] | None = None
    label: int | None = None

    def check(self, index: int) -> None:
        """Exactly one of caption or (prompts, label); names the offending field."""
        where = f"tests[{index}]"
        if not isinstance(self.image, str) or not self.image:
            raise ConfigError(f"{where}.image", "must be a path")
        if (self.caption is None) == (self.prompts is None):
            raise ConfigError(where, "give caption, or prompts and label")
        if self.prompts is not None:
            if not (isinstance(self.prompts, list) and len(self.prompts) >= 2
                    and all(isinstance(p, str) and p.strip() for p in self.prompts)):
                raise ConfigError(f"{where}.prompts", "must be a list of at least two texts")
            if not isinstance(self.label, int) or isinstance(self.label, bool) or not 0 <= self.label < len(self.prompts):
                raise ConfigError(f"{where}.label", f"must be an index into prompts (0..{len(self.prompts) - 1})")
        elif not isinstance(self.caption, str) or not self.caption.strip():
            raise ConfigError(f"{where}.caption", "must be a non-empty text")


@dataclass
class TracedPair:
    slot: int
    id: str
    image: str
    caption: str
    relative_is: float
    influence: float
    influence_pos: float
    influence_neg: float
    suspected: bool = False    # flagged by the audit (ranked.csv's `suspected`)

    @property
    def signed_relative_is(self) -> float:
        """sign(influence) x relative-IS: negative = harmful to the example (the order of a trace)."""
        return signed_relative_is(self.relative_is, self.influence)


@dataclass
class Prediction:
    """What the model predicts for a test example: the text it ranks first among the candidates
    (the prompts, or the caption and its alternatives), with its softmax probability."""

    index: int                 # into the prompts, or 0 = the example's own caption
    text: str
    probability: float
    correct: bool              # the true class, or the example's own caption

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Trace:
    example: TraceExample
    test_loss: float
    top: list[TracedPair]
    prediction: Prediction | None = None


def signed_relative_is(relative: float, influence: float) -> float:
    return float(np.sign(influence)) * relative


def harmful_first(pairs: Sequence[TracedPair]) -> list[TracedPair]:
    """Harmful pairs (influence < 0) by relative-IS, largest first, then the others the same way."""
    return sorted(pairs, key=lambda p: (p.influence >= 0, -p.relative_is))


def trace_loss_gradient(loaded: LoadedModel, params: Sequence[torch.nn.Parameter], projector: Projector,
                       example: TraceExample, alternatives: Sequence[str],
                       roots: Sequence[Path] | None = None) -> tuple[torch.Tensor, float]:
    """Projected gradient C of the example's test loss (module docstring), and the loss."""
    grad, loss, _ = test_loss_terms(loaded, params, projector, example, alternatives, roots)
    return grad, loss


def test_loss_terms(loaded: LoadedModel, params: Sequence[torch.nn.Parameter], projector: Projector,
                    example: TraceExample, alternatives: Sequence[str],
                    roots: Sequence[Path] | None = None) -> tuple[torch.Tensor, float, Prediction]:
    """(C, the test loss, the model's prediction), from one forward pass."""
    if example.prompts is not None:
        texts, target = list(example.prompts), example.label
    else:
        texts = [example.caption] + [c for c in dict.fromkeys(alternatives) if c != example.caption]
        target = 0
        if len(texts) < 2:
            raise ConfigError("tests", "a caption needs alternative captions (the audit has none)")
    image = loaded.preprocess(load_image(example.image, roots)).unsqueeze(0)  # confined when opened
    with flush_denormals():
        text_emb, image_emb = embed(loaded.model, image, loaded.tokenizer(texts))
        logits = temperature_scale(loaded.model) * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
        loss = F.cross_entropy(logits, torch.tensor([target], device=logits.device))
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    probabilities = logits.detach()[0].double().softmax(dim=0)
    top = int(probabilities.argmax())
    prediction = Prediction(top, texts[top], float(probabilities[top]), top == target)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return projector.project([g.unsqueeze(0) for g in grads])[0].cpu(), float(loss.detach()), prediction


def alternative_captions(audit_dir: str | Path) -> list[str]:
    """Captions to contrast a test caption with: the validation set's, else the first training pairs'."""
    manifest = manifest_of(load_plan(audit_dir))
    if manifest.validation is not None:
        pairs, _, _ = read_pairs(manifest.validation, check_images=False, field="validation",
                                 image_roots=roots_of(load_plan(audit_dir)))
        return [p.caption for p in pairs][:MAX_ALTERNATIVES]
    return [p.caption for _, p in load_slots(audit_dir)][:MAX_ALTERNATIVES]


def trace(audit_dir: str | Path, examples: Sequence[TraceExample], k: int = 20,
          models: ModelCache | None = None, progress: Progress | None = None) -> list[Trace]:
    """The k training pairs of largest relative-IS for each test example, harmful ones first
    (harmful_first), each marked when the audit flagged it, with the model's prediction.
    `progress`: ("example", test-loss gradients done, examples), then ("shard", shards read, shards)."""
    for index, example in enumerate(examples):
        example.check(index)
    if k < 1:
        raise ConfigError("k", "must be >= 1")
    plan = load_plan(audit_dir)
    manifest, roots = manifest_of(plan), roots_of(plan)
    if progress is not None:
        progress("example", 0, len(examples))  # the model loads first
    loaded, params, projector = (models or ModelCache()).get(manifest, roots)
    slots = load_slots(audit_dir)
    index = np.array([slot for slot, _ in slots], dtype=np.int64)
    alternatives = alternative_captions(audit_dir) if any(e.prompts is None for e in examples) else []
    terms_of = []
    for number, example in enumerate(examples, start=1):
        terms_of.append(test_loss_terms(loaded, params, projector, example, alternatives, roots))
        if progress is not None:
            progress("example", number, len(examples))
    grads, losses, predictions = zip(*terms_of)
    all_terms = trace_terms(audit_dir, torch.stack(grads), progress)  # one pass over the store for every example
    flagged = suspected_slots(audit_dir)
    traces = []
    for t, (example, loss) in enumerate(zip(examples, losses)):
        terms = {name: values[t][index] for name, values in all_terms.items()}
        order = np.argsort(-terms["relative_is"], kind="stable")[:k]
        top = [TracedPair(int(index[i]), slots[i][1].id, slots[i][1].image, slots[i][1].caption,
                          *(float(terms[name][i]) for name in ("relative_is", "influence", "influence_pos",
                                                               "influence_neg")), int(index[i]) in flagged)
               for i in order]
        traces.append(Trace(example, loss, harmful_first(top), predictions[t]))
    return traces


def suspected_slots(audit_dir: str | Path) -> set[int]:
    """Row slots of the pairs the audit flagged (finalize's `suspected`, from the stored numbers)."""
    ranking = final_ranking(audit_dir, interval=False)
    return {int(slot) for slot, flag in zip(ranking.slots, ranking.suspected) if flag}


def examples_from_json(raw: object) -> list[TraceExample]:
    """[{"image": ..., "caption": ...} | {"image": ..., "prompts": [...], "label": i}, ...]"""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("tests", "must be a non-empty list of test examples")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"tests[{i}]", "must be an object")
        unknown = set(item) - {"image", "caption", "prompts", "label"}
        if unknown:
            raise ConfigError(f"tests[{i}].{sorted(unknown)[0]}", "unknown field")
        example = TraceExample(item.get("image"), item.get("caption"), item.get("prompts"), item.get("label"))
        example.check(i)
        out.append(example)
    return out


def trace_row(test: int, rank: int, pair: dict) -> list:
    """One row of a trace CSV (TRACE_COLUMNS) from a traced pair as a dict."""
    return [test, rank, pair["id"], pair["image"], pair["caption"],
            *(repr(pair[c]) for c in ("relative_is", "influence", "influence_pos", "influence_neg")),
            repr(signed_relative_is(pair["relative_is"], pair["influence"])),
            "true" if pair.get("suspected") else "false"]


def trace_relative_is(audit_dir: str | Path, test_grad: torch.Tensor) -> np.ndarray:
    """relative-IS of every row slot for one test-loss gradient C (projected, shape (k,))."""
    return trace_terms(audit_dir, test_grad)["relative_is"]


def trace_terms(audit_dir: str | Path, test_grads: torch.Tensor,
                progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Per row slot: relative_is, and the signed influence on the test loss with its split
    (influence_pos = C^T H^-1 g_pos, influence_neg = C^T H^-1 g_neg, influence = their sum).

    `test_grads`: one gradient C (k,) or several (m, k); the arrays are (rows,) or (m, rows).
    A pass over stored numbers only, once for all m: the stored gradients and the Gram entries
    stored at scoring time, with the damping they were scored with; no training gradient is
    recomputed.
    """
    plan, store = load_plan(audit_dir), open_store(audit_dir)
    inverse = DampedInverse(*stored_curvature(store), scored_curvature_shift(plan, store))
    directions = inverse.apply(torch.atleast_2d(test_grads).to(torch.float64)).T  # (k, m)
    gram = {name: store.score_column(name) for name in ("gram_pos_pos", "gram_pos_neg", "gram_neg_neg")}
    rows, m = plan.shards * plan.shard_rows, directions.shape[1]
    out = {name: np.zeros((m, rows)) for name in ("relative_is", "influence", "influence_pos", "influence_neg")}
    for shard in range(plan.shards):
        start, stop = shard * plan.shard_rows, (shard + 1) * plan.shard_rows
        a_pos = (torch.from_numpy(store.pos_gradients(start, stop)).double() @ directions).T  # (m, rows)
        a_neg = (torch.from_numpy(store.neg_gradients(start, stop)).double() @ directions).T
        out["relative_is"][:, start:stop] = relative_is(
            a_pos, a_neg, *(torch.from_numpy(gram[n][start:stop]) for n in gram)).numpy()
        out["influence_pos"][:, start:stop], out["influence_neg"][:, start:stop] = a_pos.numpy(), a_neg.numpy()
        out["influence"][:, start:stop] = (a_pos + a_neg).numpy()
        if progress is not None:
            progress("shard", shard + 1, plan.shards)
    return out if test_grads.dim() > 1 else {name: values[0] for name, values in out.items()}
