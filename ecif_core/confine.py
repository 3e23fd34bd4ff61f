"""Data-root confinement at the moment a file is opened.

A path checked once (at submit) can be swapped for a symlink before a worker opens it, so
every open of a pair file, shard, image, checkpoint, config or adapter goes through
`confined`: it resolves the real path now (symlinks followed) and refuses it unless it lies
under one of the roots; the caller then opens the real path it got back, not the raw one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import ConfigError


class OutsideRoots(ConfigError):
    """A file's real path is not under any data root (or the path is not a usable name)."""


def confined(path: "str | os.PathLike[str]", roots: Sequence[Path] | None, field: str) -> Path:
    """The real path of `path`, checked against `roots` now (None: no roots, anything goes).

    NUL bytes and unencodable names are refused here too (the OS would raise ValueError or
    UnicodeEncodeError on them), so callers get one error type for every unusable name.
    """
    try:
        real = Path(os.path.realpath(path))
    except (ValueError, UnicodeError) as exc:
        raise OutsideRoots(field, f"not a usable file name ({type(exc).__name__})") from None
    if roots is not None and not any(real.is_relative_to(root) for root in roots):
        raise OutsideRoots(field, f"{_printable(path)} is outside the data roots")
    return real


def _printable(path: "str | os.PathLike[str]") -> str:
    return os.fspath(path).encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
