"""Checks on raw JSON values from users (manifests, trace requests) before anything uses them,
and the cleaning of computed records before they are stored.

Python's json accepts what the rest of the system cannot store or compute with: NUL
characters (Postgres text refuses them), lone surrogates from `\\ud800` escapes (UTF-8
cannot encode them) and Infinity / NaN (JSON columns and the maths refuse them). Each is a
ConfigError naming the field, so the API answers 422 instead of failing later.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from ecif_core.errors import ConfigError

MAX_DEPTH = 32


def check_json_values(value: object, field: str, depth: int = 0) -> None:
    """Raise ConfigError(dotted field, why) for the first unusable string, key or number."""
    if depth > MAX_DEPTH:
        raise ConfigError(field or "manifest", f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise ConfigError(field or "manifest", problem)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(field or "manifest", "must be a finite number")
    elif isinstance(value, dict):
        for key, item in value.items():
            problem = text_problem(key) if isinstance(key, str) else None
            name = f"{field}.{printable(key)}" if field else printable(key)
            if problem:
                raise ConfigError(name, f"field name {problem}")
            check_json_values(item, name, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json_values(item, f"{field}[{i}]", depth + 1)


def map_leaves(value: object, kind: type, change: Callable[[Any], object]) -> object:
    """A copy of a JSON-like value (dicts, lists, tuples) with `change` applied to every leaf of `kind`."""
    if isinstance(value, kind):
        return change(value)
    if isinstance(value, dict):
        return {key: map_leaves(item, kind, change) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [map_leaves(item, kind, change) for item in value]
    return value


def finite_or_null(value: object) -> object:
    """A copy of a JSON-like value with every NaN and infinity replaced by None: what a strict
    JSON document (and a Postgres JSON column, which refuses NaN) can hold."""
    return map_leaves(value, float, lambda number: number if math.isfinite(number) else None)


def text_problem(text: str) -> str | None:
    """Why a string cannot be stored or encoded, or None."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return None


def printable(value: object) -> str:
    """`value` as text any database, log or JSON response can hold."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
