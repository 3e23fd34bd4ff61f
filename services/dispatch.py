"""Sending an audit's, a trace's or an edit's task to the broker, by the task's name.

The names come from the stage table (ecif_core.stages.table: `Stage.task`) and from
liveness.REQUEST_TASKS, so the API, the CLI and the reconciler send tasks without importing the
workers that run them; routing by name picks the queue (services.broker).
"""
from __future__ import annotations

from ecif_core.stages.table import BY_NAME

from .liveness import REQUEST_TASKS


class CeleryDispatcher:
    """Sends the next stage's tasks to the broker; routing by name picks the queue."""

    def send(self, stage: str, audit_id: str, shard: int | None = None) -> None:
        """A stage's task, or (reconcile) a trace's or edit's: `stage` "trace" / "edit", `audit_id` its id."""
        from .broker import app

        if stage in REQUEST_TASKS:
            app.send_task(REQUEST_TASKS[stage], args=[audit_id])
            return
        args = [audit_id] if shard is None else [audit_id, shard]
        app.send_task(BY_NAME[stage].task, args=args)
