"""Synthetic image-text pairs: coloured shapes on noisy backgrounds, captioned from templates.

Why our own data and not digits: a fine-tuning audit needs a base model that already knows some concepts
(vocabulary A) and a second, disjoint set of concepts it has never seen (vocabulary B, the domain shift).
Shapes and colours give both, with captions whose every content word is known, so corruptions can change
exactly one concept. Every image is drawn from a seeded generator (position, size, rotation, colour jitter,
background level and pixel noise), so no two images are identical and a rebuild gives the same bytes.

Pair files are JSONL rows {"id", "image", "caption"} with image paths relative to the pair file's folder
(ecif_core.data resolves them there).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4           # shapes are drawn at 4x and downsampled: anti-aliased edges at 32 px
SMALL_BELOW = 10.25       # radius (px at 32) under which the caption's size word is "small"
MAX_TILT = 15.0           # degrees: shapes keep their canonical pose up to a small tilt (a tiny ViT at 32 px
                          # learns free rotations of four shapes only slowly; measured, see settings)

# Each template names the shape and the colour exactly once; {size} is true to the drawn radius.
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "a photo of a {size} {colour} {shape}",
    "{colour} {shape} on a grey background",
    "a picture of a {colour} {shape}",
    "a {size} {shape} coloured {colour}",
    "the {shape} is {colour}",
)
PROMPT = "a {colour} {shape}"  # the class prompt retrieval accuracy ranks


@dataclass(frozen=True)
class Vocabulary:
    """Shape words and colour words (with their RGB) of one domain."""

    name: str
    shapes: tuple[str, ...]
    colours: tuple[tuple[str, tuple[int, int, int]], ...]

    @property
    def colour_words(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colours)

    def rgb(self, colour: str) -> tuple[int, int, int]:
        return dict(self.colours)[colour]

    def classes(self) -> list[tuple[str, str]]:
        """(shape, colour) for every combination, in a fixed order."""
        return [(s, c) for s in self.shapes for c in self.colour_words]

    def prompts(self) -> list[str]:
        return [PROMPT.format(colour=c, shape=s) for s, c in self.classes()]


# A: what the base is pretrained on. B: new shape and colour words, drawn differently (the domain shift).
VOCAB_A = Vocabulary("A", ("circle", "square", "triangle", "cross"),
                     (("red", (210, 40, 40)), ("green", (40, 170, 60)), ("blue", (40, 80, 220)),
                      ("yellow", (235, 215, 50))))
VOCAB_B = Vocabulary("B", ("star", "ring", "crescent", "arrow"),
                     (("purple", (130, 50, 190)), ("orange", (245, 140, 30)), ("cyan", (40, 210, 220)),
                      ("pink", (245, 140, 200))))
VOCABULARIES = {"A": VOCAB_A, "B": VOCAB_B}


@dataclass(frozen=True)
class Item:
    """What one image shows and how its caption is phrased (the clean caption is a function of it)."""

    shape: str
    colour: str
    radius: float       # px at IMAGE_SIZE
    cx: float
    cy: float
    angle: float        # degrees of tilt from the shape's canonical pose
    template: int

    @property
    def size_word(self) -> str:
        return "small" if self.radius < SMALL_BELOW else "large"

    @property
    def label(self) -> tuple[str, str]:
        return self.shape, self.colour


def caption_of(item: Item) -> str:
    """The item's caption from its template; corruptions call it with a changed shape or colour."""
    return TEMPLATES[item.template].format(colour=item.colour, shape=item.shape, size=item.size_word)


def sample_items(vocab: Vocabulary, n: int, rng: np.random.Generator) -> list[Item]:
    """n items, classes balanced (each shape x colour n/16 times, the rest spread), in random order."""
    classes = vocab.classes()
    labels = [classes[i % len(classes)] for i in range(n)]
    order = rng.permutation(n)
    items = []
    for k in order:
        shape, colour = labels[k]
        radius = float(rng.uniform(7.5, 13.0))
        margin = radius + 1.5
        items.append(Item(shape, colour, radius, float(rng.uniform(margin, IMAGE_SIZE - margin)),
                          float(rng.uniform(margin, IMAGE_SIZE - margin)), float(rng.uniform(-MAX_TILT, MAX_TILT)),
                          int(rng.integers(len(TEMPLATES)))))
    return items


