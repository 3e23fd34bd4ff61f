"""The audit's stages, once: name, the function of the stage's module (ecif_core.stages.<name>) that
runs it, whether it fans out one task per shard, and the worker queue it needs.

Everything that orders or names stages derives from this table: the service pipeline's next-stage
logic (in-process and Celery alike), progress and ETA, the reconciler, the database's stage values
(text checked against this table, so a new stage needs no migration), the Celery task names and
routing, the liveness reader and the CLI's progress. No torch import here: the API and the
database layer read the table without loading the engine.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    function: str      # name of the function in ecif_core.stages.<name> that runs it
    sharded: bool      # one task per shard (the function takes the shard number)
    queue: str         # "gpu": needs the model; "cpu": arrays and files only
    unit: str = "step"  # what its progress counts (ecif_core.progress): rows read, pairs, steps

    @property
    def task(self) -> str:
        """The Celery task name; its middle part routes it to the queue (workers/celery_app.py)."""
        return f"ecif.tasks.{self.queue}.{'shard_' if self.sharded else ''}{self.name}"


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "prepare", sharded=False, queue="cpu", unit="row"),
    Stage("gradients", "shard_gradients", sharded=True, queue="gpu", unit="pair"),
    Stage("curvature", "curvature", sharded=False, queue="cpu", unit="step"),
    Stage("validation", "validation", sharded=False, queue="gpu", unit="pair"),
    Stage("scores", "shard_scores", sharded=True, queue="cpu", unit="pair"),
    Stage("finalize", "finalize", sharded=False, queue="cpu", unit="step"),
)
DONE = "done"  # the stage value of a finished audit
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_NAMES: tuple[str, ...] = (*BY_NAME, DONE)
SHARDED: tuple[str, ...] = tuple(s.name for s in STAGES if s.sharded)
FIRST: str = STAGES[0].name
TASK_STAGES: dict[str, str] = {s.task: s.name for s in STAGES}


def next_stage(name: str) -> str:
    """The stage after `name` (DONE after the last)."""
    return STAGE_NAMES[STAGE_NAMES.index(name) + 1]


def position(name: str) -> int:
    """Order of a stage (DONE last), for "has the audit passed this stage" comparisons."""
    return STAGE_NAMES.index(name)
