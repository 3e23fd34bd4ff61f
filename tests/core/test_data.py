"""Pair files: bad rows become reasons, ids survive as written, errors name the field."""
import io
import json

import pytest
from PIL import Image

from ecif_core.data.sources import read_pairs
from ecif_core.errors import ConfigError


def _png(path, size=8):
    Image.new("RGB", (size, size), (120, 30, 200)).save(path)


def test_truncated_image_is_rejected_not_fatal(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _png(tmp_path / "ok.png")
    rows = [{"id": "cut", "image": "cut.jpg", "caption": "a"}, {"id": "ok", "image": "ok.png", "caption": "b"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs, rejected, ids = read_pairs(tmp_path / "p.jsonl")
    assert [p.id for p in pairs] == ["ok"] and ids == ["cut", "ok"]
    assert rejected[0].id == "cut" and rejected[0].reason.startswith("image cannot be decoded")


def test_ids_are_kept_as_written_and_malformed_lines_do_not_collide(tmp_path):
    _png(tmp_path / "a.png")
    lines = [json.dumps({"id": 0, "image": "a.png", "caption": "zero"}), "{broken", "{also broken", "[1, 2]"]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    pairs, rejected, ids = read_pairs(tmp_path / "p.jsonl")
    assert ids == ["0"] and pairs[0].id == "0"
    assert [r.id for r in rejected] == ["row-2", "row-3", "row-4"]
    assert rejected[2].reason == "row is not a JSON object"


def test_a_jsonl_row_keeps_its_id_when_the_first_row_has_none(tmp_path):
    """Each JSONL line is an object of its own: an id-less first row (a stable hash) does not
    take the ids of the rows after it (two of which would then hash alike: a duplicate)."""
    _png(tmp_path / "a.png")
    rows = [{"image": "a.png", "caption": "no id"}, {"id": "x", "image": "a.png", "caption": "same"},
            {"id": "y", "image": "a.png", "caption": "same"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs, rejected, ids = read_pairs(tmp_path / "p.jsonl")
    assert ids[1:] == ["x", "y"] and ids[0].startswith("sha1-") and not rejected


def test_csv_from_excel_with_byte_order_mark_keeps_ids(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "p.csv").write_bytes("\ufeffid,image,caption,extra\nmy-id,a.png,a caption é,x\n".encode("utf-8"))
    pairs, rejected, _ = read_pairs(tmp_path / "p.csv")
    assert pairs[0].id == "my-id" and pairs[0].caption == "a caption é" and not rejected


def test_missing_csv_column_and_missing_file_name_the_field(tmp_path):
    (tmp_path / "p.csv").write_text("id,image\nx,a.png\n")
    with pytest.raises(ConfigError, match="no caption column") as error:
        read_pairs(tmp_path / "p.csv")
    assert error.value.field == "train"
    with pytest.raises(ConfigError) as error:
        read_pairs(tmp_path / "nope.jsonl", field="validation")
    assert error.value.field == "validation"


def test_images_are_loaded_upright_and_as_rgb_whatever_their_mode(tmp_path):
    """EXIF orientation applied; alpha composited on white; palette, grayscale and CMYK to RGB."""
    from PIL import Image

    from ecif_core.data.images import load_image

    wide = Image.new("RGB", (4, 2), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    wide.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_image(str(tmp_path / "rotated.jpg")).size == (2, 4)
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    assert load_image(str(tmp_path / "clear.png")).getpixel((0, 0)) == (255, 255, 255)
    for mode in ("P", "L", "CMYK", "LA"):
        suffix = "jpg" if mode == "CMYK" else "png"
        Image.new(mode, (3, 3)).save(tmp_path / f"{mode}.{suffix}")
        image = load_image(str(tmp_path / f"{mode}.{suffix}"))
        assert image.mode == "RGB" and image.size == (3, 3), mode


def test_an_image_file_over_the_byte_limit_is_rejected_unopened(tmp_path, monkeypatch):
    from PIL import Image

    from ecif_core.data import images

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text('{"id": "a", "image": "a.png", "caption": "x"}\n')
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 10)
    _, rejected, _ = read_pairs(tmp_path / "p.jsonl")
    assert rejected[0].reason.startswith("image file too large (") and rejected[0].reason.endswith("limit 10)")


def test_brace_patterns_are_counted_as_braceexpand_expands_them():
    import random

    from braceexpand import braceexpand

    from ecif_core.data.shards import check_shard_count, count_expansions

    cases = ["x{00..09}.tar", "{a,b}{1..3}", "{a,{b,c}}d", "{a{1,2}}", "{}", "{1..10..3}", "{z..a..2}", "{a..Z}",
             "\\{a,b\\}", "{a,b\\,c}", "{-3..3}", "{,}", "a{b,c{d,e}f}g", "{3..1..2}", "{007..9}"]
    rng = random.Random(0)
    cases += ["".join(rng.choice("{},.1a2z") for _ in range(rng.randint(1, 10))) for _ in range(3000)]
    for case in cases:
        try:
            expected = len(list(braceexpand(case)))
        except Exception:  # noqa: BLE001 - unbalanced: refused by check_shard_count below
            with pytest.raises(ConfigError, match="unbalanced"):
                check_shard_count([case], "train")
            continue
        assert count_expansions(case) >= expected, case  # never under: the limit holds
        if "}{" not in case.replace("{}", ""):
            assert count_expansions(case) == expected, case
    with pytest.raises(ConfigError, match="limit 100000"):
        check_shard_count(["d/x{1..100000000000000}.tar"], "train")
