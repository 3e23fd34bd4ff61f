"""Local paths and object-store URLs behind one path type, so every file of an audit (and a
pair file, image or checkpoint under a data root) can live on a disk or in a bucket.

A plain path stays a `pathlib.Path`; a URL with a scheme fsspec serves (`s3://bucket/key`,
`gs://`, `memory://`) becomes a `UPath` (universal_pathlib) with the same methods. Object
stores have no rename and no append, so every write here is one whole object: on a disk it
goes to a temporary file first and is renamed over the target (readers never see half a
file); in a bucket the object appears only when its upload completes. Endpoint, credentials
and region come from the standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
or fsspec's FSSPEC_S3_* settings), never from a manifest or the database.
"""
from __future__ import annotations

import contextlib
import json
import hashlib
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Iterator

from ecif_core.errors import ConfigError

WEB_SCHEMES = ("http", "https")  # images fetched by prepare (remote.py), not a store


def _s3_defaults() -> None:
    """fsspec's per-protocol config, which applies to every instance (also the ones zarr and
    universal_pathlib create); a user's own FSSPEC_S3_* settings win.

    No listings cache: several machines write one audit, and a listing cached by this process
    would hide objects another wrote since (a shard's marker, another stage's file).
    One request per read: with max_concurrency > 1, s3fs asks every object's size (a HEAD)
    before reading it, to split large ones into parallel ranges; an audit's objects are small
    (a shard's chunk, a marker, a thumbnail), so the HEAD doubled the requests for nothing."""
    import fsspec.config

    options = fsspec.config.conf.setdefault("s3", {})
    options.setdefault("use_listings_cache", False)
    options.setdefault("max_concurrency", 1)


_s3_defaults()


def scheme_of(value: "str | os.PathLike[str]") -> str | None:
    """The URL scheme ("s3"), or None for a plain path (and for file://)."""
    text = value if isinstance(value, str) else str(value)  # a UPath has no __fspath__
    if "://" not in text:
        return None
    scheme = text.split("://", 1)[0].lower()
    return None if scheme == "file" else scheme


def is_remote(value: "str | os.PathLike[str]") -> bool:
    """True for an object-store location (an fsspec URL that is not a local file, or its UPath)."""
    return not isinstance(value, Path) and scheme_of(value) is not None


def location(value: "str | os.PathLike[str]", field: str = "path") -> Path:
    """The path object for a local path or an object-store URL ('..' folded, no trailing '/').

    A scheme the installed fsspec does not serve (or whose package is missing) is a
    ConfigError naming `field`: never a local folder named after the URL.
    """
    if isinstance(value, Path) or (not isinstance(value, str) and is_remote(value)):
        return value
    text = os.fspath(value)
    scheme = scheme_of(text)
    if scheme is None:
        return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
    if scheme in WEB_SCHEMES:
        raise ConfigError(field, f"{text}: http(s) is not a store (images by URL: see remote_images)")
    try:
        import fsspec
        from upath import UPath

        fsspec.get_filesystem_class(scheme)
    except (ValueError, ImportError) as exc:
        raise ConfigError(field, f"{text}: the scheme {scheme}:// is not served here ({exc}); "
                                 "install its fsspec package (s3fs for s3://) or use a local path") from None
    bucket_and_key = text.split("://", 1)[1]
    folded = posixpath.normpath("/" + bucket_and_key).lstrip("/")
    return UPath(f"{scheme}://{folded}")


def read_bytes(path: Path) -> bytes:
    """A whole file or object; missing -> FileNotFoundError. In a bucket one GET (opening it as a
    file would first ask its size)."""
    if is_remote(path):
        return path.fs.cat_file(path.path)
    return path.read_bytes()


