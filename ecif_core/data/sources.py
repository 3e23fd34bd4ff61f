"""Pair sources: which rows are usable pairs, their ids and the partition they take part in.

Bad rows are recorded with a reason instead of failing the audit. Relative image paths
resolve against the pair file's folder. Which rows take part in the seeded partition is
decided once, by `partition_id`: training and the audit must agree on it. Reading each file
format is formats.py's job.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ecif_core.data.confine import confined
from ecif_core.data.formats import Source, read_pair_rows, source_of
from ecif_core.data.images import ImageAccess, image_bytes, image_ref, row_image_problem
from ecif_core.data.pairs import Pair, RejectedRow
from ecif_core.errors import ConfigError

MAX_CAPTION_CHARS = 2000
MAX_REASON_CHARS = 500


def read_pairs(path: "str | Path | dict | Source", check_images: bool = True, field: str = "train",
               image_roots: Sequence[Path] | None = None,
               access: ImageAccess | None = None) -> tuple[list[Pair], list[RejectedRow], list[str]]:
    """(usable pairs, rejected rows, ids of the partition), in memory: see iter_pairs."""
    pairs, rejected, ids = [], [], []
    for item in iter_pairs(path, check_images, field, access or ImageAccess(roots=image_roots)):
        if isinstance(item, Pair):
            pairs.append(item)
        else:
            rejected.append(item)
        pair_id = partition_id(item)
        if pair_id is not None:
            ids.append(pair_id)
    return pairs, rejected, ids


def partition_id(item: "Pair | RejectedRow") -> str | None:
    """The id a row brings to the seeded partition, or None: every row read with an id of its
    own takes its place, usable or rejected (a rejected row then leaves its batch, as in the
    leave-out objective); a row that could not be parsed has no id and no place, and a later
    row repeating an id has none either (the id's place is its first row's). The one rule
    the trainer, the audit and the validation set share (batching.training_batches)."""
    if isinstance(item, RejectedRow) and (item.unreadable or item.duplicate):
        return None
    return item.id


def leaving_ids(rejected: Iterable[RejectedRow]) -> set[str]:
    """The ids rejected rows take out of their batches (`drop` of batching.training_batches):
    those with a place in the partition. A duplicate row leaves nothing: its id's place is the
    first row's, which stays unless that row is rejected itself. Shared by trainer and audit."""
    return {pair_id for r in rejected if (pair_id := partition_id(r)) is not None}


def iter_pairs(path: "str | Path | dict | Source", check_images: bool = True, field: str = "train",
               access: ImageAccess | None = None) -> Iterator["Pair | RejectedRow"]:
    """Each row as a usable Pair or a RejectedRow, streamed. A later row repeating an id is
    rejected ("duplicate of row N") and has no place in the partition (partition_id).

    Rows that cannot be parsed at all have no id; they are rejected as "row-<n>" (unreadable)
    and are not part of the partition (neither training nor the audit can read them). With
    `access.roots` (the service's data roots), an image whose real path lies outside all of
    them is rejected. URL images are fetched (when `check_images`) into `access.fetch_dir`,
    once. Memory: the set of ids seen.
    """
    source = source_of(path, field)
    base = image_base(source, access.roots if access else None, field)
    for number, row, pair_id, reason, duplicate in _checked_rows(source, field, base, check_images, access):
        if pair_id is None:
            yield RejectedRow(number, f"row-{number}", _clean(reason), unreadable=True)
        elif reason:
            yield RejectedRow(number, pair_id, _clean(reason), duplicate=duplicate)
        else:
            yield Pair(pair_id, image_ref(base, row["image"]), str(row["caption"]).strip())


def _checked_rows(source: Source, field: str, base: Path, check_images: bool, access: ImageAccess | None,
                  stat_images: bool = True) -> Iterator[tuple[int, dict, str | None, str | None, bool]]:
    """(row number, row, id, why it cannot be used, whether it repeats an earlier row's id) of
    every row; id None: unreadable. `stat_images=False`: no image file is touched (validation
    of a source's structure)."""
    seen: dict[str, int] = {}
    for number, row in read_pair_rows(source, field, access.roots if access else None):
        pair_id, reason = _row_identity(number, row, seen)
        first = seen.get(pair_id) if pair_id is not None else None
        duplicate = first is not None and first != number
        if duplicate:
            reason = f"duplicate of row {first}"  # its image is never opened
        elif pair_id is not None and reason is None:
            try:
                reason = _caption_problem(row.get("caption")) or row_image_problem(
                    row.get("image"), base, check_images, access, stat_images)
            except Exception as exc:  # noqa: BLE001 - whatever a row makes the OS or a decoder raise
                reason = f"row cannot be used ({type(exc).__name__}: {exc})"
        yield number, row, pair_id, reason, duplicate


