"""Data-root confinement at the moment a file is opened.

A path checked once (at submit) can be swapped for a symlink before a worker opens it, so
every open of a pair file, shard, image, checkpoint, config or adapter goes through
`confined`: it resolves the real path now (symlinks followed) and refuses it unless it lies
under one of the roots; the caller then opens the real path it got back, not the raw one.
Object-store URLs (`s3://bucket/prefix/...`) have no links: their key, with '..' folded, must
lie under a root URL's prefix of the same scheme and bucket.

A hard link has no "real path" elsewhere: a second name inside a root for a file outside it
looks like any file of the root. So pair files and images are opened with `open_confined`,
which refuses a regular file with more than one name, checked on the descriptor actually read
(`os.fstat`, never a stat of the path before the open), unless the roots allow hard links.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO, Iterable, Sequence

from ecif_core.errors import ConfigError
from ecif_core.data.storage import is_remote, location


ALLOW_HARD_LINKS = "ECIF_ALLOW_HARD_LINKS"   # the service's setting that allows them (services/settings.py)


class OutsideRoots(ConfigError):
    """A file's real path is not under any data root (or the path is not a usable name)."""


class HardLinked(ConfigError):
    """An opened file has other names (a hard link): one of them may lie outside every data root."""

    def __init__(self, field: str, message: str, names: int = 2):
        super().__init__(field, message)
        self.names = names

    def __reduce__(self):
        return (type(self), (self.field, self.message, self.names))


class Roots(list):
    """Data roots (real paths), with the policy that goes with them: whether files with several
    names (hard links, as in `cp -al` snapshots) may be read. A plain list of roots (or a copy
    of this one) refuses them."""

    def __init__(self, paths: Iterable[Path] = (), allow_hard_links: bool = False) -> None:
        super().__init__(paths)
        self.allow_hard_links = allow_hard_links


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


def data_roots(values: Sequence["str | os.PathLike[str]"], allow_hard_links: bool = False) -> Roots:
    """Data roots as `confined` compares them: local folders by real path (a link inside a root
    cannot point out of it), object-store prefixes with '..' folded."""
    return Roots([location(v) if is_remote(v) else Path(os.path.realpath(Path(os.fspath(v)).expanduser()))
                  for v in values], allow_hard_links)


def hard_links_allowed(roots: Sequence[Path] | None) -> bool:
    """No roots (nothing is confined) or roots that allow them."""
    return roots is None or bool(getattr(roots, "allow_hard_links", False))


def open_confined(path: "str | os.PathLike[str]", roots: Sequence[Path] | None, field: str) -> IO[bytes]:
    """`path` opened for reading by its real path, confined to `roots` now; a local file is
    then checked as opened (`check_opened`). Object-store objects have no links."""
    real = confined(path, roots, field)
    if is_remote(real):
        return real.open("rb", block_size=8 << 20)  # read by 8 MiB ranges
    try:
        handle = open_regular(real, roots, field, path)
    except OSError:
        if roots is not None and os.path.islink(real):
            raise OutsideRoots(field, f"{_printable(path)} was replaced by a symbolic link while being opened") from None
        raise
    try:
        check_location(handle, roots, field, path)
        check_opened(handle, roots, field, path)
    except BaseException:
        handle.close()
        raise
    return handle


def open_regular(real: "str | os.PathLike[str]", roots: Sequence[Path] | None, field: str,
                 path: "str | os.PathLike[str]") -> IO[bytes]:
    """A local file opened for reading, refused unless it is a regular file. O_NONBLOCK: a FIFO or
    device swapped in never blocks the worker in open(); O_NOFOLLOW (with roots): a last component
    swapped for a symlink after `confined` is refused, not followed."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if roots is None else getattr(os, "O_NOFOLLOW", 0))
    descriptor = os.open(real, flags)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OutsideRoots(field, f"{_printable(path)} is not a regular file")
    return os.fdopen(descriptor, "rb")


def check_location(handle: "IO | int", roots: Sequence[Path] | None, field: str,
                   path: "str | os.PathLike[str]") -> None:
    """Refuse an opened file that does not lie under a local root, read from the descriptor itself
    (Linux's /proc/self/fd): a folder on the path swapped for a symlink between `confined` and the
    open is followed by the kernel, and only the opened file tells where it really is."""
    local = [root for root in roots or () if not is_remote(root)]
    descriptor = handle if isinstance(handle, int) else handle.fileno()
    where = f"/proc/self/fd/{descriptor}"
    if not local or not os.path.exists(where):
        return
    if not any(Path(os.readlink(where)).is_relative_to(root) for root in local):
        raise OutsideRoots(field, f"{_printable(path)} is outside the data roots (a folder on its path was "
                                  "replaced while it was being opened)")


def check_opened(handle: "IO | int", roots: Sequence[Path] | None, field: str, path: "str | os.PathLike[str]") -> None:
    """Refuse an opened regular file with more than one name (a hard link), unless `roots` allow
    them. `os.fstat` on the descriptor read: the check and the use are the same file."""
    if hard_links_allowed(roots):
        return
    info = os.fstat(handle if isinstance(handle, int) else handle.fileno())
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        raise HardLinked(field, f"{_printable(path)} is a hard link ({info.st_nlink} names; another name may be a "
                                f"file outside the data roots): {HARD_LINKS_HINT}", info.st_nlink)


HARD_LINKS_HINT = f"set {ALLOW_HARD_LINKS}=true to read hard-linked files (snapshots made with cp -al need it)"
