"""Data-root confinement at the moment a file is opened.

A path checked once (at submit) can be swapped for a symlink before a worker opens it, so
every open of a pair file, shard, image, checkpoint, config or adapter goes through
`confined`: it resolves the real path now (symlinks followed) and refuses it unless it lies
under one of the roots; the caller then opens the real path it got back, not the raw one.
Object-store URLs (`s3://bucket/prefix/...`) have no links: their key, with '..' folded, must
lie under a root URL's prefix of the same scheme and bucket.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import ConfigError
from .storage import is_remote, location


class OutsideRoots(ConfigError):
    """A file's real path is not under any data root (or the path is not a usable name)."""


def confined(path: "str | os.PathLike[str]", roots: Sequence[Path] | None, field: str) -> Path:
    """The real path of `path`, checked against `roots` now (None: no roots, anything goes).

    NUL bytes and unencodable names are refused here too (the OS would raise ValueError or
    UnicodeEncodeError on them), so callers get one error type for every unusable name.
    """
    if is_remote(path):
        return _confined_url(path, roots, field)
    try:
        real = Path(os.path.realpath(path))
    except (ValueError, UnicodeError) as exc:
        raise OutsideRoots(field, f"not a usable file name ({type(exc).__name__})") from None
    if roots is not None and not any(not is_remote(root) and real.is_relative_to(root) for root in roots):
        raise OutsideRoots(field, f"{_printable(path)} is outside the data roots")
    return real


def _printable(path: "str | os.PathLike[str]") -> str:
    return os.fspath(path).encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _confined_url(path: "str | os.PathLike[str]", roots: Sequence[Path] | None, field: str) -> Path:
    """An object-store path, refused unless its folded key lies under a root's prefix."""
    if "\x00" in str(path):
        raise OutsideRoots(field, "not a usable file name (NUL byte)")
    target = location(path, field)
    if roots is None:
        return target
    for root in roots:
        if is_remote(root) and root.protocol == target.protocol:
            prefix = root.path.rstrip("/")
            if target.path == prefix or target.path.startswith(prefix + "/"):
                return target
    raise OutsideRoots(field, f"{_printable(path)} is outside the data roots")


def data_roots(values: Sequence["str | os.PathLike[str]"]) -> list[Path]:
    """Data roots as `confined` compares them: local folders by real path (a link inside a root
    cannot point out of it), object-store prefixes with '..' folded."""
    return [location(v) if is_remote(v) else Path(os.path.realpath(Path(os.fspath(v)).expanduser())) for v in values]
