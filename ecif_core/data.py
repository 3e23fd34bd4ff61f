"""Pair sources (JSONL, CSV, Parquet), row validation and batch loading.

Bad rows are recorded with a reason instead of failing the audit. Relative image paths
resolve against the pair file's folder.
"""
from __future__ import annotations

import csv
import functools
import glob
import hashlib
import io
import json
import itertools
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .confine import OutsideRoots, confined
from .errors import ConfigError, EcifError
from .remote import FetchError, RemoteImages, fetch, fetched_path, is_url

MAX_CAPTION_CHARS = 2000
MAX_IMAGE_BYTES = 64 * 2**20        # a larger file is rejected before it is opened
MAX_IMAGE_PIXELS = 64_000_000       # decompression bombs: width x height above this is rejected
MAX_REASON_CHARS = 500
MAX_SHARDS = 100_000                # shards one webdataset source may name (ECIF_MAX_SHARDS in the service)
MAX_PATTERN_CHARS = 4096            # a shard path or pattern (PATH_MAX)


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
    unreadable: bool = False  # the row itself could not be parsed: it has no id of its own


FORMATS = ("jsonl", "csv", "parquet", "webdataset")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
              ".tar": "webdataset"}
TAR_MEMBER = "::"                    # an image inside a webdataset shard: "<shard.tar>::<member>"
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
    by its real path, checked against them when it is opened."""
    source = source_of(source, field)
    if source.format == "webdataset":
        yield from _webdataset_rows(source, field, roots)
        return
    path = confined(source.path, roots, field)
    if not path.is_file():
        raise ConfigError(field, f"pair file not found: {source.path}")
    if source.format == "jsonl":
        rows = _jsonl_rows(path)
    elif source.format == "csv":
        rows = _csv_rows(path, source.separator or ",")
    else:
        rows = _parquet_rows(path, source, field)
    keys: tuple[str | None, str | None, str | None] | None = None
    for number, row in rows:
        if "__error__" in row:
            yield number, row
            continue
        if keys is None:
            keys = _columns(row.keys(), source, path, field)
        yield number, {"id": row.get(keys[0]) if keys[0] else None, "image": row.get(keys[1]),
                       "caption": row.get(keys[2])}


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


def shard_paths(pattern: str | list[str], field: str = "train", limit: int = MAX_SHARDS) -> list[Path]:
    """The tar shards of a webdataset source: a path, a brace pattern ({000..009}), a glob,
    or a list of those; at most `limit` of them, counted before anything is expanded."""
    from braceexpand import braceexpand

    patterns = [pattern] if isinstance(pattern, str) else pattern
    check_shard_count(patterns, field, limit)
    paths: list[str] = []
    missing: list[str] = []
    for expanded in itertools.islice((e for p in patterns for e in braceexpand(p)), limit + 1):
        for path in sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]:
            if not os.path.isfile(path):
                missing.append(path)
                if len(missing) == 3:  # a bogus pattern stops here, not after expanding it all
                    raise ConfigError(field, f"webdataset shard(s) not found: {missing}")
            paths.append(path)
        if len(paths) > limit:
            raise ConfigError(field, f"names more than {limit} shards")
    if not paths or missing:
        raise ConfigError(field, f"webdataset shard(s) not found: {missing[:3] or pattern}")
    return [Path(p) for p in paths]


def check_shard_count(patterns: Sequence[str], field: str, limit: int = MAX_SHARDS) -> int:
    """How many paths the brace patterns name, counted without expanding them (a 50-byte
    `{1..100000000}` costs nothing); more than `limit` is a ConfigError."""
    total = 0
    for pattern in patterns:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ConfigError(field, f"a shard path or pattern is longer than {MAX_PATTERN_CHARS} characters")
        if not _balanced(pattern):
            raise ConfigError(field, "unbalanced braces in a shard pattern")
        total += count_expansions(pattern)
        if total > limit:
            raise ConfigError(field, f"names {total} shards or more (limit {limit}; ECIF_MAX_SHARDS in the service)")
    return total


_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")   # braceexpand's own expressions
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def count_expansions(pattern: str) -> int:
    """The number of strings braceexpand makes of `pattern` (same grammar: {a,b} alternatives,
    {1..9[..step]} and {a..z} ranges, nesting, backslash escapes, unmatched braces literal)."""
    total, i = 1, 0
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
            continue
        if pattern[i] == "{":
            end = _closing_brace(pattern, i)
            count = None if end is None else _group_count(pattern[i + 1:end])
            if count is not None:
                total *= count
                i = end + 1
                continue
        i += 1
    return total


def _balanced(pattern: str) -> bool:
    depth, i = 0, 0
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
            continue
        depth += (pattern[i] == "{") - (pattern[i] == "}")
        i += 1
    return depth == 0


def _closing_brace(pattern: str, start: int) -> int | None:
    depth, i = 0, start
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return i
        i += 1
    return None


def _group_count(inner: str) -> int | None:
    """Strings one {group} stands for; None when braceexpand keeps it literally."""
    match = _INT_RANGE.match(inner)
    if match:
        start, end, step = int(match.group(1)), int(match.group(2)), int(match.group(3) or 1) or 1
        return len(range(start, end + 1, step) if start < end else range(start, end - 1, -step))
    match = _CHAR_RANGE.match(inner)
    if match:
        start, end = _ALPHABET.index(match.group(1)), _ALPHABET.index(match.group(2))
        step = int(match.group(3) or 1) or 1
        return len(_ALPHABET[start:end + 1:step] if start < end else _ALPHABET[start:(end or -52) - 1:-step])
    parts, depth, start, i = [], 0, 0, 0
    while i < len(inner):
        char = inner[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
        i += 1
    if not parts:
        return None
    parts.append(inner[start:])
    return sum(count_expansions(part) for part in parts)


def _webdataset_rows(source: Source, field: str, roots: Sequence[Path] | None) -> Iterator[tuple[int, dict]]:
    """img2dataset's layout: members <key>.<ext> grouped by key (the name up to its first dot);
    the image is the first of jpg/jpeg/png/webp (or `image_key`), the caption `txt` (or
    `caption_key`), the id the key (or `id_key` of the sample's json)."""
    image_exts = (source.image_key,) if source.image_key else WDS_IMAGE_EXTENSIONS
    caption_ext = source.caption_key or "txt"
    number = 0
    for shard in shard_paths(source.path, field):
        shard = confined(shard, roots, field)
        with tarfile.open(shard, "r") as tar:
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


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Lines decoded one by one: invalid UTF-8 is that row's fault, not the file's."""
    with path.open("rb") as handle:
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


def _csv_rows(path: Path, separator: str) -> Iterator[tuple[int, dict]]:
    # -sig: files saved by Excel; surrogateescape: invalid bytes become lone surrogates, which
    # make that row rejected (invalid Unicode) instead of failing the whole file.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle, delimiter=separator), start=1):
            yield number, row


def _parquet_rows(path: Path, source: Source, field: str) -> Iterator[tuple[int, dict]]:
    """Row groups one at a time, only the needed columns: memory stays bounded by a row group."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
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


@dataclass(frozen=True)
class ImageAccess:
    """Where images may come from: local data roots (None: anywhere) and, when the manifest
    opts in, http(s) URLs under `remote`, fetched into `fetch_dir` (the audit folder's copy)."""

    roots: Sequence[Path] | None = None
    remote: RemoteImages | None = None
    fetch_dir: Path | None = None


def read_pairs(path: "str | Path | dict | Source", check_images: bool = True, field: str = "train",
               image_roots: Sequence[Path] | None = None,
               access: ImageAccess | None = None) -> tuple[list[Pair], list[RejectedRow], list[str]]:
    """(usable pairs, rejected rows, ids of every readable row), in memory: see iter_pairs."""
    pairs, rejected, all_ids = [], [], []
    for item in iter_pairs(path, check_images, field, access or ImageAccess(roots=image_roots)):
        if isinstance(item, Pair):
            pairs.append(item)
        else:
            rejected.append(item)
        if not (isinstance(item, RejectedRow) and item.unreadable):
            all_ids.append(item.id)
    return pairs, rejected, all_ids


def iter_pairs(path: "str | Path | dict | Source", check_images: bool = True, field: str = "train",
               access: ImageAccess | None = None) -> Iterator["Pair | RejectedRow"]:
    """Each row as a usable Pair or a RejectedRow, streamed. Duplicate ids are an error.

    Rows that cannot be parsed at all have no id; they are rejected as "row-<n>" (unreadable)
    and are not part of the partition (neither training nor the audit can read them). With
    `access.roots` (the service's data roots), an image whose real path lies outside all of
    them is rejected. URL images are fetched (when `check_images`) into `access.fetch_dir`,
    once. Memory: the set of ids seen.
    """
    roots = access.roots if access else None
    base = _base_of(source_of(path, field), roots, field)
    seen: dict[str, int] = {}
    for number, row in read_pair_rows(path, field, roots):
        pair_id, reason = _row_identity(number, row, field, seen)
        if pair_id is None:
            yield RejectedRow(number, f"row-{number}", _clean(reason), unreadable=True)
            continue
        if reason is None:
            try:
                reason = _row_problem(row, base, check_images, access)
            except Exception as exc:  # noqa: BLE001 - whatever a row makes the OS or a decoder raise
                reason = f"row cannot be used ({type(exc).__name__}: {exc})"
        if reason:
            yield RejectedRow(number, pair_id, _clean(reason))
        else:
            yield Pair(pair_id, _image_ref(base, row["image"]), str(row["caption"]).strip())


def _row_identity(number: int, row: dict, field: str, seen: dict[str, int]) -> tuple[str | None, str | None]:
    """(id, problem of its text fields) of a parsed row; id None: the row has no usable id (an
    unreadable row, problem says why). Duplicate ids are an error naming both rows.

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
    if pair_id in seen:
        raise ConfigError(field, f"duplicate id {_clean(repr(pair_id))} in rows {seen[pair_id]} and {number}")
    seen[pair_id] = number
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


def _clean(text: str) -> str:
    """A reason that any database and CSV can hold: no NUL, no lone surrogate, bounded."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


@dataclass
class SourceSummary:
    rows: int
    usable: int
    rejected: int
    reasons: dict[str, int]      # rejection reason (without its details) -> rows


def validate_source(source: "str | Path | dict | Source", field: str = "train") -> SourceSummary:
    """One streaming pass over a source without opening any image: row structure, ids
    (duplicates are an error naming both rows), captions. Memory: the set of ids only."""
    base = _base_of(source_of(source, field))
    seen: dict[str, int] = {}
    reasons: dict[str, int] = {}
    rows = usable = 0
    for number, row in read_pair_rows(source, field):
        rows += 1
        pair_id, reason = _row_identity(number, row, field, seen)
        if pair_id is not None and reason is None:
            reason = _row_problem(row, base, check_images=False, access=None, stat_images=False)
        if reason is None:
            usable += 1
        else:
            key = reason.split(" (")[0].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return SourceSummary(rows, usable, rows - usable, reasons)


def _stable_id(row: dict) -> str:
    key = f"{row.get('image', '')}\x00{row.get('caption', '')}"
    return "sha1-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def _base_of(source: Source, roots: Sequence[Path] | None = None, field: str = "train") -> Path:
    """The folder relative image paths (and tar members' shards) resolve against: the real
    pair file's (for webdataset, the first shard's)."""
    return confined(source.path if isinstance(source.path, str) else source.path[0], roots, field).parent


def _image_ref(base: Path, image: str) -> str:
    """The resolved image path, keeping the member of a shard ("<shard.tar>::<member>"); a URL as is."""
    if is_url(image):
        return image
    member = image.split(TAR_MEMBER, 1)[1] if TAR_MEMBER in image else None
    path = str(_resolve(base, image))
    return path if member is None else f"{path}{TAR_MEMBER}{member}"


def _resolve(base: Path, image: str) -> Path:
    """The image's file (for an image inside a tar shard: the shard)."""
    image = image[len("file://"):] if image.startswith("file://") else image
    return (base / image.split(TAR_MEMBER)[0]).resolve()


def _row_problem(row: dict, base: Path, check_images: bool, access: ImageAccess | None,
                 stat_images: bool = True) -> str | None:
    """Why this row cannot be used, or None (`stat_images=False`: the image file is not touched)."""
    caption, image = row.get("caption"), row.get("image")
    if not isinstance(caption, str) or not caption.strip():
        return "caption is empty or not text"
    if len(caption) > MAX_CAPTION_CHARS:
        return f"caption longer than {MAX_CAPTION_CHARS} characters"
    if not isinstance(image, str) or not image.strip():
        return "image is empty"
    if is_url(image):
        return _url_problem(image.strip(), check_images and stat_images, access)
    image_roots = access.roots if access else None
    if not stat_images and image_roots is None:
        return None  # resolving is a system call per row: skipped when nothing is checked on disk
    # The shard of a tar member resolves against the pair file, like any image path; the
    # checks and the open below all use this one reference, never the raw relative text.
    ref = _image_ref(base, image)
    path = Path(ref.split(TAR_MEMBER, 1)[0])
    try:
        confined(path, image_roots, "image")
    except OutsideRoots:
        return "image outside the data roots"
    if not stat_images:
        return None
    if not path.is_file():
        return f"image not found: {path}"
    if TAR_MEMBER in ref and not ref.split(TAR_MEMBER, 1)[1]:
        return "image names no member of its shard"
    if check_images:
        return _image_problem(ref, image_roots)
    return None


def _url_problem(url: str, fetch_now: bool, access: ImageAccess | None) -> str | None:
    """Policy check; with `fetch_now`, fetch once into the fetch folder and check the bytes."""
    if access is None or access.remote is None:
        return "http(s) image URLs need the manifest's remote_images opt-in"
    problem = access.remote.host_problem(url)
    if problem or not fetch_now:
        return problem
    if access.fetch_dir is None:
        return "http(s) image URLs are read only by an audit (it keeps a copy in its folder)"
    local = fetched_path(access.fetch_dir, url)
    if not local.is_file():
        try:
            fetch(url, access.remote, local)
        except FetchError as exc:
            return str(exc)
    return _image_problem(str(local), None)  # the audit's own copy, outside the data roots


def local_image(image: str, fetch_dir: Path | None) -> str:
    """The file to open for a pair's image: a URL's fetched copy, else the image itself."""
    if is_url(image):
        if fetch_dir is None:
            raise EcifError(f"image {image} is a URL and no fetched copy is available")
        return str(fetched_path(fetch_dir, image))
    return image


def _image_problem(path: "Path | str", roots: Sequence[Path] | None) -> str | None:
    """Why the image cannot be used, or None; every failure of reading or decoding it is a
    reason (a row's fault never escapes as an exception)."""
    try:
        size = _image_size(path, roots)
        if size > MAX_IMAGE_BYTES:
            return f"image file too large ({size} bytes; limit {MAX_IMAGE_BYTES})"
        with _open_image(path, roots) as img:
            width, height = img.size  # from the header: a bomb is refused before it is decoded
            if width * height > MAX_IMAGE_PIXELS:
                return f"image too large ({width}x{height} pixels; limit {MAX_IMAGE_PIXELS})"
            img.load()  # a full decode: verify() alone lets truncated files through
    except OutsideRoots:
        return "image outside the data roots"
    except KeyError:
        return f"image not found in its shard: {str(path).split(TAR_MEMBER, 1)[-1]}"
    except Image.DecompressionBombError as exc:
        return f"image too large ({exc})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"image cannot be decoded: {exc}"
    except Exception as exc:  # noqa: BLE001 - a decoder's own bug on a hostile file is still this row's fault
        return f"image cannot be decoded: {type(exc).__name__}: {exc}"
    return None


def _image_size(path: "Path | str", roots: Sequence[Path] | None = None) -> int:
    if isinstance(path, str) and TAR_MEMBER in path:
        shard, member = path.split(TAR_MEMBER, 1)
        return _open_shard(shard, roots).getmember(member).size
    return confined(path, roots, "image").stat().st_size


def _open_image(path: "Path | str", roots: Sequence[Path] | None = None) -> Image.Image:
    """A file, or a member of a webdataset shard (read into memory: one image)."""
    if isinstance(path, str) and TAR_MEMBER in path:
        return Image.open(io.BytesIO(image_bytes(path, roots)))
    return Image.open(confined(path, roots, "image"))


def image_bytes(image: str, roots: Sequence[Path] | None = None) -> bytes:
    """The stored bytes of an image file or of a member of a webdataset shard; with `roots`,
    the file (the shard) is checked against them now, by its real path."""
    if TAR_MEMBER in image:
        shard, member = image.split(TAR_MEMBER, 1)
        handle = _open_shard(shard, roots).extractfile(member)  # KeyError: no such member
        if handle is None:
            raise OSError(f"{member} is not a file in {shard}")
        return handle.read()
    return confined(image, roots, "image").read_bytes()


def _open_shard(shard: str, roots: Sequence[Path] | None = None) -> tarfile.TarFile:
    """An open shard (by its real path, confined now), reopened when the file was replaced
    (keyed by its mtime and size)."""
    real = confined(shard, roots, "image")
    stat = os.stat(real)
    return _tar(str(real), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _tar(shard: str, _mtime_ns: int, _size: int) -> tarfile.TarFile:
    """Open shards stay open (per process): a batch reads many members of the same shard."""
    return tarfile.open(shard, "r")


def load_image(path: str, roots: Sequence[Path] | None = None) -> Image.Image:
    """RGB as the model sees it: EXIF orientation applied, transparency composited on white
    (as img2dataset does), grayscale / CMYK / palette converted. `path` may name a member of
    a webdataset shard ("<shard.tar>::<member>"); with `roots` it is confined when opened."""
    with _open_image(path, roots) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return img.convert("RGB")


def load_batch(pairs: Sequence[Pair], preprocess: Callable, tokenizer: Callable,
               fetch_dir: Path | None = None, roots: Sequence[Path] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) tensors for a batch, with the model's own transform and tokenizer;
    URL images come from their copies in `fetch_dir`; local ones are confined to `roots`
    again now (a file swapped for a symlink after prepare is refused, never read)."""
    return batch_tensors(pairs, load_batch_images(pairs, fetch_dir, roots), preprocess, tokenizer)


def load_batch_images(pairs: Sequence[Pair], fetch_dir: Path | None = None,
                      roots: Sequence[Path] | None = None) -> list[Image.Image]:
    """The batch's decoded images, once, so two models (audited and reference) share one read."""
    images = []
    for pair in pairs:
        try:
            images.append(load_image(local_image(pair.image, fetch_dir)) if is_url(pair.image)
                          else load_image(pair.image, roots))
        except OutsideRoots as exc:
            raise EcifError(f"pair {pair.id!r}: image {pair.image} is outside the data roots now "
                            f"(changed after prepare; not read): {exc.message}") from None
        except (OSError, ValueError, SyntaxError, KeyError) as exc:  # changed on disk after prepare validated it
            raise EcifError(f"pair {pair.id!r}: image {pair.image} cannot be loaded ({exc})") from exc
    return images


def batch_tensors(pairs: Sequence[Pair], images: Sequence[Image.Image], preprocess: Callable,
                  tokenizer: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) for one model: its own transform and tokenizer."""
    return torch.stack([preprocess(image) for image in images]), tokenizer([p.caption for p in pairs])


def data_hash(pairs: Sequence[Pair]) -> str:
    """Identity of a training set: ids, captions and image bytes, order independent."""
    digest = hashlib.sha256()
    for pair in sorted(pairs, key=lambda p: p.id):
        digest.update(pair.id.encode() + b"\x00" + pair.caption.encode() + b"\x00")
        digest.update(hashlib.sha256(image_bytes(pair.image)).digest())
    return digest.hexdigest()
