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
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, EcifError
from .remote import FetchError, RemoteImages, fetch, fetched_path, is_url

MAX_CAPTION_CHARS = 2000
MAX_IMAGE_BYTES = 64 * 2**20        # a larger file is rejected before it is opened
MAX_IMAGE_PIXELS = 64_000_000       # decompression bombs: width x height above this is rejected


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


def read_pair_rows(source: "str | Path | dict | Source", field: str = "train") -> Iterator[tuple[int, dict]]:
    """(row number, row with id/image/caption) from a pair source, streamed (Parquet by row
    group); unreadable rows carry __error__."""
    source = source_of(source, field)
    if source.format == "webdataset":
        yield from _webdataset_rows(source, field)
        return
    path = Path(source.path)
    if not path.is_file():
        raise ConfigError(field, f"pair file not found: {path}")
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


def shard_paths(pattern: str | list[str], field: str = "train") -> list[Path]:
    """The tar shards of a webdataset source: a path, a brace pattern ({000..009}), a glob,
    or a list of those."""
    from braceexpand import braceexpand

    paths = []
    for expanded in (e for p in ([pattern] if isinstance(pattern, str) else pattern) for e in braceexpand(p)):
        matches = sorted(Path(p) for p in glob.glob(expanded)) if glob.has_magic(expanded) else [Path(expanded)]
        paths += matches
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise ConfigError(field, f"webdataset shard(s) not found: {missing[:3] or pattern}")
    return paths


def _webdataset_rows(source: Source, field: str) -> Iterator[tuple[int, dict]]:
    """img2dataset's layout: members <key>.<ext> grouped by key (the name up to its first dot);
    the image is the first of jpg/jpeg/png/webp (or `image_key`), the caption `txt` (or
    `caption_key`), the id the key (or `id_key` of the sample's json)."""
    image_exts = (source.image_key,) if source.image_key else WDS_IMAGE_EXTENSIONS
    caption_ext = source.caption_key or "txt"
    number = 0
    for shard in shard_paths(source.path, field):
        shard = shard.resolve()
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
                meta = json.loads(tar.extractfile(members["json"]).read()) if "json" in members else {}
                yield number, {
                    "id": meta.get(source.id_key) if source.id_key else key.rpartition("/")[2],
                    "image": f"{shard}{TAR_MEMBER}{image.name}" if image else None,
                    "caption": tar.extractfile(caption).read().decode("utf-8", "replace") if caption else None}


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, _json_row(line)


def _csv_rows(path: Path, separator: str) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: files saved by Excel
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
    base = _base_of(source_of(path, field))
    seen: dict[str, int] = {}
    for number, row in read_pair_rows(path, field):
        if "__error__" in row:
            yield RejectedRow(number, f"row-{number}", row["__error__"], unreadable=True)
            continue
        raw_id = row.get("id")
        pair_id = str(raw_id).strip() if raw_id is not None else ""
        pair_id = pair_id or _stable_id(row)
        if pair_id in seen:
            raise ConfigError(field, f"duplicate id {pair_id!r} in rows {seen[pair_id]} and {number}")
        seen[pair_id] = number
        reason = _row_problem(row, base, check_images, access)
        if reason:
            yield RejectedRow(number, pair_id, reason)
        else:
            yield Pair(pair_id, _image_ref(base, row["image"]), str(row["caption"]).strip())


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
        reason = row.get("__error__")
        if reason is None:
            raw_id = row.get("id")
            pair_id = (str(raw_id).strip() if raw_id is not None else "") or _stable_id(row)
            if pair_id in seen:
                raise ConfigError(field, f"duplicate id {pair_id!r} in rows {seen[pair_id]} and {number}")
            seen[pair_id] = number
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


def _base_of(source: Source) -> Path:
    return Path(source.path if isinstance(source.path, str) else source.path[0]).resolve().parent


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
    path = _resolve(base, image)
    if image_roots is not None and not any(path.is_relative_to(root) for root in image_roots):
        return "image outside the data roots"
    if not stat_images:
        return None
    if not path.is_file():
        return f"image not found: {path}"
    if check_images:
        return _image_problem(path if TAR_MEMBER not in image else image)
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
    return _image_problem(local)


