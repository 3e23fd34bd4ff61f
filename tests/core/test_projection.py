"""docs/METHOD.md, "What is checked": projected influence converges to the unprojected one as k grows."""
from functools import lru_cache

import numpy as np
import torch

from ecif_core.influence.gradients import loss_gradient, per_pair_gradients
from ecif_core.influence.curvature import DampedInverse, default_damping, eigendecompose, fisher_sum
from ecif_core.data.manifest import AuditOptions
from ecif_core.models.factory import restrict_grad_to, select_theta
from ecif_core.influence.projection import Projector, ProjectionSpec
from ecif_core.influence.scores import pair_scores
from tests.core.helpers import micro_model, random_batch

THETA = ["visual.proj", "text_projection", "transformer.resblocks.1.mlp.c_proj.weight"]


@lru_cache(maxsize=1)
def _full_gradients() -> tuple[list[str], list[torch.Size], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unprojected g_pos, g_neg (48 pairs in 6 batches) and a validation gradient, computed once."""
    loaded = micro_model(seed=5)
    theta = select_theta(loaded.model, THETA)
    restrict_grad_to(loaded.model, theta)
    params = [p for _, p in theta]
    names, shapes = [n for n, _ in theta], [p.shape for p in params]
    identity = Projector(names, shapes, ProjectionSpec(None, None))
    results = [per_pair_gradients(loaded.model, params, identity, *random_batch(loaded, 8, seed=100 + b))
               for b in range(6)]
    val = sum(loss_gradient(loaded.model, params, identity, *random_batch(loaded, 8, seed=900 + b))[0]
              for b in range(2))
    return names, shapes, torch.cat([r.pos for r in results]), torch.cat([r.neg for r in results]), val


def _project(flat: torch.Tensor, names, shapes, projector: Projector) -> torch.Tensor:
    """Project flat unprojected rows (projection is linear, so this equals projecting per batch)."""
    sizes = [s.numel() for s in shapes]
    parts = [part.reshape(len(flat), *shape) for part, shape in zip(flat.split(sizes, dim=1), shapes)]
    return projector.project(parts)


def _influence(spec: ProjectionSpec, damping: float | None) -> tuple[np.ndarray, float]:
    """Influence on a validation loss; damping None = 0.1 x mean eigenvalue (the default rule)."""
    names, shapes, g_pos, g_neg, val = _full_gradients()
    projector = Projector(names, shapes, spec)
    g_pos, g_neg = _project(g_pos, names, shapes, projector), _project(g_neg, names, shapes, projector)
    val = _project(val.unsqueeze(0), names, shapes, projector)[0]
    eigvals, eigvecs = eigendecompose(fisher_sum([g_pos], projector.dim))
    damping = default_damping(eigvals, AuditOptions().damping_per_mean_eigenvalue) if damping is None else damping
    return pair_scores(g_pos, g_neg, DampedInverse(eigvals, eigvecs, damping), val)["influence"].numpy(), damping


def test_projected_influence_converges_to_unprojected():
    # The default damping rule on the unprojected curvature, then held fixed so that every
    # projection size solves the same regularised problem.
    exact, damping = _influence(ProjectionSpec(None, None), None)
    # Mean over three projection seeds: a single draw fluctuates by about 0.01 at the larger sizes.
    correlations = [np.mean([np.corrcoef(exact, _influence(ProjectionSpec(k, k, seed=s), damping)[0])[0, 1]
                             for s in (3, 4, 5)]) for k in (4, 16, 32, 56)]
    assert all(a < b for a, b in zip(correlations, correlations[1:])), correlations
    assert correlations[-1] >= 0.99, correlations