def _rotated(points: Sequence[tuple[float, float]], angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]


def _polar(count: int, radii: Sequence[float]) -> list[tuple[float, float]]:
    """count * len(radii) points around the origin, radii alternating (a star for two radii)."""
    total = count * len(radii)
    return [(radii[i % len(radii)] * math.cos(2 * math.pi * i / total - math.pi / 2),
             radii[i % len(radii)] * math.sin(2 * math.pi * i / total - math.pi / 2)) for i in range(total)]


def _cross(r: float) -> list[tuple[float, float]]:
    w = 0.32 * r
    return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]


def _shape_mask(item: Item) -> Image.Image:
    """The shape's coverage (0..255) at IMAGE_SIZE, drawn at SUPERSAMPLE x and downsampled."""
    s = SUPERSAMPLE
    big = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw = ImageDraw.Draw(big)
    r, cx, cy = item.radius * s, item.cx * s, item.cy * s
    shape = item.shape
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        draw.polygon(_rotated(_polar(4, [r]), item.angle + 45, cx, cy), fill=255)
    elif shape == "triangle":
        draw.polygon(_rotated(_polar(3, [r]), item.angle, cx, cy), fill=255)
    elif shape == "cross":
        draw.polygon(_rotated(_cross(r), item.angle, cx, cy), fill=255)
    elif shape == "star":
        draw.polygon(_rotated(_polar(5, [r, 0.42 * r]), item.angle, cx, cy), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=max(1, int(0.38 * r)))
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        dx, dy = _rotated([(0.5 * r, 0.0)], item.angle, 0.0, 0.0)[0]
        inner = 0.85 * r
        draw.ellipse((cx + dx - inner, cy + dy - inner, cx + dx + inner, cy + dy + inner), fill=0)
    elif shape == "arrow":
        h = 0.22 * r
        arrow = [(-r, -h), (0.1 * r, -h), (0.1 * r, -0.7 * r), (r, 0.0), (0.1 * r, 0.7 * r), (0.1 * r, h), (-r, h)]
        draw.polygon(_rotated(arrow, item.angle, cx, cy), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def draw(item: Item, vocab: Vocabulary, rng: np.random.Generator) -> Image.Image:
    """RGB image: noisy grey background (random level), the shape in its colour (jittered), pixel noise."""
    level = rng.uniform(80, 170)
    background = level + rng.normal(0, 10, (IMAGE_SIZE, IMAGE_SIZE, 1)) + rng.normal(0, 4, (IMAGE_SIZE, IMAGE_SIZE, 3))
    colour = np.asarray(vocab.rgb(item.colour), dtype=np.float64) + rng.uniform(-20, 20, 3)
    alpha = np.asarray(_shape_mask(item), dtype=np.float64)[..., None] / 255.0
    pixels = alpha * (colour + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3))) + (1 - alpha) * background
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class Split:
    """A written pair file: its path, ids, items (what each image shows) and the captions written."""

    path: Path
    ids: list[str]
    items: list[Item]
    captions: list[str]


def write_split(folder: str | Path, name: str, vocab: Vocabulary, items: Sequence[Item], rng: np.random.Generator,
                captions: Sequence[str] | None = None, prefix: str | None = None) -> Split:
    """Draw every item into folder/images/<id>.png and write folder/<name>.jsonl (clean captions by default)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    prefix = prefix or name
    captions = list(captions) if captions is not None else [caption_of(it) for it in items]
    if len(captions) != len(items):
        raise ValueError(f"{len(captions)} captions for {len(items)} items")
    ids = [f"{prefix}-{i:05d}" for i in range(len(items))]
    with open(folder / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as handle:
        for pair_id, item, caption in zip(ids, items, captions):
            draw(item, vocab, rng).save(folder / "images" / f"{pair_id}.png", format="PNG")
            handle.write(json.dumps({"id": pair_id, "image": f"images/{pair_id}.png", "caption": caption}) + "\n")
    return Split(folder / f"{name}.jsonl", ids, list(items), captions)


def with_attribute(item: Item, *, shape: str | None = None, colour: str | None = None) -> Item:
    """The same image description with one concept renamed (what a corrupted caption describes)."""
    return replace(item, shape=shape or item.shape, colour=colour or item.colour)
