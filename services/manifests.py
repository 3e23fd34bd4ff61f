"""Manifests sent to the API: every path confined to the configured data roots."""
from __future__ import annotations

from pathlib import Path

from typing import Any, Sequence

from braceexpand import braceexpand

from ecif_core.errors import ConfigError
from ecif_core.manifest import PATH_KEYS, Manifest, load_manifest, read_sidecar


def confined_manifest(raw: Any, roots: list[Path], remote_hosts: Sequence[str] = ()) -> Manifest:
    """Validate a manifest whose relative paths resolve against the first data root.

    Paths are checked before anything is read, with symlinks resolved, so neither `../`,
    an absolute path elsewhere nor a link pointing out of a root reaches the filesystem.
    A manifest's remote_images hosts must be among the server's `remote_hosts`.
    """
    if not roots:
        raise ConfigError("manifest", "the server has no data roots configured (ECIF_DATA_ROOTS)")
    if not isinstance(raw, dict):
        raise ConfigError("manifest", "must be a JSON object")
    _check_remote_hosts(raw.get("remote_images"), remote_hosts)
    for path_field in PATH_KEYS:
        value = _get(raw, path_field)
        for item in value if isinstance(value, list) else [value]:  # a list of webdataset shards
            if isinstance(item, str) and item:
                for expanded in braceexpand(item):  # a webdataset pattern: every shard it names
                    check_confined(expanded, roots, ".".join(path_field))
    return load_manifest(raw, base_dir=roots[0])


def _check_remote_hosts(remote: Any, allowed: Sequence[str]) -> None:
    if remote is None:
        return
    hosts = remote.get("allowed_hosts") if isinstance(remote, dict) else None
    if not allowed:
        raise ConfigError("remote_images", "this server does not fetch http(s) images (ECIF_REMOTE_IMAGE_HOSTS is empty)")
    allowed_set = {h.strip().lower() for h in allowed}
    for host in hosts if isinstance(hosts, list) else []:
        if not isinstance(host, str) or host.strip().lower() not in allowed_set:
            raise ConfigError("remote_images.allowed_hosts", f"host {host!r} is not allowed by this server "
                              "(ECIF_REMOTE_IMAGE_HOSTS)")


def check_confined(value: str, roots: list[Path], name: str) -> Path:
    path = Path(value[len("file://"):] if value.startswith("file://") else value)
    resolved = (roots[0] / path).resolve()  # absolute paths ignore roots[0]
    if "://" in value and not value.startswith("file://"):
        raise ConfigError(name, "only local paths under the data roots are accepted")
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ConfigError(name, "path is outside the data roots")
    sidecar = Path(str(resolved) + ".json")
    if name == "model.checkpoint" and sidecar.exists():
        if not any(sidecar.resolve().is_relative_to(root) for root in roots):
            raise ConfigError(name, "its training sidecar is outside the data roots")
        config = read_sidecar(resolved).get("model_config")
        if isinstance(config, str):  # a config path inside the sidecar is a path like any other
            check_confined(str(resolved.parent / config), roots, "model.config (training sidecar)")
    return resolved


def _get(raw: dict, path: tuple[str, ...]) -> Any:
    value: Any = raw
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
