"""Data-root confinement where files are opened: tar members resolve against the pair file,
and a file swapped for a symlink after it was checked is refused when it is opened."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from ecif_core.confine import OutsideRoots, confined
from ecif_core.images import ImageAccess, image_bytes, load_batch
from ecif_core.sources import Pair, iter_pairs
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
