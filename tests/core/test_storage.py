"""storage.py and the store's caching, on a local disk (the bucket side is in
tests/services/test_object_store.py, against a real S3 server)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ecif_core.errors import ConfigError
from ecif_core.data.storage import (is_remote, location, open_for_write, read_text, resolve_against, write_text)
from ecif_core.data.store import AuditStore


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "plan.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with open_for_write(target, "w") as handle:
            handle.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert read_text(target) == "old"
    assert [p.name for p in target.parent.iterdir()] == ["plan.json"]  # no temporary file left


def test_locations_paths_urls_and_unknown_schemes() -> None:
    assert location("rel/dir") == Path("rel/dir") and location("file:///tmp/x") == Path("/tmp/x")
    url = location("memory://bucket/a/../b/")
    assert is_remote(url) and str(url) == "memory://bucket/b"
    with pytest.raises(ConfigError, match="out: nosuch://x: the scheme nosuch:// is not served here"):
        location("nosuch://x", "out")
    with pytest.raises(ConfigError, match="http"):
        location("https://example.org/store", "out")
    assert resolve_against("s3://b/root", "d/../train.jsonl") == "s3://b/root/train.jsonl"
    assert resolve_against("/data", "s3://b/x/../y") == "s3://b/y"
    assert resolve_against(Path("/data/m"), "t.jsonl") == "/data/m/t.jsonl"


def test_completion_is_read_afresh_while_arrays_are_opened_once(tmp_path: Path) -> None:
    """A stage's instance keeps its opened arrays, but never a stale completion marker: another
    process completing the array must be seen (else a scoring task would wait forever)."""
    url = str(tmp_path / "store.zarr")
    AuditStore(url).create(rows=8, dim=2, shard_rows=4, shards=2, attrs={})
    watcher, writer = AuditStore(url), AuditStore(url)
    assert not watcher.curvature_complete()
    writer.write_curvature(np.ones(2), np.eye(2), {"kind": "full"})
    assert watcher.curvature_complete()
    assert watcher.gradient_fields() == ["pos", "neg", "clip"] and watcher.score_column("nothing") is None
    writer.mark_done("gradients", 1)
    assert watcher.is_done("gradients", 1) and watcher.done_count("gradients") == 1  # data is never cached