def read_text(path: Path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: Path, data: bytes) -> None:
    """One whole file or object; readers see the old one or all of the new one (in a bucket one
    PUT: opening the object as a file would first ask whether it exists)."""
    if is_remote(path):
        path.fs.pipe_file(path.path, data)
        return
    with open_for_write(path, "wb") as handle:
        handle.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def open_for_write(path: Path, mode: str = "w", **kwargs: object) -> Iterator[IO]:
    """A handle whose content replaces `path` only when the block ends without an error.

    Local: a temporary file beside the target, renamed over it. Object store: the upload,
    which the store publishes when it completes (a failed block aborts it).
    """
    if is_remote(path):
        with path.open(mode, **kwargs) as handle:
            yield handle
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_folder(path: Path) -> None:
    """Create a local folder; object stores have no folders (a key's prefix is enough)."""
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)


def remove_tree(path: Path) -> None:
    """Remove a folder (or every object under a prefix); missing is fine."""
    if is_remote(path):
        fs = path.fs
        with contextlib.suppress(FileNotFoundError):
            if fs.exists(path.path):
                fs.rm(path.path, recursive=True)
        return
    shutil.rmtree(path, ignore_errors=True)


def files_under(path: Path) -> list[Path]:
    """Every file below a folder (prefix), sorted."""
    return sorted(p for p in path.rglob("*") if p.is_file())


def identity(path: Path) -> tuple:
    """What changes when a file is replaced: (mtime_ns, size) on a disk, the ETag (or mtime)
    and size in a bucket."""
    if not is_remote(path):
        stat = path.stat()
        return stat.st_mtime_ns, stat.st_size
    info = path.fs.info(path.path)  # a HEAD: the ETag changes with the content, even within a second
    return str(info.get("ETag") or info.get("LastModified")), info.get("size")


def local_copy(path: Path) -> Path:
    """A local file with the content of `path` (itself when it is local): libraries that need
    a real file (torch.load with mmap, safetensors) read object-store checkpoints through it."""
    return path if not is_remote(path) else local_folder(path.parent, (path.name,)) / path.name


def local_folder(path: Path, names: "tuple[str, ...]") -> Path:
    """A local folder holding the files `names` of the folder `path` (itself when local): a
    checkpoint or a peft adapter folder in a bucket is read through it. Copies are cached (in
    ECIF_CACHE_DIR, else the temporary folder) by URL and identity, so a replaced object is
    fetched again."""
    if not is_remote(path):
        return path
    key = "\x00".join([str(path), *(f"{name}\x00{identity(path / name)}" for name in names)])
    cache = Path(os.environ.get("ECIF_CACHE_DIR") or Path(tempfile.gettempdir()) / "ecif-cache")
    folder = cache / hashlib.sha256(key.encode()).hexdigest()[:32]
    for name in names:
        if not (folder / name).exists():
            with open_for_write(folder / name, "wb") as out, (path / name).open("rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)
    return folder


def absolute(path: "str | os.PathLike[str]") -> str:
    """How a folder is recorded (database, edit records) and compared: a URL as is ('..'
    folded), a local path resolved."""
    return resolve_against(".", str(path))


def resolve_against(base: "str | os.PathLike[str]", value: str) -> str:
    """`value` as an absolute location: a URL as is ('..' folded), a relative path against
    `base` (a folder path or URL), an absolute local path resolved."""
    if is_remote(value):
        return str(location(value))
    if is_remote(base):
        return value if os.path.isabs(value) else str(location(f"{base}/{value}"))
    return str((Path(os.fspath(base)) / value).resolve())


def check_writable(path: Path, field: str) -> None:
    """Write and remove one small object under `path` now: an unreachable endpoint, a missing
    bucket or missing credentials is a ConfigError naming `field` before any work starts."""
    probe = path / f".ecif-probe-{uuid.uuid4().hex}"
    try:
        make_folder(path)
        write_bytes(probe, b"ok")
        probe.unlink()
    except Exception as exc:  # noqa: BLE001 - any failure of the store is the same answer to the user
        raise ConfigError(field, f"store {path} cannot be written ({type(exc).__name__}: {exc})") from None


def read_json_file(path: "str | os.PathLike[str]", field: str, what: str = "file") -> object:
    """A JSON file's content; a missing or malformed file is a ConfigError naming `field`."""
    path = location(path, field)
    if not path.is_file():
        raise ConfigError(field, f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(field, f"{what} {path} is not valid JSON ({exc})") from exc
