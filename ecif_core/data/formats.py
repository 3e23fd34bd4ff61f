"""Pair file formats: JSONL, CSV, Parquet and webdataset shards read as numbered raw rows.

Every format yields (row number, {"id", "image", "caption"}) with the source's own column names
mapped to these three; a row that cannot be read carries "__error__" instead, so the caller
(sources.py) records it as a rejected row rather than failing the audit.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

from ecif_core.data.confine import confined, open_confined
from ecif_core.data.images import TAR_MEMBER
from ecif_core.data.shards import open_tar, shard_paths
from ecif_core.errors import ConfigError

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