def local_image(image: str, fetch_dir: Path | None) -> str:
    """The file to open for a pair's image: a URL's fetched copy, else the image itself."""
    if is_url(image):
        if fetch_dir is None:
            raise EcifError(f"image {image} is a URL and no fetched copy is available")
        return str(fetched_path(fetch_dir, image))
    return image


def _image_problem(path: "Path | str") -> str | None:
    size = _image_size(path)
    if size > MAX_IMAGE_BYTES:
        return f"image file too large ({size} bytes; limit {MAX_IMAGE_BYTES})"
    try:
        with _open_image(path) as img:
            width, height = img.size  # from the header: a bomb is refused before it is decoded
            if width * height > MAX_IMAGE_PIXELS:
                return f"image too large ({width}x{height} pixels; limit {MAX_IMAGE_PIXELS})"
            img.load()  # a full decode: verify() alone lets truncated files through
    except Image.DecompressionBombError as exc:
        return f"image too large ({exc})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"image cannot be decoded: {exc}"
    return None


def _image_size(path: "Path | str") -> int:
    if isinstance(path, str) and TAR_MEMBER in path:
        shard, member = path.split(TAR_MEMBER, 1)
        return _open_shard(shard).getmember(member).size
    return Path(path).stat().st_size


def _open_image(path: "Path | str") -> Image.Image:
    """A file, or a member of a webdataset shard (read into memory: one image)."""
    if isinstance(path, str) and TAR_MEMBER in path:
        return Image.open(io.BytesIO(image_bytes(path)))
    return Image.open(path)


def image_bytes(image: str) -> bytes:
    """The stored bytes of an image file or of a member of a webdataset shard."""
    if TAR_MEMBER in image:
        shard, member = image.split(TAR_MEMBER, 1)
        handle = _open_shard(shard).extractfile(member)
        if handle is None:
            raise OSError(f"{member} is not a file in {shard}")
        return handle.read()
    return Path(image).read_bytes()


def _open_shard(shard: str) -> tarfile.TarFile:
    """An open shard, reopened when the file was replaced (keyed by its mtime and size)."""
    stat = os.stat(shard)
    return _tar(shard, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _tar(shard: str, _mtime_ns: int, _size: int) -> tarfile.TarFile:
    """Open shards stay open (per process): a batch reads many members of the same shard."""
    return tarfile.open(shard, "r")


def load_image(path: str) -> Image.Image:
    """RGB as the model sees it: EXIF orientation applied, transparency composited on white
    (as img2dataset does), grayscale / CMYK / palette converted. `path` may name a member of
    a webdataset shard ("<shard.tar>::<member>")."""
    with _open_image(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return img.convert("RGB")


def load_batch(pairs: Sequence[Pair], preprocess: Callable, tokenizer: Callable,
               fetch_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) tensors for a batch, with the model's own transform and tokenizer;
    URL images come from their copies in `fetch_dir`."""
    images = []
    for pair in pairs:
        try:
            images.append(preprocess(load_image(local_image(pair.image, fetch_dir))))
        except (OSError, ValueError, SyntaxError) as exc:  # changed on disk after prepare validated it
            raise EcifError(f"pair {pair.id!r}: image {pair.image} cannot be loaded ({exc})") from exc
    return torch.stack(images), tokenizer([p.caption for p in pairs])


def data_hash(pairs: Sequence[Pair]) -> str:
    """Identity of a training set: ids, captions and image bytes, order independent."""
    digest = hashlib.sha256()
    for pair in sorted(pairs, key=lambda p: p.id):
        digest.update(pair.id.encode() + b"\x00" + pair.caption.encode() + b"\x00")
        digest.update(hashlib.sha256(image_bytes(pair.image)).digest())
    return digest.hexdigest()
