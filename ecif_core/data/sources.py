"""Pair sources: formats (JSONL, CSV, Parquet, webdataset shards), row reading and ids.

Bad rows are recorded with a reason instead of failing the audit. Relative image paths
resolve against the pair file's folder. Which rows take part in the seeded partition is
decided once, by `partition_id`: training and the audit must agree on it.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from ecif_core.data.confine import confined, open_confined
from ecif_core.errors import ConfigError
from ecif_core.data.images import TAR_MEMBER, ImageAccess, image_bytes, image_ref, row_image_problem
from ecif_core.data.pairs import Pair, RejectedRow
from ecif_core.data.shards import open_tar, shard_paths

MAX_CAPTION_CHARS = 2000
MAX_REASON_CHARS = 500


FORMATS = ("jsonl", "csv", "parquet", "webdataset")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
              ".tar": "webdataset"}
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Column names other tools write (img2dataset / DataComp / LAION parquet, open_clip CSV), tried in order
IMAGE_KEYS, CAPTION_KEYS, ID_KEYS = ("image", "filepath", "url"), ("caption", "text", "title"), ("id", "key", "uid")


@dataclass(frozen=True)
class Source:
    """Where pairs come from and which columns hold them (a manifest's `train` / `validation`)."""

    path: str | list[str]            # a list only for webdataset: shards, each a path or pattern
    format: str
    image_key: str | None = None     # None: the first of IMAGE_KEYS the file has
    caption_key: str | None = None
    id_key: str | None = None
    separator: str | None = None     # CSV only; default "," (".tsv": tab)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def source_of(value: "str | Path | dict | Source", field: str = "train") -> Source:
    """A Source from a path (format from the extension) or a {"path", "format", ...} object."""
    if isinstance(value, Source):
        return value
    if isinstance(value, (str, Path)):
        value = {"path": str(value)}
    path = value.get("path") if isinstance(value, dict) else None
    is_list = isinstance(path, list) and bool(path) and all(isinstance(p, str) and p for p in path)
    if not (isinstance(path, str) and path) and not is_list:
        raise ConfigError(field, "must be a path or an object with a path (a list of shards for webdataset)")
    unknown = set(value) - {"path", "format", "image_key", "caption_key", "id_key", "separator"}
    if unknown:
        raise ConfigError(f"{field}.{sorted(unknown)[0]}", "unknown source field")
    first = path[0] if is_list else path
    fmt = value.get("format") or EXTENSIONS.get(Path(first).suffix.lower())
    if is_list and fmt != "webdataset":
        raise ConfigError(f"{field}.path", "a list of paths is for webdataset shards only")
    if fmt not in FORMATS:
        raise ConfigError(f"{field}.format" if "format" in value else field,
                          f"unsupported pair file type (give format: one of {FORMATS})")
    for key in ("image_key", "caption_key", "id_key", "separator"):
        if value.get(key) is not None and (not isinstance(value[key], str) or not value[key]):
            raise ConfigError(f"{field}.{key}", "must be a non-empty string")
    separator = value.get("separator") or ("\t" if Path(first).suffix.lower() == ".tsv" else None)
    return Source(list(path) if is_list else path, fmt, value.get("image_key"), value.get("caption_key"), value.get("id_key"),
                  separator if fmt == "csv" else None)


def read_pair_rows(source: "str | Path | dict | Source", field: str = "train",
                   roots: Sequence[Path] | None = None) -> Iterator[tuple[int, dict]]:
    """(row number, row with id/image/caption) from a pair source, streamed (Parquet by row
    group); unreadable rows carry __error__. With `roots`, the file (each shard) is opened
    by its real path, checked against them when it is opened (and refused when it is a hard
    link, unless the roots allow them: confine.open_confined)."""
    source = source_of(source, field)
    if source.format == "webdataset":
        yield from _webdataset_rows(source, field, roots)
        return
    path = confined(source.path, roots, field)
    if not path.is_file():
        raise ConfigError(field, f"pair file not found: {source.path}")
    with open_confined(path, roots, field) as handle:
        if source.format == "jsonl":
            rows = _jsonl_rows(handle)
        elif source.format == "csv":
            rows = _csv_rows(handle, source.separator or ",")
        else:
            rows = _parquet_rows(handle, path, source, field)
        with contextlib.closing(rows):  # the row reader ends before its file is closed
            yield from _named_rows(rows, source, path, field)


def _named_rows(rows: Iterator[tuple[int, dict]], source: Source, path: Path, field: str) -> Iterator[tuple[int, dict]]:
    """Rows with the source's id, image and caption columns as "id", "image", "caption"."""
    keys: tuple[str | None, str | None, str | None] | None = None
    for number, row in rows:
        if "__error__" in row:
            yield number, row
            continue
        if keys is None:
            keys = _columns(row.keys(), source, path, field)
        id_key = keys[0]
        if source.format == "jsonl" and source.id_key is None:  # each line is an object of its own:
            id_key = next((k for k in ID_KEYS if k in row), None)  # an id-less first row leaves the rest theirs
        yield number, {"id": row.get(id_key) if id_key else None, "image": row.get(keys[1]),
                       "caption": row.get(keys[2])}


def has_rows(source: "str | Path | dict | Source", field: str = "train",
             roots: Sequence[Path] | None = None) -> bool:
    """Whether the source has a first row (readable or not): reads that row only, never the
    whole file, so a submission can refuse an empty file cheaply."""
    rows = read_pair_rows(source, field, roots)
    try:
        return next(rows, None) is not None
    finally:
        rows.close()


def _columns(names, source: Source, path: Path, field: str) -> tuple[str | None, str, str]:
    """(id, image, caption) column names: the source's own, else the first known name present."""
    names = list(names)

    def pick(given: str | None, known: tuple[str, ...], role: str, required: bool) -> str | None:
        if given is not None:
            if given not in names:
                raise ConfigError(f"{field}.{role}_key", f"{path.name} has no column {given!r} (columns: {names[:10]})")
            return given
        found = next((k for k in known if k in names), None)
        if found is None and required:
            raise ConfigError(field, f"{path.name}: no {role} column (looked for {list(known)}; "
                              f"set {role}_key; columns: {names[:10]})")
        return found

    return (pick(source.id_key, ID_KEYS, "id", False), pick(source.image_key, IMAGE_KEYS, "image", True),
            pick(source.caption_key, CAPTION_KEYS, "caption", True))


def _webdataset_rows(source: Source, field: str, roots: Sequence[Path] | None) -> Iterator[tuple[int, dict]]:
    """img2dataset's layout: members <key>.<ext> grouped by key (the name up to its first dot);
    the image is the first of jpg/jpeg/png/webp (or `image_key`), the caption `txt` (or
    `caption_key`), the id the key (or `id_key` of the sample's json)."""
    image_exts = (source.image_key,) if source.image_key else WDS_IMAGE_EXTENSIONS
    caption_ext = source.caption_key or "txt"
    number = 0
    for shard in shard_paths(source.path, field):
        shard = confined(shard, roots, field)
        with open_confined(shard, roots, field) as handle, open_tar(handle) as tar:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar:
                if member.isfile():
                    folder, _, name = member.name.rpartition("/")
                    key, _, ext = name.partition(".")
                    samples.setdefault(f"{folder}/{key}" if folder else key, {})[ext.lower()] = member
            for key, members in samples.items():
                number += 1
                image = next((members[e] for e in image_exts if e in members), None)
                caption = members.get(caption_ext)
                try:
                    meta = json.loads(tar.extractfile(members["json"]).read()) if "json" in members else {}
                    if not isinstance(meta, dict):
                        raise ValueError("not a JSON object")
                    text = tar.extractfile(caption).read().decode("utf-8", "replace") if caption else None
                except (ValueError, OSError, tarfile.TarError) as exc:  # one bad sample, not a bad shard
                    yield number, {"__error__": f"sample {key!r} unreadable ({type(exc).__name__}: {exc})"}
                    continue
                yield number, {
                    "id": meta.get(source.id_key) if source.id_key else key.rpartition("/")[2],
                    "image": f"{shard}{TAR_MEMBER}{image.name}" if image else None, "caption": text}


def _jsonl_rows(handle: IO[bytes]) -> Iterator[tuple[int, dict]]:
    """Lines decoded one by one: invalid UTF-8 is that row's fault, not the file's."""
    for number, raw in enumerate(handle, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a BOM (files saved by Excel / Notepad)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, {"__error__": f"not valid UTF-8 (byte {exc.start})"}
            continue
        if line.strip():
            yield number, _json_row(line)


def _csv_rows(handle: IO[bytes], separator: str) -> Iterator[tuple[int, dict]]:
    # -sig: files saved by Excel; surrogateescape: invalid bytes become lone surrogates, which
    # make that row rejected (invalid Unicode) instead of failing the whole file.
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
    try:
        for number, row in enumerate(csv.DictReader(text, delimiter=separator), start=1):
            yield number, row
    finally:
        text.detach()  # the caller closes the file it opened


def _parquet_rows(handle: IO[bytes], path: Path, source: Source, field: str) -> Iterator[tuple[int, dict]]:
    """Row groups one at a time, only the needed columns: memory stays bounded by a row group."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(handle)
    names = parquet.schema_arrow.names
    id_key, image_key, caption_key = _columns(names, source, path, field)
    columns = [c for c in (id_key, image_key, caption_key) if c is not None]
    number = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=8192):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _json_row(line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"__error__": f"invalid JSON ({exc.msg})"}
    except RecursionError:
        return {"__error__": "invalid JSON (nested too deeply)"}
    return row if isinstance(row, dict) else {"__error__": "row is not a JSON object"}


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
    base = _base_of(source, access.roots if access else None, field)
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


def _base_of(source: Source, roots: Sequence[Path] | None = None, field: str = "train") -> Path:
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
    for _, _, _, reason, duplicate in _checked_rows(source, field, _base_of(source), False, None, stat_images=False):
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
