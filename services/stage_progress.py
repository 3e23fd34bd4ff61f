"""The in-process audit's progress per stage, in the stage's unit (rows, pairs, steps) over every
shard of it: the stage functions report within their task (ecif_core.progress), this adds the
shards finished before, so a bar moves with each batch instead of jumping per shard.

Only the embedded mode has it: a service worker runs its task without a callback, and
`ecif submit --wait` draws shard counts from the status endpoint."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from ecif_core import stages as core
from ecif_core.stages.table import SHARDED

from .db.models import Shard
from .db.session import session_scope


class StageProgress:
    """Sums one audit's within-task reports into `report(stage, done, total)` per stage."""

    def __init__(self, database_url: str, audit_id: str, audit_dir: str | Path, report: core.Progress) -> None:
        self.database_url, self.audit_id, self.audit_dir, self.report = database_url, audit_id, audit_dir, report
        self.last: dict[str, tuple[int, int | None]] = {}        # stage -> last (done, total) reported
        self.finished: dict[str, dict[int, int]] = {}            # sharded stage -> {finished shard: its pairs}
        self.running: dict[str, dict[int, tuple[int, int]]] = {}  # sharded stage -> {shard: (done, its pairs)}
        self.totals: dict[str, int] = {}                         # sharded stage -> pairs of every shard

    def task(self, stage: str, shard: int | None, unit: str, done: int, total: int | None, **_: float) -> None:
        """A report from inside a running task (Pipeline.task_progress)."""
        if stage not in SHARDED:
            self._send(stage, done, total)
            return
        self._open(stage)
        self.running[stage][shard] = (done, total or 0)
        self._send_sharded(stage)

    def task_done(self, stage: str, audit_id: str, shard: int | None) -> None:
        """After each task (LocalDispatcher.drain): a stage or shard that said nothing is counted whole."""
        if stage not in SHARDED:
            done, total = self.last.get(stage, (0, None))
            final = total if total is not None else max(done, 1)
            self._send(stage, final, final)
            return
        self._open(stage)
        _, pairs = self.running[stage].pop(shard, (0, None))
        self.finished[stage][shard] = pairs if pairs is not None else self._shard_pairs(shard)
        self._send_sharded(stage)

    def _open(self, stage: str) -> None:
        """On a stage's first report: its total, and the shards finished by an earlier run (a resume)."""
        if stage in self.totals:
            return
        plan = core.load_plan(self.audit_dir)
        with session_scope(self.database_url) as session:
            done = session.scalars(select(Shard.shard).where(Shard.audit_id == self.audit_id, Shard.stage == stage,
                                                             Shard.status == "done")).all()
        self.finished[stage] = {s: self._shard_pairs(s) for s in done}
        self.running[stage] = {}
        self.totals[stage] = (plan.pairs_usable if plan.pairs_usable is not None
                              else sum(self._shard_pairs(s) for s in range(plan.shards)))  # plans made before it

    def _shard_pairs(self, shard: int) -> int:
        return len(core.load_slots(self.audit_dir, shard))

    def _send_sharded(self, stage: str) -> None:
        done = sum(self.finished[stage].values()) + sum(d for d, _ in self.running[stage].values())
        self._send(stage, done, self.totals[stage])

    def _send(self, stage: str, done: int, total: int | None) -> None:
        if self.last.get(stage) == (done, total):
            return
        self.last[stage] = (done, total)
        self.report(stage, done, total)
