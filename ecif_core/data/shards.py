"""Webdataset shard lists: the tar files a path, a brace pattern ({000..009}), a glob or a
list of those names, counted before anything is expanded (a 50-byte pattern may name 10^14)."""
from __future__ import annotations

import glob
import itertools
import os
import re
import tarfile
from pathlib import Path
from typing import IO, Sequence

from ecif_core.errors import ConfigError
from ecif_core.data.storage import is_remote, location

MAX_SHARDS = 100_000                # shards one webdataset source may name (ECIF_MAX_SHARDS in the service)
MAX_PATTERN_CHARS = 4096            # a shard path or pattern (PATH_MAX)


def shard_paths(pattern: str | list[str], field: str = "train", limit: int = MAX_SHARDS) -> list[Path]:
    """The tar shards of a webdataset source: a path, a brace pattern ({000..009}), a glob,
    or a list of those; at most `limit` of them, counted before anything is expanded."""
    from braceexpand import braceexpand

    patterns = [pattern] if isinstance(pattern, str) else pattern
    check_shard_count(patterns, field, limit)
    paths: list[str] = []
    missing: list[str] = []
    for expanded in itertools.islice((e for p in patterns for e in braceexpand(p)), limit + 1):
        for path in _matches(expanded):
            if not _is_file(path):
                missing.append(path)
                if len(missing) == 3:  # a bogus pattern stops here, not after expanding it all
                    raise ConfigError(field, f"webdataset shard(s) not found: {missing}")
            paths.append(path)
        if len(paths) > limit:
            raise ConfigError(field, f"names more than {limit} shards")
    if not paths or missing:
        raise ConfigError(field, f"webdataset shard(s) not found: {missing[:3] or pattern}")
    return [location(p) for p in paths]


def open_tar(shard: "str | Path | IO[bytes]") -> tarfile.TarFile:
    """An open shard; one in an object store is read through its fsspec file, by 8 MiB ranges.
    Given an open file (confine.open_confined), the tar reads it; the caller closes it."""
    if hasattr(shard, "read"):
        return tarfile.open(fileobj=shard, mode="r")
    if is_remote(shard):
        return tarfile.open(fileobj=location(shard).open("rb", block_size=8 << 20), mode="r")
    return tarfile.open(shard, "r")


def _matches(pattern: str) -> list[str]:
    """A glob's files (in a bucket: listed under the pattern's own prefix only), else the name."""
    if not glob.has_magic(pattern):
        return [pattern]
    if is_remote(pattern):
        path = location(pattern)
        return sorted(f"{path.protocol}://{p}" for p in path.fs.glob(path.path))
    return sorted(glob.glob(pattern))


def _is_file(path: str) -> bool:
    return location(path).is_file() if is_remote(path) else os.path.isfile(path)


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
