"""A real image-text set built from scikit-learn's 8x8 digits, with known misaligned captions.

The digits ship with scikit-learn, so the set needs no download and a benchmark can rebuild it
anywhere. Only the train split is corrupted; which pairs were corrupted is written to a separate
truth.csv so the audit under test never sees it.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CLASS_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Each template names its class exactly once, by word or by digit, and no other number word,
# so label_of_caption can parse the class back.
TEMPLATES: tuple[str, ...] = (
    "a photo of the digit {word}",
    "a handwritten {word}",
    "the number {digit}",
    "an image of the digit {word}",
    "a scanned {word} digit",
    "a blurry picture of the number {word}",
    "a low resolution digit {digit}",
    "{word}",
)

CORRUPTIONS: tuple[str, ...] = ("shuffle", "swap", "close")

# Fixed confusion map for corruption="close": CLOSE_CLASS[c] is the visually close class whose
# caption an image of class c gets: 0->6, 1->7, 2->7, 3->8, 4->9, 5->6, 6->5, 7->1, 8->3, 9->4.
CLOSE_CLASS: tuple[int, ...] = (6, 7, 7, 8, 9, 6, 5, 1, 3, 4)

TRUTH_FIELDS: tuple[str, ...] = ("id", "split", "label", "caption_label", "corrupted")


@dataclass(frozen=True)
class DigitsDataset:
    """Paths of one built digits set; truth is ground truth the audit must never read."""

    root: Path
    train: Path
    validation: Path
    test: Path
    truth: Path


def class_prompts() -> list[str]:
    """One clean prompt per class 0..9, for zero-shot accuracy of a fitted model."""
    return [f"a photo of the digit {word}" for word in CLASS_WORDS]


def caption_for(label: int, template: int) -> str:
    """Caption of class `label` from TEMPLATES[template]; shared so corrupted captions look clean."""
    return TEMPLATES[template].format(word=CLASS_WORDS[label], digit=label)


def label_of_caption(caption: str) -> int:
    """The class a caption names (number word or single digit); lets tests check captions."""
    tokens = re.findall(r"[a-z]+|\d+", caption.lower())
    found = {CLASS_WORDS.index(t) for t in tokens if t in CLASS_WORDS}
    found |= {int(t) for t in tokens if t.isdigit() and len(t) == 1}
    if len(found) != 1:
        raise ValueError(f"caption must name exactly one digit class, got {caption!r} naming {sorted(found)}")
    return found.pop()


def read_truth(path: str | Path) -> dict[str, bool]:
    """id -> corrupted for the train rows of truth.csv (the only split that is corrupted)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [f for f in ("id", "split", "corrupted") if f not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"truth file {path} lacks column(s) {missing}")
        truth: dict[str, bool] = {}
        for row in reader:
            if row["split"] != "train":
                continue
            if row["corrupted"] not in ("0", "1"):
                raise ValueError(f"truth file {path}: corrupted must be 0 or 1, got {row['corrupted']!r} for id {row['id']!r}")
            truth[row["id"]] = row["corrupted"] == "1"
    return truth


