"""The embedded mode: one audit in this process through the same pipeline as the service,
with a SQLite database and the Zarr store inside the audit folder (a folder in a bucket keeps
the store and the files; its SQLite database is then a temporary file of this run)."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable

from sqlalchemy import delete, select

from ecif_core.folder import AuditFolder
from ecif_core.storage import absolute, check_writable, is_remote, location, open_for_write
from ecif_core.errors import EcifError
from ecif_core.manifest import load_manifest

from . import repository
from .db.models import SHARDED, Audit, Shard
from .db.session import session_scope, upgrade
from .pipeline import LocalDispatcher, Pipeline
from .report import audit_report_html

Progress = Callable[[str, int, int], None]
LOCAL_OWNER = "local"


class AuditFailed(EcifError):
    """The audit ran and stopped with an error (the message is the one recorded in the database)."""


def database_url_for(out: Path) -> str:
    return f"sqlite:///{(out / 'ecif.db').resolve()}"


def run_embedded(manifest_path: str | Path, out: str | Path, progress: Progress | None = None) -> Path:
    """Run every stage here; writes OUT/ranked.csv and OUT/rejected.csv from the database.

    `out` is a folder or an object-store URL (s3://bucket/prefix); it is checked writable before
    anything else. A second run on the same folder resumes: finished shards are skipped by the
    store's markers (they live with the store, also in a bucket).
    """
    out = location(out, "out")
    check_writable(out, "out")
    manifest = load_manifest(manifest_path)
    with contextlib.ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ecif-db-"))) if is_remote(out) else out
        return _run(manifest, out, database_url_for(home), progress)


def _run(manifest, out: Path, url: str, progress: Progress | None) -> Path:
    upgrade(url)
    with session_scope(url) as session:
        session.execute(delete(Audit).where(Audit.audit_dir == absolute(out)))  # one audit per folder
        audit_id = repository.create_audit(session, LOCAL_OWNER, manifest, out, audit_dir=out).id
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(url, dispatcher)
    pipeline.start(audit_id)
    dispatcher.drain(pipeline, _reporter(url, progress) if progress else None)
    with session_scope(url) as session:
        audit = session.get(Audit, audit_id)
        if audit.status != "succeeded":
            raise AuditFailed(audit.error or f"audit ended {audit.status}")
    folder = AuditFolder(out)
    _write(folder.ranked, repository.results_csv(url, audit_id))
    _write(folder.rejected, repository.rejected_csv(url, audit_id))
    page = audit_report_html(url, audit_id, {"results": folder.ranked.name, "rejected": folder.rejected.name})
    _write(folder.report, [page])
    return folder.ranked


def _reporter(url: str, progress: Progress) -> Callable[[str, str, int | None], None]:
    def after(stage: str, audit_id: str, shard: int | None) -> None:
        if stage not in SHARDED:
            progress(stage, 1, 1)
            return
        with session_scope(url) as session:
            statuses = session.scalars(select(Shard.status).where(Shard.audit_id == audit_id,
                                                                  Shard.stage == stage)).all()
        progress(stage, sum(s == "done" for s in statuses), len(statuses))
    return after


def _write(path: Path, lines) -> None:
    with open_for_write(path, "w", encoding="utf-8", newline="") as handle:
        for chunk in lines:
            handle.write(chunk)