def _row_identity(number: int, row: dict, seen: dict[str, int]) -> tuple[str | None, str | None]:
    """(id, problem of its text fields) of a parsed row; id None: the row has no usable id (an
    unreadable row, problem says why). `seen` keeps each id's first row number (a later row
    repeating it is the caller's to reject).

    NUL characters and lone surrogates are refused here, before the id is hashed or anything
    is stored: a database column cannot hold them and UTF-8 cannot encode them.
    """
    if "__error__" in row:
        return None, row["__error__"]
    raw_id = row.get("id")
    pair_id = str(raw_id).strip() if raw_id is not None else ""
    problem = _text_problem(pair_id)
    if problem:
        return None, f"id {problem}"
    text_problem = next((f"{name} {p}" for name in ("caption", "image") if (p := _text_problem(row.get(name)))), None)
    if not pair_id:
        if text_problem:
            return None, text_problem  # no id of its own and nothing a stable id can be made from
        pair_id = _stable_id(row)
    seen.setdefault(pair_id, number)
    return pair_id, text_problem


def _text_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate or undecodable bytes)"
    return None


def _caption_problem(caption: object) -> str | None:
    if not isinstance(caption, str) or not caption.strip():
        return "caption is empty or not text"
    if len(caption) > MAX_CAPTION_CHARS:
        return f"caption longer than {MAX_CAPTION_CHARS} characters"
    return None


def _clean(text: str) -> str:
    """A reason that any database and CSV can hold: no NUL, no lone surrogate, bounded."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


def _stable_id(row: dict) -> str:
    key = f"{row.get('image', '')}\x00{row.get('caption', '')}"
    return "sha1-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def image_base(source: Source, roots: Sequence[Path] | None = None, field: str = "train") -> Path:
    """The folder relative image paths (and tar members' shards) resolve against: the real
    pair file's (for webdataset, the first shard's)."""
    return confined(source.path if isinstance(source.path, str) else source.path[0], roots, field).parent


@dataclass
class SourceSummary:
    rows: int
    usable: int
    rejected: int
    reasons: dict[str, int]      # rejection reason (without its details) -> rows


def validate_source(source: "str | Path | dict | Source", field: str = "train") -> SourceSummary:
    """One streaming pass over a source without opening any image: row structure, ids
    (a later duplicate is a rejected row), captions. Memory: the set of ids only. An empty
    source is a ConfigError (no batch can be formed from it)."""
    source = source_of(source, field)
    reasons: dict[str, int] = {}
    rows = usable = 0
    for _, _, _, reason, duplicate in _checked_rows(source, field, image_base(source), False, None, stat_images=False):
        rows += 1
        if reason is None:
            usable += 1
        else:
            key = "duplicate id" if duplicate else reason.split(" (")[0].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    if rows == 0:
        raise ConfigError(field, EMPTY_SOURCE)
    return SourceSummary(rows, usable, rows - usable, reasons)


EMPTY_SOURCE = "has no rows (the file is empty); add image-caption pairs to it"


def check_batchable(field: str, rows: int, usable: int, reasons: Iterable[str], batched: bool | None = None) -> None:
    """A ConfigError saying what to do when no batch of two usable pairs can be formed: the
    file is empty, every row was rejected, or too few pairs are left (a contrastive batch
    needs two). `usable`: pairs left after removals; `batched`: whether the partition holds a
    batch of two (None: not partitioned yet, so two usable pairs are what is needed)."""
    if rows == 0:
        raise ConfigError(field, EMPTY_SOURCE)
    if usable == 0:
        kinds = sorted({reason.split(":")[0] for reason in reasons})
        raise ConfigError(field, f"no usable rows ({rows} rejected: {'; '.join(kinds)}); fix the rows by their "
                                 "reasons and try again")
    if usable < 2 or batched is False:
        what = "only 1 usable pair is left" if usable == 1 else \
            f"no batch holds two of the {usable} usable pairs (each is alone in its batch after removals)"
        raise ConfigError(field, f"{what}: a contrastive batch needs at least 2 pairs, so add pairs to the file "
                                 "(or fix its rejected rows)")


def data_hash(pairs: Sequence[Pair]) -> str:
    """Identity of a training set: ids, captions and image bytes, order independent."""
    digest = hashlib.sha256()
    for pair in sorted(pairs, key=lambda p: p.id):
        digest.update(pair.id.encode() + b"\x00" + pair.caption.encode() + b"\x00")
        digest.update(hashlib.sha256(image_bytes(pair.image)).digest())
    return digest.hexdigest()