def _check_args(corruption: str | None, fraction: float, image_size: int, n_val: int, n_test: int,
                class_pairs: Sequence[tuple[int, int]]) -> None:
    """Reject bad arguments up front, naming the argument, so no half-built folder is left behind."""
    if corruption is not None and corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS} or None, got {corruption!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) \
            or not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    for name, value, low in (("image_size", image_size, 1), ("n_val", n_val, 0), ("n_test", n_test, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    seen: set[int] = set()
    for pair in class_pairs:
        if len(pair) != 2 or pair[0] == pair[1] or any(c not in range(10) for c in pair) or seen & set(pair):
            raise ValueError(f"class_pairs must hold pairs of distinct classes 0..9, each class once, got {list(class_pairs)!r}")
        seen |= set(pair)


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All indices in an order whose every prefix is close to stratified by class.

    Each class is shuffled and its k-th member gets key (k + u) / n_class, u ~ U(0, 1); sorting
    by key interleaves the classes, so cutting the order into test/val/train keeps class shares.
    """
    keys = np.empty(len(labels))
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        keys[members] = (np.arange(len(members)) + rng.random(len(members))) / max(len(members), 1)
    return np.argsort(keys, kind="stable")


def _split(labels: np.ndarray, rng: np.random.Generator, n_train: int | None, n_val: int,
           n_test: int) -> dict[str, np.ndarray]:
    """Seeded stratified split into test, validation and train; each split sorted by index."""
    rest = len(labels) - n_val - n_test
    if rest < 1:
        raise ValueError(f"n_val + n_test must leave train rows out of {len(labels)}, got n_val={n_val}, n_test={n_test}")
    if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int) or not 1 <= n_train <= rest):
        raise ValueError(f"n_train must be an integer in [1, {rest}] (the rows left after val and test), got {n_train!r}")
    order = _stratified_order(labels, rng)
    test = order[:n_test]
    val = order[n_test:n_test + n_val]
    train = order[n_test + n_val:][: n_train if n_train is not None else rest]
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _derangeable_choice(labels: np.ndarray, n_bad: int, rng: np.random.Generator, tries: int = 1000) -> np.ndarray:
    """n_bad sorted indices drawn uniformly among sets where no class holds more than half.

    Only such sets can permute their captions so every pair changes class; rejection sampling
    keeps the draw uniform over them (a few redraws at most unless n_bad is tiny).
    """
    for _ in range(tries if n_bad >= 2 else 0):
        chosen = np.sort(rng.choice(len(labels), size=n_bad, replace=False))
        if np.bincount(labels[chosen]).max() * 2 <= n_bad:
            return chosen
    raise ValueError(f"fraction gives {n_bad} shuffled pair(s), too few to give every one another class's caption; "
                     f"use a larger fraction (at least 2 pairs from 2 classes)")


def _deranged_captions(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permutation src of range(m) with labels[src[i]] != labels[i] for all i.

    Start from a random permutation, then fix each collision i by swapping with the first j whose
    swap clears i and keeps j clean. Such a j exists while no class holds more than half the
    chosen pairs (at most 2*L_a - 1 pairs have label a or caption a), and each swap removes at
    least one collision, so the loop ends.
    """
    m = len(labels)
    if m and np.bincount(labels).max() * 2 > m:
        raise ValueError(f"fraction: the {m} pairs chosen for shuffle cannot all get another class's caption "
                         f"(one class holds more than half of them); use a larger fraction")
    src = rng.permutation(m)
    for i in range(m):
        if labels[src[i]] != labels[i]:
            continue
        for j in range(m):
            if labels[src[j]] != labels[i] and labels[j] != labels[src[i]]:
                src[i], src[j] = src[j], src[i]
                break
    if np.any(labels[src] == labels):  # unreachable by the argument above; never write a clean "corrupted" pair
        raise RuntimeError("shuffle derangement left a pair with its own class's caption")
    return src


def _corrupt(labels: np.ndarray, corruption: str | None, n_bad: int, rng: np.random.Generator,
             class_pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Caption class per train row; rows where it differs from the label are the corrupted ones."""
    caption_labels = labels.copy()
    if corruption is None or n_bad == 0:
        return caption_labels
    if corruption == "shuffle":
        chosen = _derangeable_choice(labels, n_bad, rng)
        caption_labels[chosen] = labels[chosen][_deranged_captions(labels[chosen], rng)]
    elif corruption == "swap":
        partner = {a: b for a, b in class_pairs} | {b: a for a, b in class_pairs}
        eligible = np.flatnonzero(np.isin(labels, list(partner)))
        if n_bad > len(eligible):
            raise ValueError(f"fraction needs {n_bad} swapped pairs but classes {sorted(partner)} hold only "
                             f"{len(eligible)} train pairs")
        chosen = np.sort(rng.choice(eligible, size=n_bad, replace=False))
        caption_labels[chosen] = [partner[int(c)] for c in labels[chosen]]
    else:  # "close"
        chosen = np.sort(rng.choice(len(labels), size=n_bad, replace=False))
        caption_labels[chosen] = np.asarray(CLOSE_CLASS)[labels[chosen]]
    return caption_labels


def _digit_id(index: int) -> str:
    """Stable id from the scikit-learn index, so rebuilds name the same image the same way."""
    return f"digits-{index:04d}"


def _write_image(pixels: np.ndarray, path: Path, image_size: int) -> None:
    """8x8 values 0..16 -> image_size^2 grey PNG (white digit on black), bicubic upscale."""
    grey = np.rint(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BICUBIC).save(path, format="PNG")


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """One JSON object per line, UTF-8, '\n' line ends (byte-identical across platforms)."""
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_digits(out_dir: str | Path, *, corruption: str | None = "shuffle", fraction: float = 0.2,
                 seed: int = 0, image_size: int = 32, n_train: int | None = None, n_val: int = 300,
                 n_test: int = 297, class_pairs: Sequence[tuple[int, int]] = ((1, 7), (3, 8), (4, 9))) -> DigitsDataset:
    """Write images, train/val/test JSONL and truth.csv under out_dir; same arguments, same bytes.

    Corruption touches only train; exactly round(fraction * n_train) train pairs get a caption of
    another class: "shuffle" permutes the chosen pairs' captions so every one changes class (the
pairs are drawn uniformly among sets where no class holds more than half, the sets for which
that is possible; fewer than 2 pairs raises),
    "swap" exchanges captions between the classes of each pair in class_pairs (a <-> b), "close"
    uses the confusion map CLOSE_CLASS (0->6, 1->7, 2->7, 3->8, 4->9, 5->6, 6->5, 7->1, 8->3,
    9->4), None corrupts nothing.
    """
    from sklearn.datasets import load_digits  # deferred: only building needs scikit-learn

    _check_args(corruption, fraction, image_size, n_val, n_test, class_pairs)
    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    splits = _split(labels, rng, n_train, n_val, n_test)
    templates = rng.integers(len(TEMPLATES), size=len(labels))
    train_labels = labels[splits["train"]]
    n_bad = int(round(fraction * len(train_labels))) if corruption is not None else 0
    caption_labels = {"train": _corrupt(train_labels, corruption, n_bad, rng, class_pairs),
                      "val": labels[splits["val"]], "test": labels[splits["test"]]}

    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    data = DigitsDataset(root=root, train=root / "train.jsonl", validation=root / "val.jsonl",
                         test=root / "test.jsonl", truth=root / "truth.csv")
    truth_rows: list[tuple[str, str, int, int, int]] = []
    for split, path in (("train", data.train), ("val", data.validation), ("test", data.test)):
        rows = []
        for index, caption_label in zip(splits[split], caption_labels[split]):
            index, caption_label = int(index), int(caption_label)
            image_id = _digit_id(index)
            _write_image(digits.images[index], root / "images" / f"{image_id}.png", image_size)
            rows.append({"id": image_id, "image": f"images/{image_id}.png",
                         "caption": caption_for(caption_label, int(templates[index]))})
            truth_rows.append((image_id, split, int(labels[index]), caption_label, int(caption_label != labels[index])))
        _write_jsonl(path, rows)
    with open(data.truth, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(TRUTH_FIELDS)
        writer.writerows(truth_rows)
    return data
