"""Server paths out of error messages: a client reads what it sent, never where the server keeps
things. A path under a data root is shown relative to it (as a manifest names it), a path in the
store as `<store>/...`; everything else of the message is left as it is."""
from __future__ import annotations

import os
import re
from typing import Iterable

from ecif_core.data.storage import absolute, is_remote

STORE, ROOT = "<store>", "<data root>"


class Redactor:
    """Replaces the store's and the data roots' prefixes in a text (each spelling: as configured,
    absolute, symlinks resolved); the longest prefix wins, so a store inside a root stays `<store>`."""

    def __init__(self, store_url: str, roots: Iterable[object]) -> None:
        self.kind: dict[str, str] = {}
        for root in roots:
            for spelling in _spellings(str(root)):
                self.kind[spelling] = ROOT
        for spelling in _spellings(store_url):
            self.kind[spelling] = STORE
        alternatives = "|".join(re.escape(p) for p in sorted(self.kind, key=len, reverse=True))
        # a prefix only where a path component ends: /srv/store2 is not under /srv/store
        self.pattern = re.compile(f"({alternatives})(?:(/)|(?![\\w.~-]))") if alternatives else None

    def __call__(self, text: str) -> str:
        if self.pattern is None:
            return text
        return self.pattern.sub(self._replace, text)

    def _replace(self, match: re.Match) -> str:
        prefix, slash = match.group(1), match.group(2)
        if self.kind[prefix] == STORE:
            return STORE + (slash or "")
        return "" if slash else ROOT  # under a root: the path relative to it


def _spellings(location: str) -> set[str]:
    location = location.rstrip("/")
    found = {location}
    try:
        found.add(absolute(location).rstrip("/"))
        if not is_remote(location):
            found |= {os.path.abspath(location), os.path.realpath(location), f"file://{os.path.realpath(location)}"}
    except Exception:  # noqa: BLE001 - a spelling that cannot be formed is one less to hide
        pass
    return {s for s in found if len(s) > 1}  # never "/" or "": every path would match
