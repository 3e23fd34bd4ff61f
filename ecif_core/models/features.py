"""The towers' features: the inputs of open_clip's two final projections (u = f W_t, v = h W_v).

When theta lies within the projections, the towers below them are fixed, so a pair's features hold
everything a change of theta needs: the audit keeps them (data.store, "features"), and the edit's
products, the replay and the validation check apply the projections to them instead of running the
towers on decoded images.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from ecif_core.influence.gradients import embed
from ecif_core.models.theta import PROJECTIONS, select_theta


def head_parameters(model: torch.nn.Module) -> tuple[str, str] | None:
    """The names of the two projections as x @ W parameters (open_clip's default CLIP), or None where the
    model has another head (a Linear text projection, say)."""
    if isinstance(getattr(getattr(model, "visual", None), "proj", None), torch.nn.Parameter) \
            and isinstance(getattr(model, "text_projection", None), torch.nn.Parameter):
        return PROJECTIONS[0], PROJECTIONS[1]
    return None


def tower_feature_dims(model: torch.nn.Module, names: Sequence[str]) -> tuple[int, int] | None:
    """(image, text) widths of the features when theta (`names`) lies within the two x @ W projections;
    else None (theta reaches below them, or the model has another head)."""
    heads = head_parameters(model)
    if heads is None or not names or not set(names) <= set(heads):
        return None
    return int(model.visual.proj.shape[0]), int(model.text_projection.shape[0])


def kept_feature_dims(model: torch.nn.Module, theta: Sequence[str] | None, lora: bool) -> tuple[int, int] | None:
    """The widths the audit keeps per pair for the options' `theta` patterns (None: the default): those of
    tower_feature_dims, except for a LoRA audit (`lora`), whose edit changes the adapters only
    (models.theta.check_edit_theta), so no edit would read them. The store's layout (stages.prepare) and the
    cost estimate both read this."""
    return None if lora else tower_feature_dims(model, [name for name, _ in select_theta(model, theta)])


@contextlib.contextmanager
def without_projections(model: torch.nn.Module) -> Iterator[None]:
    """encode_image / encode_text return the projections' inputs while inside (open_clip skips a None)."""
    saved = model.visual.proj, model.text_projection
    if not all(isinstance(p, torch.nn.Parameter) for p in saved):
        raise TypeError("needs both projections as x @ W parameters (open_clip's default CLIP)")
    model.visual.proj, model.text_projection = None, None
    try:
        yield
    finally:
        model.visual.proj, model.text_projection = saved


@torch.no_grad()
def projection_inputs(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) features of one batch, by a forward without the projections."""
    with without_projections(model):
        text, image = embed(model, images, tokens)
    return image, text


def projected(model: torch.nn.Module, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) = (text W_t, image W_v): what encode_text / encode_image return, differentiable in the projections."""
    return text @ model.text_projection, image @ model.visual.proj
