"""Data-root confinement where files are opened: tar members resolve against the pair file,
a file swapped for a symlink after it was checked is refused when it is opened, and a hard
link (a second name of a file that may lie outside the roots) is refused as opened unless the
roots allow hard links."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from ecif_core.data.confine import HardLinked, OutsideRoots, confined, data_roots
from ecif_core.data.images import ImageAccess, image_bytes, load_batch
from ecif_core.data.sources import Pair, iter_pairs
from ecif_core.errors import EcifError


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _pairs_file(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def layout(tmp_path, monkeypatch):
    """root/sub/train.jsonl inside the data root; the working directory is outside it and holds
    an `outside/secret.tar` of its own (what the relative member was opened as before), whose
    member is not an image: a row whose check read it would be rejected."""
    root, cwd = (tmp_path / "root").resolve(), (tmp_path / "cwd").resolve()
    _shard(cwd / "outside" / "secret.tar", {"000.png": b"secret bytes outside the roots"})
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    return root, cwd


def _read(path: Path, roots: list[Path]) -> list:
    return list(iter_pairs(path, access=ImageAccess(roots=roots)))


def test_a_relative_tar_member_without_its_shard_next_to_the_pair_file_is_not_found(layout):
    root, cwd = layout
    pairs_path = _pairs_file(root / "sub", [{"id": "a", "image": "outside/secret.tar::000.png", "caption": "x"}])
    [item] = _read(pairs_path, [root])
    assert not isinstance(item, Pair) and item.reason.startswith("image not found")


def test_a_relative_tar_member_is_read_from_next_to_the_pair_file_not_the_working_directory(layout):
    """The escape: `outside/secret.tar::000.png` was checked at root/sub/outside/secret.tar (inside
    the roots) and opened as ./outside/secret.tar (outside them): the row was judged by the
    outside file's bytes (here: rejected as undecodable), and without that file the whole
    audit failed with FileNotFoundError. Now it is the shard next to the pair file, or nothing."""
    root, cwd = layout
    _shard(root / "sub" / "outside" / "secret.tar", {"000.png": _png((0, 0, 255))})
    pairs_path = _pairs_file(root / "sub", [{"id": "a", "image": "outside/secret.tar::000.png", "caption": "x"},
                                            {"id": "b", "image": "outside/secret.tar::999.png", "caption": "y"}])
    first, missing = _read(pairs_path, [root])
    assert isinstance(first, Pair)
    assert first.image == f"{root / 'sub' / 'outside' / 'secret.tar'}::000.png"
    assert Image.open(io.BytesIO(image_bytes(first.image, [root]))).getpixel((0, 0)) == (0, 0, 255)
    assert missing.reason == "image not found in its shard: 999.png"  # a missing member is a row's fault


def test_a_pair_file_that_is_a_symlink_out_of_the_roots_is_refused_when_opened(layout, tmp_path):
    root, _ = layout
    secret = _pairs_file(tmp_path / "elsewhere", [{"id": "s", "image": "a.png", "caption": "secret caption"}])
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "train.jsonl").symlink_to(secret)
    with pytest.raises(OutsideRoots, match="outside the data roots"):
        _read(root / "sub" / "train.jsonl", [root])


def test_an_image_swapped_for_a_symlink_after_the_check_is_refused_at_load(layout, tmp_path):
    root, _ = layout
    image = root / "img.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(_png((0, 255, 0)))
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png((255, 0, 0)))
    pairs = [Pair("a", str(image), "x"), Pair("b", str(image), "y")]
    to_tensor = lambda img: torch.zeros(3, 4, 4)  # noqa: E731
    load_batch(pairs, to_tensor, lambda texts: torch.zeros(len(texts), 2), roots=[root])
    image.unlink()
    image.symlink_to(outside)  # the swap: same name, now pointing out of the root
    with pytest.raises(EcifError, match="outside the data roots now"):
        load_batch(pairs, to_tensor, lambda texts: torch.zeros(len(texts), 2), roots=[root])
    with pytest.raises(OutsideRoots):
        image_bytes(str(image), [root])


def test_confined_refuses_unusable_names_and_allows_anything_without_roots(tmp_path):
    with pytest.raises(OutsideRoots, match="not a usable file name"):
        confined("a\x00b", [tmp_path], "image")
    assert confined(tmp_path / "x" / ".." / "y", None, "image") == (tmp_path / "y").resolve()


def _linked_from_outside(outside: Path, inside: Path, data: bytes) -> Path:
    """`inside` as a second name (a hard link) of a file outside the data root."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    inside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_bytes(data)
    os.link(outside, inside)
    return inside


