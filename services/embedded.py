"""The in-process mode (`ecif audit`, `ecif demo`, `run_audit` from Python): one audit in this
process through the service's pipeline with an in-process dispatcher, a SQLite database and the
Zarr store inside the audit folder (a folder in a bucket keeps the store and the files; its SQLite
database is then a temporary file of this run). There is no other orchestrator: ecif_core has the
stage functions, services.pipeline runs them, here or on Celery workers.

Each output file has one writer: ranked.csv, rejected.csv and report.html are written here, from
the database the pipeline recorded; timing.json from the dispatcher's wall time per stage."""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Callable

from sqlalchemy import delete, select

from ecif_core.data.folder import AuditFolder
from ecif_core.data.manifest import Manifest, load_manifest
from ecif_core.data.storage import absolute, check_writable, is_remote, location, open_for_write, write_text
from ecif_core.errors import ConfigError, EcifError
from ecif_core.preflight import check_before_audit

from . import repository
from .db.models import Audit
from .db.session import session_scope, upgrade
from .pipeline import LocalDispatcher, Pipeline
from .report import audit_report_html
from .resume import resume_audit
from .stage_progress import StageProgress

Progress = Callable[[str, int, "int | None"], None]  # (stage, done, total): ecif_core.stages.Progress
LOCAL_OWNER = "local"


class AuditFailed(EcifError):
    """The audit ran and stopped with an error (the message is the one recorded in the database)."""


def database_url_for(out: Path) -> str:
    return f"sqlite:///{(out / 'ecif.db').resolve()}"


def run_audit(manifest: Manifest | str | Path, out: str | Path, progress: Progress | None = None) -> Path:
    """Run every stage here; writes OUT/ranked.csv, rejected.csv, report.html, summary.json and timing.json;
    returns ranked.csv.

    `manifest` is a loaded Manifest or its file. `progress(stage, done, total)` is called as work
    advances, in the stage's unit (ecif_core.stages.table: rows read by prepare, pairs of every
    shard for gradients, validation and scores, steps otherwise; total None while unknown). A task
    that fails ends the run with AuditFailed (its message is the recorded error), or with the
    ConfigError itself when the input is wrong (resuming would only repeat it).

    `out` is a folder or an object-store URL (s3://bucket/prefix); it is checked writable before
    anything else. A second run on the same folder resumes: an audit of the same manifest that
    failed or was stopped there resumes through services.resume (finished shards kept, as
    `ecif retry`); otherwise (no database there, as for a bucket, whose database is a temporary
    file, or another manifest) a new audit skips the shards the store's markers say are done.
    """
    out = location(out, "out")
    check_writable(out, "out")
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    check_before_audit(manifest)  # the service's submit checks: a wrong model fails here, in seconds
    with contextlib.ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ecif-db-"))) if is_remote(out) else out
        return _run(manifest, out, database_url_for(home), progress)


def _run(manifest, out: Path, url: str, progress: Progress | None) -> Path:
    upgrade(url)
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(url, dispatcher)
    audit_id = _unfinished_audit(url, manifest, out)
    if audit_id is not None:
        resume_audit(url, audit_id, dispatcher.send)
    else:
        with session_scope(url) as session:
            session.execute(delete(Audit).where(Audit.audit_dir == absolute(out)))  # one audit per folder
            audit_id = repository.create_audit(session, LOCAL_OWNER, manifest, out, audit_dir=out).id
        pipeline.start(audit_id)
    bars = StageProgress(url, audit_id, out, progress) if progress else None
    pipeline.task_progress = bars.task if bars else None
    try:
        dispatcher.drain(pipeline, bars.task_done if bars else None)
    except Exception:
        if _status(url, audit_id) != "failed":
            raise  # not a failure the pipeline recorded (it records every error of a task)
    with session_scope(url) as session:
        audit = session.get(Audit, audit_id)
        if audit.status != "succeeded":
            if isinstance(pipeline.last_failure, ConfigError):
                raise pipeline.last_failure  # the input is wrong: its field and reason, as the manifest's checks
            raise AuditFailed(f"{audit.error or f'audit ended {audit.status}'} (run the same command again to "
                              "resume where it stopped: finished shards are kept)") from pipeline.last_failure
        summary = audit.summary
    folder = AuditFolder(out)
    _write(folder.ranked, repository.results_csv(url, audit_id))
    _write(folder.rejected, repository.rejected_csv(url, audit_id))
    page = audit_report_html(url, audit_id, {"results": folder.ranked.name, "rejected": folder.rejected.name})
    _write(folder.report, [page])
    write_text(folder.summary, json.dumps(summary, indent=1))
    _write_timing(folder, dispatcher.stage_seconds)
    return folder.ranked


def _write_timing(folder: AuditFolder, seconds: dict[str, float]) -> None:
    """timing.json: wall seconds of each stage run by this call (shards summed) and their total; a
    resumed run counts only what it ran. Read by the benchmarks."""
    timing = {**seconds, "total": sum(seconds.values())}
    write_text(folder.timing, json.dumps(timing, indent=1))


def _unfinished_audit(url: str, manifest, out: Path) -> str | None:
    """The folder's audit of this manifest that did not succeed, made resumable; else None.

    One left queued or running was stopped with its process (only this process runs the
    folder's audit): it is recorded as failed first, so it resumes like any failure."""
    with session_scope(url) as session:
        audit = session.scalar(select(Audit).where(Audit.audit_dir == absolute(out)).order_by(Audit.created_at.desc()))
        if audit is None or audit.status == "succeeded" or audit.manifest != json.loads(json.dumps(manifest.to_json())):
            return None
        repository.fail_audit(session, audit, "stopped: the process running it ended before the audit did")
        return audit.id


def _status(url: str, audit_id: str) -> str | None:
    with session_scope(url) as session:
        return session.scalar(select(Audit.status).where(Audit.id == audit_id))


def _write(path: Path, lines) -> None:
    with open_for_write(path, "w", encoding="utf-8", newline="") as handle:
        for chunk in lines:
            handle.write(chunk)
