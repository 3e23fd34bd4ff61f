"""Every row-level fault is a rejected row with a reason, never a failed audit: generated rows
(random bytes and Unicode, NUL, lone surrogates, missing and malformed tar members, files that
are not images, paths out of the roots) are each either scored or rejected, every value that
reaches the database is one Postgres stores, and an audit over all of them succeeds."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, select
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session

from ecif_core.data.images import ImageAccess
from ecif_core.data.sources import Pair as UsablePair, iter_pairs
from ecif_core.data.manifest import load_manifest
from services import repository
from services.db.models import Audit, PairRow, Score
from services.db.session import get_engine, session_scope
from services.pipeline import LocalDispatcher, Pipeline, error_text

EXAMPLES = 100
ODD = ["\x00", "\ud800", "\udfff", "\ud83d", "\u202e", "\ufeff", "\n", "\r", "\t", "\x7f", "\U0001f4a5", "\\", '"',
       "::", "../", "%00", "\u0085", "\u2028"]


def _text() -> st.SearchStrategy[str]:
    pieces = st.one_of(st.text(alphabet=st.characters(exclude_categories=()), max_size=6), st.sampled_from(ODD))
    return st.lists(pieces, max_size=5).map("".join)


def _value(*specific: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(*specific, _text(), st.integers(), st.none(), st.lists(st.integers(), max_size=2),
                     st.floats(allow_nan=True))


IMAGES = _value(st.sampled_from(["images/{good}", "images/{good}", "shard.tar::0.png", "shard.tar::bad.png",
                                 "shard.tar::", "shard.tar", "../cfg.json", "/etc/passwd", "../../../../etc/hostname",
                                 "file:///etc/hostname", "http://example.org/x.png", "outside/secret.tar::000.png",
                                 "images"]),
                st.builds(lambda m: f"shard.tar::{m}", _text()))
CAPTIONS = _value(st.just("an image of the digit three"), st.just(" "), st.just("x" * 2001))


@st.composite
def lines(draw) -> list[bytes]:
    """JSONL lines: rows of generated values (json.dumps escapes lone surrogates as \\udXXX,
    which decode back to them), or raw bytes (invalid UTF-8, broken JSON, non-objects)."""
    out = []
    for i in range(draw(st.integers(1, 8))):
        if draw(st.integers(0, 4)) == 0:
            # anything, also "{}" twice: two identical id-less objects are a duplicate (a rejected row)
            out.append(draw(st.binary(max_size=40)).replace(b"\n", b"") + b"\n")
            continue
        # a third of the rows have a good image, so generated captions and ids get scored too
        row = {"image": "images/{good}" if draw(st.integers(0, 2)) == 0 else draw(IMAGES), "caption": draw(CAPTIONS)}
        kind = draw(st.integers(0, 4))
        if kind == 0:
            row["id"] = f"r{{uid}}-{draw(_text())}"  # a unique prefix (filled in later)
        elif kind == 1:
            row["id"] = 987654321  # a number id, made unique later
        elif kind == 2 and isinstance(row["caption"], str):
            row["caption"] = f"{row['caption']} {{uid}}"  # no id: a stable hash of image and caption, unique
        elif kind == 3:
            row["id"] = "the-same-id"  # a later row with it is a duplicate (a rejected row)
        else:
            row["id"] = "r{uid}"
        out.append(json.dumps(row).encode() + b"\n")
    return out


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def root(data_root, tmp_path) -> Path:
    """A data root with the digits, a shard (one image, one non-image member), and the model
    without its training sidecar (the fuzzed rows are not the trained ids)."""
    copy = (tmp_path / "root").resolve()
    copy.mkdir()
    shutil.copytree(data_root / "digits", copy / "digits")
    shutil.copy(data_root / "cfg.json", copy / "cfg.json")
    shutil.copy(data_root / "model.pt", copy / "model.pt")
    with tarfile.open(copy / "digits" / "shard.tar", "w") as tar:
        for name, data in (("0.png", _png()), ("bad.png", b"not an image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return copy


def _counted(line: bytes) -> bool:
    try:
        return bool(line.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True


def _rows_in(lines: list[bytes]) -> int:
    """Rows of a file of these lines: a byte-order mark opening the file is not content (the
    reader drops it, as files saved by Excel start with one), so a first line of only a BOM is blank."""
    return sum(_counted(line) for line in [lines[0].removeprefix(b"\xef\xbb\xbf"), *lines[1:]]) if lines else 0


def _db_rows(audit_id: str, items) -> list[dict]:
    """The rows prepare stores (services.pipeline._pair_rows), usable and rejected."""
    out = []
    for slot, item in enumerate(items):
        if isinstance(item, UsablePair):
            out.append({"audit_id": audit_id, "pair_id": item.id, "slot": slot, "image": item.image,
                        "caption": item.caption})
        else:
            out.append({"audit_id": audit_id, "pair_id": item.id, "row": item.row, "reason": item.reason})
    return out


def test_every_generated_row_is_scored_or_rejected_and_the_audit_succeeds(pg_url, root, tmp_path):
    digits = root / "digits"
    good = [json.loads(line) for line in (digits / "train.jsonl").read_text().splitlines()][:24]
    first_image = good[0]["image"].split("/", 1)[1]
    with session_scope(pg_url) as session:  # an audit the probe rows can belong to (rolled back)
        probe = repository.create_audit(session, "fuzz", load_manifest(_manifest(root, "digits/train.jsonl")),
                                        tmp_path / "probe").id
    generated: list[bytes] = []
    engine = get_engine(pg_url)
    counter = iter(range(10**9))

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(lines())
    def each_row_is_scored_or_rejected(batch: list[bytes]) -> None:
        batch = [line.replace(b"{good}", first_image.encode()).replace(b"{uid}", b"u%d" % next(counter))
                 .replace(b"987654321", b"%d" % (10**9 + next(counter)))
                 for line in batch]
        path = digits / "probe.jsonl"
        path.write_bytes(b"".join(batch))
        items = list(iter_pairs(path, access=ImageAccess(roots=[root])))
        assert len(items) == _rows_in(batch)
        for item in items:
            assert isinstance(item, UsablePair) or item.reason
        with Session(engine) as session:  # everything prepare would store, stored for real
            if items:
                session.execute(insert(PairRow), _db_rows(probe, items))
            session.flush()
            session.rollback()
        generated.extend(batch)

    each_row_is_scored_or_rejected()
    # One audit over every generated row (and good rows, so batches exist): it succeeds.
    train = digits / "fuzz.jsonl"
    train.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in good) + b"".join(generated))
    with session_scope(pg_url) as session:
        audit_id = repository.create_audit(session, "fuzz", load_manifest(_manifest(root, "digits/fuzz.jsonl")),
                                           tmp_path / "store").id
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(pg_url, dispatcher, image_roots=[root])
    pipeline.start(audit_id)
    dispatcher.drain(pipeline)
    with session_scope(pg_url) as session:
        audit = session.get(Audit, audit_id)
        assert (audit.status, audit.error) == ("succeeded", None)
        reasons = session.scalars(select(PairRow.reason).where(PairRow.audit_id == audit_id, PairRow.reason.is_not(None))).all()
        scored = session.scalar(select(func.count()).select_from(Score).where(Score.audit_id == audit_id))
    assert scored >= 2 and scored + len(reasons) == len(good) + sum(_counted(line) for line in generated)
    assert any("NUL" in r for r in reasons) and any("not valid Unicode" in r or "UTF-8" in r for r in reasons)
    assert any(r.startswith("duplicate of row ") for r in reasons)  # "the-same-id" again, never a file error
    print(f"\n{len(generated)} generated rows in {EXAMPLES} examples; {len(reasons)} rejected, "
          f"{scored} scored; audit {audit.status}")


def _manifest(root: Path, train: str) -> Path:
    path = root / f"manifest-{Path(train).stem}.json"
    path.write_text(json.dumps({"model": {"config": "cfg.json", "checkpoint": "model.pt"}, "train": train,
                                "options": {"batch_size": 4, "seed": 0, "shard_batches": 4,
                                            "projection": {"k_in": 2, "k_out": 2}}}))
    return path


def test_a_database_error_is_reported_without_its_statement_or_row_data(pg_url):
    secret = "caption-with-\x00-nul"
    with pytest.raises(DataError) as caught, Session(get_engine(pg_url)) as session:
        session.execute(insert(Audit), [{"id": "x", "owner": secret, "manifest": {}, "audit_dir": "/"}])
    text = error_text(caught.value)
    assert text.startswith("database error DataError: ") and "INSERT" not in text and "caption-with" not in text
    assert "\x00" not in error_text(ValueError("a\x00b\ud800"))
