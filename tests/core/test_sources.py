"""Pair sources: JSONL, CSV (open_clip's convention too) and Parquet (img2dataset / DataComp
columns) give the same audit; column choices and errors name the field."""
import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecif_core.data.formats import source_of
from ecif_core.data.sources import read_pairs
from ecif_core.errors import ConfigError
from services.embedded import run_audit
from tests.core.test_audit import OPTIONS, _write_manifest, finished, workspace  # noqa: F401  (fixtures)


def _rows(workspace: Path) -> list[dict]:
    return [json.loads(line) for line in (workspace / "data" / "train.jsonl").read_text().splitlines()]


def _write_openclip_tsv(workspace: Path) -> Path:
    path = workspace / "data" / "train.tsv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["key", "filepath", "title"])
        writer.writerows([(r["id"], r["image"], r["caption"]) for r in _rows(workspace)])
    return path


def _write_datacomp_parquet(workspace: Path, row_group_size: int = 10) -> Path:
    rows = _rows(workspace)
    table = pa.table({"uid": [r["id"] for r in rows], "filepath": [r["image"] for r in rows],
                      "text": [r["caption"] for r in rows], "extra": list(range(len(rows)))})
    path = workspace / "data" / "train.parquet"
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_jsonl_tsv_and_parquet_sources_give_the_same_audit(workspace, finished, tmp_path):
    _write_openclip_tsv(workspace)
    _write_datacomp_parquet(workspace)
    expected = (finished / "ranked.csv").read_text()
    sources = {"tsv": {"path": "data/train.tsv", "format": "csv", "separator": "\t", "image_key": "filepath",
                       "caption_key": "title", "id_key": "key"},
               "parquet": "data/train.parquet"}  # img2dataset/DataComp column names are found by themselves
    for name, source in sources.items():
        manifest = _write_manifest(workspace, f"manifest-{name}.json", OPTIONS, train=source)
        ranked = run_audit(manifest, tmp_path / name)
        assert ranked.read_text() == expected, name


def test_parquet_is_read_by_row_group_with_only_the_needed_columns(workspace):
    path = _write_datacomp_parquet(workspace, row_group_size=7)
    assert pq.ParquetFile(path).num_row_groups > 5
    pairs, rejected, ids = read_pairs(path)
    assert [p.id for p in pairs] == [r["id"] for r in _rows(workspace)] and not rejected


@pytest.mark.parametrize("spec, field, message", [
    ({"path": "x.parquet", "colour": 1}, "train.colour", "unknown source field"),
    ({"path": "x.txt"}, "train", "unsupported pair file type"),
    ({"path": "x.csv", "format": "xml"}, "train.format", "unsupported"),
    ({"path": "x.csv", "image_key": ""}, "train.image_key", "non-empty"),
])
def test_bad_source_objects_name_the_field(spec, field, message):
    with pytest.raises(ConfigError, match=message) as error:
        source_of(spec)
    assert error.value.field == field


def test_a_column_that_is_not_there_names_the_key(workspace):
    path = _write_datacomp_parquet(workspace)
    with pytest.raises(ConfigError, match="no column 'url'") as error:
        read_pairs({"path": str(path), "image_key": "url"})
    assert error.value.field == "train.image_key"


@pytest.mark.slow
def test_validating_a_million_parquet_rows_stays_under_one_gib(tmp_path):
    from bench.validate_memory import measure

    result = measure(1_000_000, tmp_path)
    print(result)
    assert result["rows"] == result["usable"] == 1_000_000
    assert result["peak_rss_mib"] < 1024


def test_validate_counts_rows_and_reasons_and_rejects_later_duplicate_ids(tmp_path):
    from ecif_core.data.sources import validate_source

    (tmp_path / "p.jsonl").write_text('{"id": "a", "image": "x.png", "caption": "one"}\n'
                                      '{"id": "b", "image": "x.png", "caption": ""}\n{oops\n')
    summary = validate_source(tmp_path / "p.jsonl")
    assert (summary.rows, summary.usable, summary.rejected) == (3, 1, 2)
    assert summary.reasons == {"caption is empty or not text": 1, "invalid JSON": 1}
    (tmp_path / "d.jsonl").write_text('{"id": "a", "image": "x.png", "caption": "one"}\n' * 3)
    summary = validate_source(tmp_path / "d.jsonl")
    assert (summary.rows, summary.usable, summary.rejected) == (3, 1, 2)
    assert summary.reasons == {"duplicate id": 2}


