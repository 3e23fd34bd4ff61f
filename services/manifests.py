"""Manifests sent to the API: every path confined to the configured data roots."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from typing import Any, Sequence

from braceexpand import braceexpand

from ecif_core.data.shards import MAX_SHARDS, check_shard_count
from ecif_core.data.confine import HARD_LINKS_HINT, HardLinked, OutsideRoots, confined, hard_links_allowed
from ecif_core.errors import ConfigError
from ecif_core.data.remote import canonical_entry
from ecif_core.data.storage import is_remote, location, resolve_against
from ecif_core.data.manifest import Manifest, load_manifest, manifest_paths, read_sidecar
from ecif_core.preflight import PAIR_FIELDS, check_before_audit
from ecif_core.values import check_json_values


def confined_manifest(raw: Any, roots: list[Path], remote_hosts: Sequence[str] = (),
                      max_shards: int = MAX_SHARDS) -> Manifest:
    """Validate a manifest whose relative paths resolve against the first data root.

    Paths are checked before anything is read, with symlinks resolved, so neither `../`,
    an absolute path elsewhere nor a link pointing out of a root reaches the filesystem
    (the workers check them again when they open them). Brace patterns are counted before
    they are expanded (at most `max_shards`). The model is checked without loading it
    (config, architecture, checkpoint keys and shapes, adapter, gradient size), so a model
    that cannot be audited is a 422 now rather than a failed audit later.
    A manifest's remote_images hosts must be among the server's `remote_hosts`.
    A pair file (each shard) that is a hard link is refused unless the roots allow them; then
    ecif_core.preflight.check_before_audit (the checks `ecif validate` and `ecif audit` run):
    an empty pair file, a one-row training file (reading two rows at most), the model.
    """
    if not roots:
        raise ConfigError("manifest", "the server has no data roots configured (ECIF_DATA_ROOTS)")
    if not isinstance(raw, dict):
        raise ConfigError("manifest", "must be a JSON object")
    check_json_values(raw, "")
    _check_remote_hosts(raw.get("remote_images"), remote_hosts)
    by_field: dict[str, list[str]] = {}
    for name, path in manifest_paths(raw):
        by_field.setdefault(name, []).append(path)
    resolver = _Resolver(roots[0])  # 100k shards in one folder: the folder is resolved once
    for name, items in by_field.items():
        check_shard_count(items, name, max_shards)
        pair_file = name.split(".")[0] in PAIR_FIELDS
        for item in items:  # a list of webdataset shards
            for expanded in braceexpand(item):  # a webdataset pattern: every shard it names
                _confined_real(expanded, roots, name, resolver, single_name=pair_file)
        if name == "model.checkpoint":
            check_confined(items[0], roots, name)  # and its training sidecar
    manifest = load_manifest(raw, base_dir=roots[0], max_shards=max_shards)
    check_before_audit(manifest, roots)  # the checks `ecif validate` and `ecif audit` run too
    return manifest


def _check_remote_hosts(remote: Any, allowed: Sequence[str]) -> None:
    if remote is None:
        return
    hosts = remote.get("allowed_hosts") if isinstance(remote, dict) else None
    if not allowed:
        raise ConfigError("remote_images", "this server does not fetch http(s) images (ECIF_REMOTE_IMAGE_HOSTS is empty)")
    allowed_set = {_canonical(h) for h in allowed} - {None}
    for host in hosts if isinstance(hosts, list) else []:
        if not isinstance(host, str) or _canonical(host) not in allowed_set:
            raise ConfigError("remote_images.allowed_hosts", f"host {host!r} is not allowed by this server "
                              "(ECIF_REMOTE_IMAGE_HOSTS)")


def _canonical(host: str) -> str | None:
    try:
        return canonical_entry(host)
    except ValueError:
        return None  # load_manifest names the bad entry; here it is simply not allowed


class _Resolver:
    """Real paths of many files in few folders: each folder is resolved once, and each file
    costs one lstat (a file that is a symlink is resolved in full)."""

    def __init__(self, base: Path) -> None:
        self.base = str(base)
        self.folders: dict[str, str] = {}

    def real(self, value: str) -> tuple[str, int]:
        """(real path, names of the file when it is a regular file: its hard-link count, else 1)."""
        joined = os.path.join(self.base, value)  # an absolute value ignores the base
        folder, name = os.path.split(joined)
        if name in ("", ".", ".."):
            return os.path.realpath(joined), 1
        real_folder = self.folders.get(folder)
        if real_folder is None:
            real_folder = self.folders[folder] = os.path.realpath(folder)
        full = os.path.join(real_folder, name)
        try:
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                full = os.path.realpath(full)
                info = os.stat(full)
        except OSError:
            return full, 1  # not there (yet): checked by name, refused later as missing
        return full, info.st_nlink if stat.S_ISREG(info.st_mode) else 1


def _under(real: str, roots: list[Path]) -> bool:
    return any(real == str(root) or real.startswith(str(root).rstrip(os.sep) + os.sep) for root in roots)


def _confined_real(value: str, roots: list[Path], name: str, resolver: _Resolver, single_name: bool = False) -> str:
    """The real path of `value`, refused unless it is under a root; with `single_name`, a
    regular file with several names (a hard link) is refused too, unless the roots allow them
    (the workers check the file again as they open it: confine.open_confined)."""
    if is_remote(value) or is_remote(resolver.base):  # an object-store key under a root's prefix
        target = value if is_remote(value) else resolve_against(resolver.base, value)
        try:
            return str(confined(target, roots, name))
        except OutsideRoots:
            raise ConfigError(name, "path is outside the data roots") from None
    if "://" in value and not value.startswith("file://"):
        raise ConfigError(name, "only paths under the data roots are accepted")
    path = value[len("file://"):] if value.startswith("file://") else value
    try:
        real, names = resolver.real(path)
    except (ValueError, UnicodeError):
        raise ConfigError(name, "not a usable file name") from None
    if not _under(real, roots):
        raise ConfigError(name, "path is outside the data roots")
    if single_name and names > 1 and not hard_links_allowed(roots):
        raise HardLinked(name, f"is a hard link ({names} names; another name may be a file outside the data roots): "
                               f"{HARD_LINKS_HINT}", names)
    return real


def check_confined(value: str, roots: list[Path], name: str) -> Path:
    """The real path of `value` (relative ones against the first root), refused unless it is
    under a root; a checkpoint's training sidecar (and a config it names) are checked too."""
    resolved = location(_confined_real(value, roots, name, _Resolver(roots[0])))
    sidecar = location(str(resolved) + ".json")
    if name == "model.checkpoint" and sidecar.exists():
        try:
            confined(sidecar, roots, name)
        except OutsideRoots:
            raise ConfigError(name, "its training sidecar is outside the data roots") from None
        config = read_sidecar(resolved).get("model_config")
        if isinstance(config, str):  # a config path inside the sidecar is a path like any other
            check_confined(str(resolved.parent / config), roots, "model.config (training sidecar)")
    return resolved
