"""A manifest's model checked without loading it: config, architecture, checkpoint header,
adapter and the size of the gradients it implies, so a service can refuse it at submit.

Everything is built on the meta device (shapes, no memory) and the checkpoint's weights are
not read (a safetensors header or a memory-mapped PyTorch file gives names and shapes).
"""
from __future__ import annotations

import torch

from ecif_core.errors import ConfigError
from ecif_core.data.manifest import Manifest
from ecif_core.models.theta import check_edit_theta
from ecif_core.models.factory import build_model, check_checkpoint, checkpoint_shapes, resolve_model_config, select_theta
from ecif_core.influence.projection import Projector

MAX_GRADIENT_DIM = 32768  # k: the curvature is k x k in float64 (8 GiB at this bound)


def check_model_spec(manifest: Manifest, max_dim: int = MAX_GRADIENT_DIM) -> int:
    """Raise ConfigError naming the field when the model cannot be built from the manifest;
    returns the dimension k of the projected gradients."""
    model = _meta_model(manifest, check_weights=True)
    theta = select_theta(model, manifest.options.theta)
    dim = Projector.for_theta(theta, manifest.options.projection_spec()).dim
    if dim > max_dim:
        field = "options.projection" if manifest.options.projection is None else "options.theta"
        raise ConfigError(field, f"the gradients would have {dim} dimensions (limit {max_dim}); "
                          "project them (options.projection) or choose fewer parameters (options.theta)")
    return dim


def check_theta(manifest: Manifest, patterns: list[str], field: str = "theta") -> list[str]:
    """The names of the parameters `patterns` select in the manifest's model (an edit's theta),
    or a ConfigError naming `field`; the weights are never read (the audit checked them)."""
    model = _meta_model(manifest, check_weights=False)
    try:
        names = [name for name, _ in select_theta(model, patterns)]
    except ConfigError as exc:
        raise ConfigError(field, exc.message) from None
    check_edit_theta(names, manifest.adapter is not None, field)
    return names


def _meta_model(manifest: Manifest, check_weights: bool) -> torch.nn.Module:
    """The manifest's model (with its adapter) on the meta device: names and shapes, no memory.
    `check_weights`: also compare the checkpoint's header with the model."""
    cfg = resolve_model_config(manifest.model_arch, manifest.model_config)  # hub names, unknown arch
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - open_clip's constructors raise anything on a bad config
        field = "model.config" if manifest.model_config is not None else "model.arch"
        raise ConfigError(field, f"open_clip cannot build this model ({type(exc).__name__}: {exc})") from None
    if check_weights:
        check_checkpoint(model, checkpoint_shapes(manifest.checkpoint))
    if manifest.adapter is not None:
        from ecif_core.models.lora import inject_adapter

        with torch.device("meta"):
            model = inject_adapter(model, manifest.adapter)
    return model
