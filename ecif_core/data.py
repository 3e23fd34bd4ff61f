"""Pair files (JSONL / CSV with id,image,caption), row validation and batch loading.

Bad rows are recorded with a reason instead of failing the audit. Relative image paths
resolve against the pair file's folder.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, EcifError

MAX_CAPTION_CHARS = 2000


@dataclass(frozen=True)
class Pair:
    id: str
    image: str      # resolved path
    caption: str


@dataclass(frozen=True)
class RejectedRow:
    row: int        # 1-based data row number in the file
    id: str
    reason: str


def read_pair_rows(path: str | Path, field: str = "train") -> Iterator[tuple[int, dict]]:
    """(row number, raw row) from a JSONL or CSV pair file, streamed; unreadable rows carry __error__."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, f"pair file not found: {path}")
    if path.suffix.lower() in (".jsonl", ".json"):
        with path.open(encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, _json_row(line)
    elif path.suffix.lower() in (".csv", ".tsv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: files saved by Excel
            reader = csv.DictReader(handle, delimiter=delimiter)
            missing = [c for c in ("image", "caption") if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(field, f"{path.name}: header lacks column(s) {missing} (need id,image,caption)")
            for number, row in enumerate(reader, start=1):
                yield number, row
    else:
        raise ConfigError(field, f"unsupported pair file type {path.suffix!r} (use .jsonl or .csv)")


def _json_row(line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"__error__": f"invalid JSON ({exc.msg})"}
    return row if isinstance(row, dict) else {"__error__": "row is not a JSON object"}


def read_pairs(path: str | Path, check_images: bool = True, field: str = "train",
               image_roots: Sequence[Path] | None = None) -> tuple[list[Pair], list[RejectedRow], list[str]]:
    """(usable pairs, rejected rows, ids of every readable row). Duplicate ids are an error.

    Rows that cannot be parsed at all have no id; they are rejected as "row-<n>" and are not
    part of the partition (neither training nor the audit can read them). With `image_roots`
    (the service's data roots), an image whose real path lies outside all of them is rejected.
    """
    base = Path(path).resolve().parent
    pairs, rejected, all_ids, seen = [], [], [], {}
    for number, row in read_pair_rows(path, field):
        if "__error__" in row:
            rejected.append(RejectedRow(number, f"row-{number}", row["__error__"]))
            continue
        raw_id = row.get("id")
        pair_id = str(raw_id).strip() if raw_id is not None else ""
        pair_id = pair_id or _stable_id(row)
        if pair_id in seen:
            raise ConfigError(field, f"duplicate id {pair_id!r} in rows {seen[pair_id]} and {number}")
        seen[pair_id] = number
        all_ids.append(pair_id)
        reason = _row_problem(row, base, check_images, image_roots)
        if reason:
            rejected.append(RejectedRow(number, pair_id, reason))
        else:
            pairs.append(Pair(pair_id, str(_resolve(base, row["image"])), str(row["caption"]).strip()))
    return pairs, rejected, all_ids


def _stable_id(row: dict) -> str:
    key = f"{row.get('image', '')}\x00{row.get('caption', '')}"
    return "sha1-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def _resolve(base: Path, image: str) -> Path:
    image = image[len("file://"):] if image.startswith("file://") else image
    return (base / image).resolve()


def _row_problem(row: dict, base: Path, check_images: bool, image_roots: Sequence[Path] | None) -> str | None:
    """Why this row cannot be used, or None."""
    caption, image = row.get("caption"), row.get("image")
    if not isinstance(caption, str) or not caption.strip():
        return "caption is empty or not text"
    if len(caption) > MAX_CAPTION_CHARS:
        return f"caption longer than {MAX_CAPTION_CHARS} characters"
    if not isinstance(image, str) or not image.strip():
        return "image is empty"
    path = _resolve(base, image)
    if image_roots is not None and not any(path.is_relative_to(root) for root in image_roots):
        return "image outside the data roots"
    if not path.is_file():
        return f"image not found: {path}"
    if check_images:
        try:  # a full decode: verify() alone lets truncated files through
            with Image.open(path) as img:
                img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            return f"image cannot be decoded: {exc}"
    return None


def load_image(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def load_batch(pairs: Sequence[Pair], preprocess: Callable, tokenizer: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) tensors for a batch, with the model's own transform and tokenizer."""
    images = []
    for pair in pairs:
        try:
            images.append(preprocess(load_image(pair.image)))
        except (OSError, ValueError, SyntaxError) as exc:  # changed on disk after prepare validated it
            raise EcifError(f"pair {pair.id!r}: image {pair.image} cannot be loaded ({exc})") from exc
    return torch.stack(images), tokenizer([p.caption for p in pairs])


def data_hash(pairs: Sequence[Pair]) -> str:
    """Identity of a training set: ids, captions and image bytes, order independent."""
    digest = hashlib.sha256()
    for pair in sorted(pairs, key=lambda p: p.id):
        digest.update(pair.id.encode() + b"\x00" + pair.caption.encode() + b"\x00")
        digest.update(hashlib.sha256(Path(pair.image).read_bytes()).digest())
    return digest.hexdigest()
