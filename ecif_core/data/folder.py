"""The audit folder's layout: the only code that knows its file names.

Every stage, the service (report thumbnails, edits, CSV exports) and the CLI reach the files of
an audit through an `AuditFolder`, so moving a file is a change here only. The folder may be a
local path or an object-store URL (`s3://bucket/prefix`, storage.py): its properties are path
objects with the same methods either way.
"""
from __future__ import annotations

from pathlib import Path

from ecif_core.data.storage import location


class AuditFolder:
    """Paths of one audit's files (ARCHITECTURE "Storage"); nothing is created here."""

    def __init__(self, path: str | Path) -> None:
        self.path = location(path, "out")

    @property
    def plan(self) -> Path:
        """What prepare decided (plan.json): written last by prepare, its completion marker."""
        return self.path / "plan.json"

    @property
    def pairs(self) -> Path:
        """Usable pairs in slot order, one JSON line each (shards seek to their offsets)."""
        return self.path / "pairs.jsonl"

    @property
    def rejected(self) -> Path:
        return self.path / "rejected.csv"

    @property
    def store(self) -> str:
        """The Zarr store (gradients, curvature, scores, completion markers)."""
        return str(self.path / "store.zarr")

    @property
    def fetched(self) -> Path:
        """Prepare's copies of http(s) images: later stages never read the network."""
        return self.path / "fetched"

    @property
    def timing(self) -> Path:
        return self.path / "timing.json"

    @property
    def ranked(self) -> Path:
        return self.path / "ranked.csv"

    @property
    def summary(self) -> Path:
        """How many pairs are misaligned and how far to trust the flag (calibration.py; the status API's `summary`)."""
        return self.path / "summary.json"

    @property
    def report(self) -> Path:
        """The HTML report (the embedded mode writes it; the service renders it per request)."""
        return self.path / "report.html"

    @property
    def thumbnails(self) -> Path:
        return self.path / "thumbs"

    def edit(self, edit_id: str) -> Path:
        """The folder of one model edit (edited checkpoint, edit.json, removed ids)."""
        return self.path / "edits" / edit_id
