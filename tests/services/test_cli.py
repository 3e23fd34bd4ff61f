"""The `ecif` verbs end to end: demo at reduced size, train + audit, clear errors."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from services.cli import main
from tests.services.conftest import read_csv_rows


def test_demo_runs_end_to_end_at_reduced_size(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n-train", "96", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "clip_score (lowest first)" in out and "AUROC" in out and "epochs" in out and "suspected=true" in out
    with (tmp_path / "demo" / "audit" / "ranked.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 96 and rows[0]["rank"] == "1"
    assert (tmp_path / "demo" / "data" / "truth.csv").exists()
    # the audit never sees the ground truth: its manifest names only the pair files
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert "truth" not in json.dumps(manifest)


def test_train_then_audit_and_error_names_the_field(tmp_path, capsys):
    from ecif_core.datasets.digits import build_digits
    from tests.core.helpers import MICRO_CONFIG

    data = build_digits(tmp_path / "d", fraction=0.2, seed=3, n_train=32, n_val=8, n_test=8)
    (tmp_path / "cfg.json").write_text(json.dumps(MICRO_CONFIG))
    (tmp_path / "exclude.txt").write_text("")
    assert main(["train", "--data", str(data.train), "--model-config", str(tmp_path / "cfg.json"), "--epochs", "1",
                 "--batch-size", "8", "--lr", "1e-3", "--weight-decay", "0.01", "--seed", "1",
                 "--exclude", str(tmp_path / "exclude.txt"), "--validation", str(data.validation),
                 "--out", str(tmp_path / "m.pt")]) == 0
    assert "image-to-text accuracy" in capsys.readouterr().err   # --validation: learning shown per epoch
    assert json.loads((tmp_path / "m.pt.json").read_text())["validation"][0]["epoch"] == 1
    manifest = {"model": {"checkpoint": "m.pt"}, "train": "d/train.jsonl",
                "options": {"projection": {"k_in": 2, "k_out": 2}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["audit", str(tmp_path / "manifest.json"), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert (tmp_path / "a" / "ranked.csv").exists()
    assert main(["audit", str(tmp_path / "manifest.json"), "--out", str(tmp_path / "p"), "--quiet",
                 "--partners", "2"]) == 0   # the approximation: every row says what it dropped
    with (tmp_path / "p" / "ranked.csv").open() as handle:
        assert all(float(row["dropped_partner_mass"]) >= 0 for row in csv.DictReader(handle))
    with pytest.raises(SystemExit):
        main(["audit", str(tmp_path / "manifest.json"), "--out", str(tmp_path / "q"), "--partners", "0"])
    assert "--partners: must be between 1 and 65535" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({**manifest, "options": {"damping": "high"}}))
    assert main(["audit", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")]) == 2
    assert "options.damping" in capsys.readouterr().err


def test_client_verbs_need_a_key_and_say_so(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ECIF_API_KEY", raising=False)
    from services.settings import get_settings

    get_settings.cache_clear()
    try:
        (tmp_path / "m.json").write_text("{}")
        assert main(["submit", str(tmp_path / "m.json"), "--server", "http://127.0.0.1:9"]) == 2
        assert "no API key" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()  # no settings read under this test's environment stay cached


def test_client_reports_the_servers_error_with_the_field(tmp_path):
    """The 422 body becomes a one-line error naming the field."""
    import httpx

    from services.client import ApiError, Client

    body = {"detail": [{"loc": ["body", "options", "damping"], "msg": "wrong type str"}], "field": "options.damping"}
    response = httpx.Response(422, json=body)
    try:
        Client._json(response)
    except ApiError as exc:
        assert str(exc) == "server answered 422: options.damping: wrong type str"
    else:
        raise AssertionError("a 422 must raise")


def test_submit_makes_every_manifest_path_absolute_each_shard_of_a_list_too(tmp_path):
    """The server resolves relative paths against its first data root, not the manifest's
    folder: a shard list sent with relative entries named other files (or none)."""
    from services.client import absolute_paths

    folder = tmp_path / "project"
    folder.mkdir()
    manifest = {"model": {"config": "cfg.json", "checkpoint": "models/model.pt", "adapter": "lora"},
                "train": {"path": ["shards/000.tar", "shards/{001..002}.tar", "/data/elsewhere.tar"],
                          "format": "webdataset"},
                "validation": {"path": "val.tsv", "separator": "\t"},
                "options": {"theta": ["visual.proj"]}, "remote_images": {"allowed_hosts": ["a.org"]}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    sent = absolute_paths(folder / "manifest.json")
    assert sent["train"] == {"path": [str(folder / "shards/000.tar"), str(folder / "shards/{001..002}.tar"),
                                      "/data/elsewhere.tar"], "format": "webdataset"}
    assert sent["validation"] == {"path": str(folder / "val.tsv"), "separator": "\t"}
    assert sent["model"] == {"config": str(folder / "cfg.json"), "checkpoint": str(folder / "models/model.pt"),
                             "adapter": str(folder / "lora")}
    assert {k: sent[k] for k in ("options", "remote_images")} == {k: manifest[k] for k in ("options", "remote_images")}


def test_trace_from_an_embedded_audit_folder(data_root, embedded_csv, tmp_path, capsys):
    import json

    row = json.loads((data_root / "digits" / "test.jsonl").read_text().splitlines()[0])
    image = str((data_root / "digits" / row["image"]).resolve())
    prompts = [arg for i in range(10) for arg in ("--prompt", f"a photo of the digit {i}")]
    assert main(["trace", "--audit-dir", str(embedded_csv.parent), "--image", image, *prompts, "--label", "3",
                 "--k", "5", "-o", str(tmp_path / "trace.csv")]) == 0
    out = capsys.readouterr().out
    assert "top 5 training pairs by relative-IS, harmful first" in out
    assert "model predicts 'a photo of the digit " in out  # the prompt it ranks first, with its probability
    with (tmp_path / "trace.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    harmful = [r for r in rows if float(r["influence"]) < 0]
    assert rows[:len(harmful)] == harmful  # sign(influence) x relative-IS: harmful pairs first
    for group in (harmful, rows[len(harmful):]):
        values = [float(r["relative_is"]) for r in group]
        assert values == sorted(values, reverse=True)
    assert all(float(r["signed_relative_is"]) == (-1 if float(r["influence"]) < 0 else 1) * float(r["relative_is"])
               for r in rows)
    flagged = {r["id"] for r in read_csv_rows(embedded_csv) if r["suspected"] == "true"}
    assert all((r["suspected"] == "true") == (r["id"] in flagged) for r in rows)
    table = [line for line in out.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"], ["4"], ["5"])]
    assert [" suspected " in line for line in table] == [r["suspected"] == "true" for r in rows]
    assert main(["trace", "--audit-dir", str(embedded_csv.parent), "--image", image, "--prompt", "a", "--prompt",
                 "b", "--label", "7"]) == 2
    assert "tests[0].label" in capsys.readouterr().err


def test_threads_flag_on_every_verb_sets_torch_threads_and_the_worker_variable(monkeypatch):
    import argparse

    import torch

    from ecif_core.models.runtime import available_cores
    from services.cli import apply_threads, build_parser

    parser = build_parser()
    verbs = [a for a in parser._subparsers._group_actions][0].choices
    for name, sub in verbs.items():  # every leaf command takes --threads
        leaves = [sub] if sub._subparsers is None else list(sub._subparsers._group_actions[0].choices.values())
        for leaf in leaves:
            assert any("--threads" in a.option_strings for a in leaf._actions), name
    before = torch.get_num_threads()
    # setenv first so that monkeypatch records the variable's original state and restores it: the
    # apply_threads calls below write os.environ directly, and a leftover ECIF_TORCH_THREADS would
    # change the thread count (and the last bits of every score) of every later audit and worker
    monkeypatch.setenv("ECIF_TORCH_THREADS", "1")
    monkeypatch.delenv("ECIF_TORCH_THREADS")
    try:
        args = parser.parse_args(["audit", "m.json", "--out", "x", "--threads", "1"])
        assert apply_threads(args) == 1 and torch.get_num_threads() == 1
        assert __import__("os").environ["ECIF_TORCH_THREADS"] == "1"
        monkeypatch.delenv("ECIF_TORCH_THREADS")
        # default for one process: all cores it may use, not torch's own guess
        assert apply_threads(parser.parse_args(["train", "--data", "d", "--model-config", "c", "--out", "o"])) \
            == available_cores() == torch.get_num_threads()
        # a worker only exports the variable; its processes split it (workers.tasks)
        assert apply_threads(parser.parse_args(["worker", "--threads", "3"])) is None
        assert __import__("os").environ["ECIF_TORCH_THREADS"] == "3"
        assert isinstance(parser.parse_args(["db", "upgrade", "--threads", "2"]), argparse.Namespace)
    finally:
        torch.set_num_threads(before)



def test_edit_from_an_audit_folder_runs_with_the_threads_asked_for(monkeypatch, tmp_path):
    """`ecif edit --audit-dir ... --threads N` computes in this process, so torch runs with N threads
    while the edit does (it did not: edit was missing from TORCH_VERBS)."""
    import torch

    from ecif_core.edit import from_audit
    from services.cli import main

    seen = {}

    def fake_edit(audit_dir, remove, out, settings, **kwargs):
        seen["threads"] = torch.get_num_threads()
        return {"remove": remove, "checkpoint": str(out), "result": {}, "validation": None, "zero_shot": None}

    monkeypatch.setattr(from_audit, "edit_audit", fake_edit)
    monkeypatch.setenv("ECIF_TORCH_THREADS", "1")  # restored after the test (main exports --threads)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["edit", "--audit-dir", str(tmp_path), "--remove", "suspected", "--out", str(tmp_path / "o"),
                     "--threads", "1"]) == 0
        assert seen["threads"] == 1
    finally:
        torch.set_num_threads(before)

def _with_database(monkeypatch, url: str) -> None:
    from services.settings import get_settings

    monkeypatch.setenv("ECIF_DATABASE_URL", url)
    get_settings.cache_clear()


def test_keys_list_and_revoke(pg_url, monkeypatch, capsys):
    from fastapi.testclient import TestClient

    from services.api.app import create_app
    from services.settings import Settings, get_settings

    _with_database(monkeypatch, pg_url)
    try:
        assert main(["keys", "create", "--owner", "carol-cli"]) == 0
        key = capsys.readouterr().out.strip()
        assert main(["keys", "list", "--owner", "carol-cli"]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert listed[0] == "id\towner\tprefix\tcreated_at\trevoked" and len(listed) == 2
        key_id, owner, prefix, _, revoked = listed[1].split("\t")
        assert (owner, prefix, revoked) == ("carol-cli", key[:12], "false") and key not in listed[1]
        headers = {"Authorization": f"Bearer {key}"}
        with TestClient(create_app(Settings(database_url=pg_url), starter=object())) as client:
            assert client.get("/audits", headers=headers).status_code == 200
            assert main(["keys", "revoke", key_id]) == 0
            assert f"revoked key {key_id} of carol-cli" in capsys.readouterr().out
            assert client.get("/audits", headers=headers).status_code == 401
        assert main(["keys", "list", "--owner", "carol-cli"]) == 0
        assert capsys.readouterr().out.splitlines()[1].endswith("\ttrue")
        assert main(["keys", "revoke", "999999999"]) == 1 and "no key" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()


def test_db_upgrade_of_a_missing_database_says_what_to_do_or_creates_it(pg_url, monkeypatch, capsys):
    import uuid

    import psycopg

    from services.settings import get_settings
    from tests.services.conftest import PG_ADMIN

    name = f"ecif_missing_{uuid.uuid4().hex[:8]}"
    _with_database(monkeypatch, pg_url.rsplit("/", 1)[0] + f"/{name}")
    try:
        assert main(["db", "upgrade"]) == 2
        err = capsys.readouterr().err
        assert f"database '{name}' does not exist" in err and "--create" in err and "Traceback" not in err
        assert main(["db", "upgrade", "--create"]) == 0
        assert f"created database {name}" in capsys.readouterr().out
        assert main(["db", "upgrade", "--create"]) == 0  # exists now: nothing created, still at head
        assert "created" not in capsys.readouterr().out
    finally:
        get_settings.cache_clear()
        from services.db.session import get_engine

        get_engine(pg_url.rsplit("/", 1)[0] + f"/{name}").dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_ecif_audit_writes_ranked_csv_and_report_html_once_each(data_root, tmp_path, monkeypatch):
    """One orchestrator: the finalize stage returns its ranking and the in-process run writes
    ranked.csv and report.html once each, from the database (a second writer would be a second
    place to keep in step). Every way a file can land is counted: opened for writing, or a
    temporary file renamed over it (storage.open_for_write)."""
    import builtins
    import io
    import os

    import torch

    from ecif_core.stages.table import STAGES

    out = tmp_path / "audit"
    watched = {out / "ranked.csv": "ranked.csv", out / "report.html": "report.html", out / "timing.json": "timing.json"}
    writes = dict.fromkeys(watched.values(), 0)
    real_open, real_replace = builtins.open, os.replace

    def count(target) -> None:
        if isinstance(target, (str, os.PathLike)) and Path(os.fspath(target)) in watched:
            writes[watched[Path(os.fspath(target))]] += 1

    def counting_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            count(file)
        return real_open(file, mode, *args, **kwargs)

    def counting_replace(source, target, *args, **kwargs):
        count(target)
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(os, "replace", counting_replace)
    threads = torch.get_num_threads()
    try:
        assert main(["audit", str(data_root / "manifest.json"), "--out", str(out), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)  # `ecif` sets torch's threads; later tests' numbers must not depend on it
    assert writes == {"ranked.csv": 1, "report.html": 1, "timing.json": 1}
    with (out / "ranked.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 96  # every pair of the data root, once
    timing = json.loads((out / "timing.json").read_text())  # the benchmarks read it
    assert list(timing) == [*(stage.name for stage in STAGES), "total"] and timing["total"] > 0


def test_summary_json_matches_ranked_csv(embedded_csv):
    """summary.json (the calibration) agrees with ranked.csv: the flagged count, the flag's estimated
    precision and recall are the mean and the share of misaligned_probability over the flagged rows,
    and the flag is the precision-target set (the most probable pairs)."""
    from ecif_core.calibration import describe, flags_for_target

    summary = json.loads((embedded_csv.parent / "summary.json").read_text())
    rows = read_csv_rows(embedded_csv)
    flagged = [r for r in rows if r["suspected"] == "true"]
    assert summary["pairs"] == len(rows) and summary["flagged"] == len(flagged)
    assert describe(summary)  # the terminal's sentence renders for this audit
    if not summary["estimable"]:
        assert summary["estimated_misaligned_fraction"] is None and summary["reason"]
        assert all(r["misaligned_probability"] == "" for r in rows)
        return
    probability = np.array([float(r["misaligned_probability"]) for r in rows])
    suspected = np.array([r["suspected"] == "true" for r in rows])
    assert np.array_equal(suspected, flags_for_target(probability, summary["flag_target_precision"]))
    if suspected.any():
        assert summary["estimated_flag_precision"] == pytest.approx(probability[suspected].mean(), abs=1e-4)
        assert summary["estimated_flag_recall"] == pytest.approx(probability[suspected].sum() / probability.sum(), abs=1e-4)
    low, high = summary["interval"]
    assert low <= summary["estimated_misaligned_fraction"] <= high
