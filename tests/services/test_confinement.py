"""Confinement where the workers open files: a pair file, an image or a checkpoint swapped
for a symlink out of the data roots after the API checked the manifest is refused when the
worker opens it (the audit fails naming it), and nothing of the outside file reaches the
database."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from services import repository
from services.db.models import Audit, PairRow
from services.db.session import session_scope
from services.manifests import confined_manifest
from services.pipeline import LocalDispatcher, Pipeline
from tests.services.conftest import OPTIONS, manifest_json


@pytest.fixture()
def root(data_root, tmp_path) -> Path:
    """A data root of this test's own (a copy): files in it are swapped for symlinks."""
    copy = (tmp_path / "root").resolve()
    shutil.copytree(data_root, copy, ignore=shutil.ignore_patterns("*manifest*.json"))
    return copy


def _submit(url: str, root: Path, tmp_path: Path) -> str:
    """What POST /audits does: the manifest checked against the roots, the audit stored."""
    manifest = confined_manifest(manifest_json(OPTIONS), [root])
    with session_scope(url) as session:
        return repository.create_audit(session, "alice", manifest, tmp_path / "store").id


def _swap_for_link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def _audit(url: str, audit_id: str) -> Audit:
    with session_scope(url) as session:
        audit = session.get(Audit, audit_id)
        session.expunge(audit)
        return audit


def test_a_pair_file_swapped_for_a_link_out_of_the_roots_before_prepare(pg_url, root, tmp_path):
    audit_id = _submit(pg_url, root, tmp_path)
    secret = tmp_path / "secret.jsonl"
    rows = [json.loads(line) for line in (root / "digits" / "train.jsonl").read_text().splitlines()]
    secret.write_text("".join(json.dumps({**r, "caption": "SECRET " + r["caption"]}) + "\n" for r in rows))
    shutil.copytree(root / "digits" / "images", tmp_path / "images")  # the outside file's images resolve
    _swap_for_link(root / "digits" / "train.jsonl", secret)
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(pg_url, dispatcher, image_roots=[root])
    pipeline.start(audit_id)
    dispatcher.drain(pipeline)
    audit = _audit(pg_url, audit_id)
    assert audit.status == "failed" and "train" in audit.error and "outside the data roots" in audit.error
    with session_scope(pg_url) as session:
        assert session.scalar(select(func.count()).select_from(PairRow).where(PairRow.audit_id == audit_id)) == 0


def test_an_image_swapped_for_a_link_between_prepare_and_gradients(pg_url, root, tmp_path):
    audit_id = _submit(pg_url, root, tmp_path)
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(pg_url, dispatcher, image_roots=[root])
    pipeline.run("prepare", audit_id)
    with session_scope(pg_url) as session:
        image = Path(session.scalar(select(PairRow.image).where(PairRow.audit_id == audit_id, PairRow.slot == 0)))
    outside = tmp_path / "outside.png"
    shutil.copy(image, outside)
    _swap_for_link(image, outside)
    dispatcher.drain(pipeline)
    audit = _audit(pg_url, audit_id)
    assert audit.status == "failed" and audit.stage == "gradients"
    assert f"image {image} is outside the data roots now" in audit.error


def test_a_checkpoint_swapped_for_a_link_before_the_worker_loads_it(pg_url, root, tmp_path):
    audit_id = _submit(pg_url, root, tmp_path)
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(pg_url, dispatcher, image_roots=[root])
    pipeline.run("prepare", audit_id)
    shutil.copy(root / "model.pt", tmp_path / "model.pt")
    _swap_for_link(root / "model.pt", tmp_path / "model.pt")
    dispatcher.drain(pipeline)
    audit = _audit(pg_url, audit_id)
    assert audit.status == "failed" and "model.checkpoint" in audit.error and "outside the data roots" in audit.error


def test_a_pair_file_swapped_for_a_hard_link_before_prepare(pg_url, root, tmp_path):
    """A hard link has no real path elsewhere: the worker refuses the file it opened, by its link count."""
    import os

    audit_id = _submit(pg_url, root, tmp_path)
    rows = [json.loads(line) for line in (root / "digits" / "train.jsonl").read_text().splitlines()]
    secret = tmp_path / "secret.jsonl"
    secret.write_text("".join(json.dumps({**r, "caption": "SECRET " + r["caption"]}) + "\n" for r in rows))
    (root / "digits" / "train.jsonl").unlink()
    os.link(secret, root / "digits" / "train.jsonl")
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(pg_url, dispatcher, image_roots=[root])
    pipeline.start(audit_id)
    dispatcher.drain(pipeline)
    audit = _audit(pg_url, audit_id)
    assert audit.status == "failed" and audit.error.startswith("prepare: train: ")
    assert "is a hard link (2 names" in audit.error and "ECIF_ALLOW_HARD_LINKS=true" in audit.error
    with session_scope(pg_url) as session:
        assert session.scalar(select(func.count()).select_from(PairRow).where(PairRow.audit_id == audit_id)) == 0