def test_a_hard_linked_image_is_a_rejected_row_naming_the_setting_and_the_others_are_read(layout, tmp_path):
    root, _ = layout
    _linked_from_outside(tmp_path / "elsewhere" / "secret.png", root / "sub" / "linked.png", _png((255, 0, 0)))
    _linked_from_outside(tmp_path / "elsewhere" / "secret.tar", root / "sub" / "linked.tar",
                         (_shard(tmp_path / "s.tar", {"0.png": _png((0, 0, 255))})).read_bytes())
    (root / "sub" / "own.png").write_bytes(_png((0, 255, 0)))
    pairs_path = _pairs_file(root / "sub", [{"id": "a", "image": "linked.png", "caption": "x"},
                                            {"id": "b", "image": "own.png", "caption": "y"},
                                            {"id": "c", "image": "linked.tar::0.png", "caption": "z"}])
    linked, own, member = _read(pairs_path, [root])
    assert isinstance(own, Pair)
    for row in (linked, member):
        assert not isinstance(row, Pair)
        assert row.reason.startswith("image is a hard link (2 names")
        assert "ECIF_ALLOW_HARD_LINKS=true" in row.reason and "cp -al" in row.reason
    # allowed by the roots' setting, or no roots at all (nothing is confined): every row is read
    for roots in (data_roots([root], allow_hard_links=True), None):
        assert all(isinstance(item, Pair) for item in list(iter_pairs(pairs_path, access=ImageAccess(roots=roots))))


@pytest.mark.parametrize("name", ["train.jsonl", "train.csv", "train.parquet", "shard.tar"])
def test_a_hard_linked_pair_file_is_refused_when_opened_naming_the_field(layout, tmp_path, name):
    root, _ = layout
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "own.png").write_bytes(_png((0, 255, 0)))
    rows = [{"id": "a", "image": "own.png", "caption": "x"}, {"id": "b", "image": "own.png", "caption": "y"}]
    made = tmp_path / "made" / name
    made.parent.mkdir()
    if name.endswith(".jsonl"):
        made.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".csv"):
        made.write_text("id,image,caption\n" + "".join(f"{r['id']},{r['image']},{r['caption']}\n" for r in rows))
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), made)
    else:
        _shard(made, {"a.png": _png((0, 255, 0)), "a.txt": b"x", "b.png": _png((0, 0, 255)), "b.txt": b"y"})
    linked = _linked_from_outside(tmp_path / "elsewhere" / name, root / "sub" / name, made.read_bytes())
    with pytest.raises(HardLinked, match=r"is a hard link \(2 names.*ECIF_ALLOW_HARD_LINKS=true.*cp -al") as error:
        list(iter_pairs(str(linked), field="validation", access=ImageAccess(roots=[root])))
    assert error.value.field == "validation"
    for roots in (data_roots([root], allow_hard_links=True), None):
        assert [p.id for p in iter_pairs(str(linked), access=ImageAccess(roots=roots))] == ["a", "b"]


def test_an_image_swapped_for_a_hard_link_after_prepare_is_refused_at_load(layout, tmp_path):
    root, _ = layout
    image = root / "img.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(_png((0, 255, 0)))
    pairs = [Pair("a", str(image), "x"), Pair("b", str(image), "y")]
    to_tensor = lambda img: torch.zeros(3, 4, 4)  # noqa: E731
    load_batch(pairs, to_tensor, lambda texts: torch.zeros(len(texts), 2), roots=[root])
    image.unlink()
    _linked_from_outside(tmp_path / "secret.png", image, _png((255, 0, 0)))  # the swap: same name, a second one
    with pytest.raises(EcifError, match="is a hard link now"):
        load_batch(pairs, to_tensor, lambda texts: torch.zeros(len(texts), 2), roots=[root])
    with pytest.raises(HardLinked):
        image_bytes(str(image), [root])


def test_a_folder_swapped_for_a_symlink_while_a_file_is_opened_is_refused(tmp_path, monkeypatch):
    """`confined` resolves the path, then the file is opened: a folder on the way replaced by a link out
    of the roots in between is followed by the kernel, so the opened file itself says where it is."""
    import ecif_core.data.confine as confine

    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "pairs.jsonl").write_text('{"image": "x.png", "caption": "secret"}\n')
    root.mkdir()
    (root / "sub").symlink_to(outside / "sub")  # the state after the swap
    roots = data_roots([root])
    # the state at check time: sub was a real folder, so the real path was the one under the root
    monkeypatch.setattr(confine, "confined", lambda path, _roots, _field: Path(path))
    with pytest.raises(OutsideRoots, match="replaced while it was being opened"):
        confine.open_confined(root / "sub" / "pairs.jsonl", roots, "train")
    with confine.open_confined(root / "sub" / "pairs.jsonl", None, "train") as handle:  # no roots: not confined
        assert b"secret" in handle.read()


def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(tmp_path):
    """A FIFO never blocks a worker in open(): the file must be a regular file."""
    import ecif_core.data.confine as confine

    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pairs.jsonl")
    with pytest.raises(OutsideRoots, match="not a regular file"):
        confine.open_confined(root / "pairs.jsonl", data_roots([root]), "train")
