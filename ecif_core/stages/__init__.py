"""The audit's stages, one module each, in the order of `table.STAGES`: prepare -> gradients
(per shard) -> curvature -> validation -> scores (per shard) -> finalize. Each stage reads and
writes the audit folder only, is idempotent and skips finished work, so the same functions run
in-process or as Celery tasks, in any process, after any crash. One orchestrator runs them:
services.pipeline (in-process with a local dispatcher: services.embedded.run_audit; or as Celery
tasks); this package never loops over the stages itself.

This package's names are the stage API the service and the edit and trace read.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

from ecif_core.data.manifest import Manifest
from ecif_core.models.cache import ModelCache, ReferenceCache
from ecif_core.progress import Progress as TaskProgress
from ecif_core.stages.curvature import inverse_for
from ecif_core.stages.finalize import Ranking, final_ranking, misalignment_columns
from ecif_core.stages.plan import Plan, fetch_dir, image_access, load_plan, load_slots, manifest_of, open_store, roots_of
from ecif_core.stages.scores import collect_scores, scored_curvature_shift, shard_score_columns
from ecif_core.stages.table import BY_NAME
from ecif_core.stages.validation import audit_evidence

__all__ = ["ModelCache", "Plan", "Progress", "Ranking", "ReferenceCache", "TaskProgress", "audit_evidence", "collect_scores",
           "fetch_dir", "final_ranking", "image_access", "inverse_for", "load_plan", "load_slots", "manifest_of",
           "misalignment_columns", "open_store", "roots_of", "run_stage", "scored_curvature_shift", "shard_score_columns",
           "stage_function"]

# An orchestrator's callback: (stage, done, total) in the stage's unit (table.Stage.unit: rows,
# pairs or steps of the whole stage, every shard together); total None while it is not known.
Progress = Callable[[str, int, "int | None"], None]


def stage_function(stage: str) -> Callable[..., object]:
    """The function that runs `stage`: `table.Stage.function` in the module named after the stage."""
    spec = BY_NAME[stage]
    return getattr(importlib.import_module(f"{__name__}.{spec.name}"), spec.function)


def run_stage(stage: str, audit_dir: str | Path, shard: int | None = None, *, manifest: Manifest | None = None,
              image_roots: list[Path] | None = None, models: ModelCache | None = None,
              references: ReferenceCache | None = None, operator_hosts: Sequence[str] | None = None,
              progress: TaskProgress | None = None) -> object:
    """Run one stage (one shard of a sharded stage) of the table by name; the same call for the
    in-process dispatcher and the service's workers. `manifest`, `image_roots` and `operator_hosts` are
    prepare's inputs; the model caches are reused by the stages that load the model. `progress`:
    within the task, in the stage's unit (ecif_core.progress; the workers pass none)."""
    spec = BY_NAME[stage]
    function = stage_function(stage)
    if stage == "prepare":
        return function(manifest, audit_dir, image_roots, operator_hosts, progress=progress)
    args = (audit_dir, shard) if spec.sharded else (audit_dir,)
    kwargs = {"models": models, "references": references} if spec.queue == "gpu" else {}
    return function(*args, **kwargs, progress=progress)