def test_validate_refuses_an_empty_file(tmp_path):
    from ecif_core.data.sources import validate_source

    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="has no rows .the file is empty.; add image-caption pairs") as error:
        validate_source(tmp_path / "e.jsonl", "train")
    assert error.value.field == "train"


def _write_webdataset(workspace: Path, shards: int = 2) -> str:
    """img2dataset's layout: <key>.png, <key>.txt, <key>.json per sample, samples split over shards."""
    import io
    import tarfile

    rows = _rows(workspace)
    folder = workspace / "data" / "shards"
    folder.mkdir(exist_ok=True)
    per_shard = -(-len(rows) // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:03d}.tar", "w") as tar:
            for row in rows[s * per_shard:(s + 1) * per_shard]:
                members = {"png": (workspace / "data" / row["image"]).read_bytes(),
                           "txt": row["caption"].encode(), "json": json.dumps({"key": row["id"]}).encode()}
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{row['id']}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return f"data/shards/{{000..{shards - 1:03d}}}.tar"


def test_webdataset_shards_give_the_same_audit(workspace, finished, tmp_path):
    pattern = _write_webdataset(workspace)
    manifest = _write_manifest(workspace, "manifest-wds.json", OPTIONS, train=pattern)
    ranked = run_audit(manifest, tmp_path / "wds")
    got = list(csv.DictReader(ranked.read_text().splitlines()))
    want = list(csv.DictReader((finished / "ranked.csv").read_text().splitlines()))
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for a, b in zip(got, want):
        assert "::" in a["image"] and a["caption"] == b["caption"]  # the image lives inside its shard
        for column in ("influence", "influence_pos", "influence_neg", "self_influence", "clip_score"):
            assert (a[column] == "") == (b[column] == "")
            if a[column]:
                assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-6, abs=1e-9)


def test_a_bad_member_of_a_shard_is_a_rejected_row(workspace, tmp_path):
    import io
    import tarfile

    shard = tmp_path / "one.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("a.png", b"not an image"), ("a.txt", b"a digit"), ("b.txt", b"no image")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    pairs, rejected, ids = read_pairs(str(shard))
    assert not pairs and ids == ["a", "b"]
    reasons = {r.id: r.reason for r in rejected}
    assert reasons["a"].startswith("image cannot be decoded") and reasons["b"] == "image is empty"
    with pytest.raises(ConfigError, match="shard"):
        read_pairs({"path": str(tmp_path / "{0..1}.tar"), "format": "webdataset"})


def test_a_list_of_shards_reads_like_the_pattern_and_trains_like_the_jsonl(workspace, tmp_path):
    from ecif_core.data.sources import data_hash
    from ecif_core.data.manifest import load_manifest

    pattern = _write_webdataset(workspace, shards=3)
    listed = [f"data/shards/{s:03d}.tar" for s in range(3)]
    manifest = load_manifest({"model": {"config": "cfg.json", "checkpoint": "model.pt"},
                              "train": {"path": listed, "format": "webdataset"}}, base_dir=workspace)
    assert manifest.train["path"] == [str(workspace / p) for p in listed]
    from_list, _, _ = read_pairs(manifest.train)
    from_pattern, _, _ = read_pairs(str(workspace / pattern))
    from_jsonl, _, _ = read_pairs(workspace / "data" / "train.jsonl")
    assert from_list == from_pattern and [p.id for p in from_list] == [p.id for p in from_jsonl]
    assert data_hash(from_list) == data_hash(from_jsonl)  # the same bytes, read from inside the shards
    with pytest.raises(ConfigError, match="webdataset shards only") as error:
        source_of({"path": ["a.jsonl", "b.jsonl"]})
    assert error.value.field == "train.path"
