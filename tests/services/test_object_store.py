"""Audit folders and data roots in an S3-compatible object store (a real moto server): the same
bytes as on a local disk, confinement by key prefix, and clear errors for stores that cannot work."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from ecif_core.data.confine import OutsideRoots, confined, data_roots
from ecif_core.errors import ConfigError
from ecif_core.data.folder import AuditFolder
from ecif_core.data.storage import location
from services.embedded import run_audit
from tests.services.conftest import OPTIONS, assert_same_ranking, read_csv_rows
from tests.services.processes import ecif_command


def test_embedded_audit_in_a_bucket_writes_the_local_audit_byte_for_byte(s3, data_root, embedded_csv,
                                                                         tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder literally named "s3:" would appear here
    out = f"s3://{s3.new_bucket()}/audits/one"
    ranked = run_audit(data_root / "manifest.json", out)
    assert str(ranked) == f"{out}/ranked.csv"
    assert ranked.read_bytes() == embedded_csv.read_bytes()
    folder = AuditFolder(out)
    for path in (folder.plan, folder.pairs, folder.rejected, folder.report, location(folder.store) / "zarr.json"):
        assert path.exists(), path
    assert folder.rejected.read_bytes() == (embedded_csv.parent / "rejected.csv").read_bytes()
    assert not any(tmp_path.iterdir())  # nothing local: no "s3:" folder, no database left behind
    # a second run on the same folder resumes from the markers in the bucket and gives the same bytes
    assert run_audit(data_root / "manifest.json", out).read_bytes() == embedded_csv.read_bytes()
    # what-ifs on the audit in the bucket: a removal preview, a trace, a model edit written back to it
    from ecif_core.datasets.digits import class_prompts, label_of_caption
    from ecif_core.edit.settings import EditSettings
    from ecif_core.edit.from_audit import edit_audit, preview
    from ecif_core.trace.query import examples_from_json, trace

    assert preview(out, "top:0.1:influence")["pairs"] == 10
    row = json.loads((data_root / "digits" / "test.jsonl").read_text().splitlines()[0])
    example = {"image": str(data_root / "digits" / row["image"]), "prompts": class_prompts(),
               "label": label_of_caption(row["caption"])}
    [traced] = trace(out, examples_from_json([example]), k=5)
    assert len(traced.top) == 5
    record = edit_audit(out, "top:0.1:influence", f"{out}/edits/e1", EditSettings(max_iterations=3))
    assert record["checkpoint"]["checkpoint"] == f"{out}/edits/e1/model.pt"
    edited = location(f"{out}/edits/e1")
    assert len((edited / "removed_ids.txt").read_text().split()) == 10 and (edited / "edit.json").exists()
    import io

    import torch
    from open_clip.model import CLIP

    state = torch.load(io.BytesIO((edited / "model.pt").read_bytes()), weights_only=True)
    CLIP(**json.loads((data_root / "cfg.json").read_text())).load_state_dict(state, strict=True)
    sidecar = json.loads((edited / "model.pt.json").read_text())
    assert sidecar["data"]["path"] == str(data_root / "digits" / "train.jsonl")  # absolute: no path from a bucket


def test_pairs_images_and_checkpoint_in_a_bucket_audit_like_local_files(s3_data_root, s3_inputs_csv, embedded_csv):
    """Every input under an s3:// data root: pair files, images (relative to the pair file),
    model config, checkpoint and its training sidecar; the scores are those of the local audit."""
    rows, expected = read_csv_rows(s3_inputs_csv.decode()), read_csv_rows(embedded_csv)
    assert_same_ranking(rows, expected)
    assert all(r["image"].startswith(f"{s3_data_root}/digits/") for r in rows)
    assert [r["image"].rsplit("/", 1)[1] for r in rows] == [r["image"].rsplit("/", 1)[1] for r in expected]


def test_object_store_keys_are_confined_to_their_root_prefix(s3, s3_data_root):
    roots = data_roots([s3_data_root])
    inside = f"{s3_data_root}/digits/train.jsonl"
    assert str(confined(inside, roots, "train")) == inside
    assert str(confined(f"{s3_data_root}/digits/../cfg.json", roots, "train")) == f"{s3_data_root}/cfg.json"
    bucket = s3_data_root.rsplit("/", 1)[0]
    for outside in (f"{s3_data_root}/../secret.json", f"{s3_data_root}x/train.jsonl", f"{bucket}/train.jsonl",
                    "s3://another-bucket/root/train.jsonl", f"{s3_data_root}/../../other/root/a.png"):
        with pytest.raises(OutsideRoots):
            confined(outside, roots, "train")
    with pytest.raises(OutsideRoots):  # a local file is not under an object-store root
        confined("/etc/passwd", roots, "image")
    with pytest.raises(OutsideRoots):  # nor an object under a local root
        confined(inside, data_roots(["/tmp"]), "image")


def test_the_api_refuses_keys_outside_an_s3_data_root(s3, s3_data_root):
    from services.manifests import confined_manifest

    roots = data_roots([s3_data_root])
    good = {"model": {"config": "cfg.json", "checkpoint": "model.pt"}, "train": "digits/train.jsonl",
            "options": OPTIONS}
    manifest = confined_manifest(good, roots)  # relative paths resolve against the first root's prefix
    assert manifest.checkpoint == f"{s3_data_root}/model.pt" and manifest.train == f"{s3_data_root}/digits/train.jsonl"
    bucket = s3_data_root.rsplit("/", 1)[0]
    location(f"{bucket}/stolen.jsonl").write_text("{}")  # exists, but outside the prefix
    for field, value in (("train", "../stolen.jsonl"), ("train", f"{bucket}/stolen.jsonl"),
                         ("model.checkpoint", "s3://elsewhere/model.pt"), ("train", "/etc/passwd")):
        raw = json.loads(json.dumps(good))
        if field == "train":
            raw["train"] = value
        else:
            raw["model"]["checkpoint"] = value
        with pytest.raises(ConfigError) as error:
            confined_manifest(raw, roots)
        assert error.value.field == field and "outside the data roots" in error.value.message


def test_a_store_url_that_cannot_work_is_an_error_before_any_work(s3, data_root, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    unknown = subprocess.run([*ecif_command(), "audit", str(data_root / "manifest.json"), "--out", "nosuch://b/a"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "out: nosuch://b/a: the scheme nosuch:// is not served here" in unknown.stderr
    assert not any(tmp_path.iterdir())  # no folder named after the URL
    started = time.monotonic()
    missing = subprocess.run([*ecif_command(), "audit", str(data_root / "manifest.json"), "--out",
                              "s3://no-such-bucket-here/a"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode != 0 and "out: store s3://no-such-bucket-here/a cannot be written" in missing.stderr
    unreachable = subprocess.run([*ecif_command(), "audit", str(data_root / "manifest.json"), "--out",
                                  f"s3://{s3.new_bucket()}/a"], cwd=tmp_path, capture_output=True, text=True,
                                 env={**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"},
                                 timeout=120)
    assert unreachable.returncode != 0 and "cannot be written (EndpointConnectionError" in unreachable.stderr
    assert "prepare" not in missing.stderr + unreachable.stderr  # stopped before the first stage
    print(f"\nthree refused stores in {time.monotonic() - started:.1f} s")
    assert not any(tmp_path.iterdir())
    from pydantic import ValidationError

    from services.settings import Settings

    with pytest.raises(ValidationError, match="the scheme nosuch:// is not served here"):
        Settings(store_url="nosuch://bucket/audits")


def test_an_object_another_process_wrote_is_seen_after_a_listing(s3):
    """Workers on other machines write into the same prefix: a listing this process made must
    not hide their objects later (s3fs caches listings unless told not to)."""
    import s3fs

    prefix = location(f"s3://{s3.new_bucket()}/audit")
    (prefix / "plan.json").write_text("{}")
    assert [p.name for p in prefix.iterdir()] == ["plan.json"]  # this process lists the prefix
    elsewhere = s3fs.S3FileSystem(skip_instance_cache=True)  # another machine's client
    elsewhere.pipe_file(f"{prefix.path}/done-marker", b"1")
    assert (prefix / "done-marker").exists()
    assert sorted(p.name for p in prefix.iterdir()) == ["done-marker", "plan.json"]


def test_checkpoints_and_adapters_in_a_bucket_are_read_through_cached_local_copies(s3, tmp_path, monkeypatch):
    """torch.load / safetensors / peft need real files: a bucket's checkpoint or adapter folder is
    copied once, and copied again when the object is replaced (its ETag changes)."""
    from ecif_core.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_folder
    from ecif_core.data.storage import local_copy

    monkeypatch.setenv("ECIF_CACHE_DIR", str(tmp_path / "cache"))
    adapter = location(f"s3://{s3.new_bucket()}/lora")
    (adapter / ADAPTER_CONFIG).write_text('{"r": 8}')
    (adapter / ADAPTER_WEIGHTS).write_bytes(b"weights-1")
    local = check_adapter_folder(str(adapter))
    assert local.is_dir() and (local / ADAPTER_CONFIG).read_text() == '{"r": 8}'
    assert (local / ADAPTER_WEIGHTS).read_bytes() == b"weights-1"
    assert check_adapter_folder(str(adapter)) == local  # cached: same folder, nothing fetched again
    (adapter / ADAPTER_WEIGHTS).write_bytes(b"weights-2")  # retrained in place
    again = check_adapter_folder(str(adapter))
    assert again != local and (again / ADAPTER_WEIGHTS).read_bytes() == b"weights-2"
    copy = local_copy(adapter / ADAPTER_WEIGHTS)
    assert copy.read_bytes() == b"weights-2" and str(copy).startswith(str(tmp_path / "cache"))
    (adapter / ADAPTER_CONFIG).unlink()
    with pytest.raises(ConfigError, match="model.adapter: .* is not a peft adapter folder"):
        check_adapter_folder(str(adapter))
