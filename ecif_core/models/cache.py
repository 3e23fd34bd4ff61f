"""One loaded model per checkpoint, reused across shards, with its files confined to the data
roots at every use (a swapped file is refused, not served)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ecif_core.data.confine import confined
from ecif_core.models.lora import ADAPTER_WEIGHTS
from ecif_core.data.manifest import Manifest
from ecif_core.models.factory import LoadedModel, ready_model
from ecif_core.influence.projection import Projector
from ecif_core.data import storage


class ModelCache:
    """One loaded model (with theta and projector) per checkpoint, reused across shards."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: tuple[LoadedModel, list, Projector] | None = None

    def get(self, manifest: Manifest, roots: list[Path] | None = None) -> tuple[LoadedModel, list, Projector]:
        """The model of `manifest`; with `roots`, its files are confined now (by real path),
        also when the cached copy is reused (a swapped file is refused, not served)."""
        files = model_files(manifest, roots)
        key = (manifest.model_arch, files.identity(), json.dumps(manifest.options.theta),
               json.dumps(manifest.options.projection, sort_keys=True))
        if key != self._key:
            ready = ready_model(manifest.model_arch, files.config, files.checkpoint, adapter=files.adapter,
                                theta=manifest.options.theta)
            projector = Projector.for_theta(ready.theta, manifest.options.projection_spec())
            self._key, self._value = key, (ready.loaded, [p for _, p in ready.theta], projector)
        return self._value


class ReferenceCache:
    """The audit's reference model (no theta: forward passes only), reused across shards."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: LoadedModel | None = None

    def get(self, reference: dict, roots: list[Path] | None = None) -> LoadedModel:
        """The reference model; its files are confined to `roots` now, as the audited model's are."""
        files = confined_files(reference["checkpoint"], reference.get("config"), reference.get("adapter"), roots,
                               "reference")
        key = (reference.get("arch"), files.identity())
        if key != self._key:
            ready = ready_model(reference.get("arch"), files.config, files.checkpoint, adapter=files.adapter,
                                grads="frozen")
            self._key, self._value = key, ready.loaded
        return self._value


@dataclass(frozen=True)
class ModelFiles:
    """The real paths of a manifest's model files, checked against the data roots."""

    checkpoint: str
    config: str | dict | None
    adapter: str | None

    def identity(self) -> tuple:
        """What makes a cached model stale: these paths, the config, and the checkpoint's and adapter
        weights' identities (a checkpoint retrained in place must not be served from the cache)."""
        adapter_weights = None if self.adapter is None else os.path.join(self.adapter, ADAPTER_WEIGHTS)
        return (json.dumps(self.config, sort_keys=True), self.checkpoint, _file_identity(self.checkpoint),
                self.adapter, _file_identity(adapter_weights))


def model_files(manifest: Manifest, roots: list[Path] | None) -> ModelFiles:
    """The audited model's files (see confined_files)."""
    return confined_files(manifest.checkpoint, manifest.model_config, manifest.adapter, roots, "model")


def confined_files(checkpoint: str, config: str | dict | None, adapter: str | None, roots: list[Path] | None,
                   field: str) -> ModelFiles:
    """Checkpoint, config file and adapter folder (and its two files) by real path, each
    confined to `roots` at this moment (None: no roots, as in the embedded mode); errors name
    `field` ("model" or "reference")."""
    checkpoint = str(confined(checkpoint, roots, f"{field}.checkpoint"))
    if isinstance(config, str):
        config = str(confined(config, roots, f"{field}.config"))
    if adapter is not None:
        from ecif_core.models.lora import ADAPTER_CONFIG

        adapter = str(confined(adapter, roots, f"{field}.adapter"))
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            confined(os.path.join(adapter, name), roots, f"{field}.adapter")
    return ModelFiles(checkpoint, config, adapter)


def _file_identity(path: str | None) -> tuple | None:
    """(mtime_ns, size), in a bucket (ETag, size): a checkpoint retrained in place must not be
    served from the cache."""
    if path is None:
        return None
    target = storage.location(path)
    return storage.identity(target) if target.exists() else None
