"""The row faults that used to fail a whole audit are rejected rows with a reason."""
from __future__ import annotations

import io
import json
import tarfile

from PIL import Image

from ecif_core.data.images import ImageAccess
from ecif_core.data.sources import Pair, iter_pairs


def test_each_known_row_fault_is_a_rejected_row(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        info = tarfile.TarInfo("0.png")
        info.size = len(buffer.getvalue())
        tar.addfile(info, io.BytesIO(buffer.getvalue()))
    rows = [{"id": "nul-caption", "image": "a.png", "caption": "a\x00b"},
            {"id": "nul\x00id", "image": "a.png", "caption": "fine"},
            {"id": "nul-image", "image": "a\x00.png", "caption": "fine"},
            {"id": "surrogate", "image": "a.png", "caption": "x\ud800"},
            {"id": "missing-member", "image": "s.tar::1.png", "caption": "fine"},
            {"image": "a.png", "caption": "\udfff no id"},
            {"id": "ok", "image": "s.tar::0.png", "caption": "fine"}]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"\xff\xfe not utf-8\n")
    items = list(iter_pairs(path, access=ImageAccess(roots=[tmp_path.resolve()])))
    reasons = {item.id: item.reason for item in items if not isinstance(item, Pair)}
    assert reasons == {"nul-caption": "caption contains a NUL character",
                       "row-2": "id contains a NUL character",
                       "nul-image": "image contains a NUL character",
                       "surrogate": "caption is not valid Unicode (a lone surrogate or undecodable bytes)",
                       "missing-member": "image not found in its shard: 1.png",
                       "row-6": "caption is not valid Unicode (a lone surrogate or undecodable bytes)",
                       "row-8": "not valid UTF-8 (byte 0)"}
    assert [item.id for item in items if isinstance(item, Pair)] == ["ok"]


def test_a_bad_webdataset_sample_is_a_rejected_row_not_a_failed_shard(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    members = {"a.png": buffer.getvalue(), "a.txt": b"fine", "b.png": buffer.getvalue(), "b.txt": b"ok",
               "b.json": b"{not json", "c.png": b"not an image", "c.txt": b"\xff\xfe caption",
               "d.png": buffer.getvalue(), "d.txt": b"list", "d.json": b"[1]"}
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = list(iter_pairs(str(tmp_path / "s.tar"), access=ImageAccess(roots=[tmp_path.resolve()])))
    assert [type(i).__name__ for i in items] == ["Pair", "RejectedRow", "RejectedRow", "RejectedRow"]
    b, c, d = (i.reason for i in items[1:])
    assert b.startswith("sample 'b' unreadable (JSONDecodeError") and "not a JSON object" in d
    assert c.startswith("image cannot be decoded")  # its undecodable caption bytes were replaced, not fatal
