"""The HTTP API on the real Postgres server: auth and owner isolation, validation errors that
name the field, data-root confinement, size limit, listing, cancel and delete."""
from __future__ import annotations

import json
import os

import pytest
from fastapi.testclient import TestClient

from ecif_core.datasets.digits import class_prompts, label_of_caption

from services import repository
from services.api.app import create_app
from services.db.models import Audit, PairRow
from services.db.session import session_scope
from services.pipeline import LocalDispatcher, Pipeline
from services.settings import Settings
from tests.services.conftest import OPTIONS, manifest_json


class RecordingStarter:
    """Records what the API would queue; with the database's URL, a retry resumes the audit for
    real (services.resume) and records the tasks it would send."""

    def __init__(self, database_url: str | None = None) -> None:
        self.database_url = database_url
        self.started: list[str] = []
        self.traces: list[str] = []
        self.edits: list[str] = []
        self.resumed: list[tuple] = []
        self.estimated: list = []
        self.settings = None  # the api fixture's

    def resume(self, audit_id: str):
        from services.resume import resume_audit

        assert self.database_url, "RecordingStarter(database_url) is needed to serve POST /audits/{id}/retry"
        return resume_audit(self.database_url, audit_id, lambda *task: self.resumed.append(task))

    def start(self, audit_id: str) -> None:
        self.started.append(audit_id)

    def start_trace(self, trace_id: str) -> None:
        self.traces.append(trace_id)

    def start_edit(self, edit_id: str) -> None:
        self.edits.append(edit_id)

    def estimate(self, manifest) -> dict:
        """As the embedded mode estimates (InProcessStarter.estimate), measured in this process."""
        from services.api.app import InProcessStarter
        from services.estimates import EstimateUnavailable

        self.estimated.append(manifest)
        if self.settings is None:  # a starter made without the app's settings (the fuzzer's): a documented 503
            raise EstimateUnavailable("this RecordingStarter measures nothing")
        return InProcessStarter(self.settings).estimate(manifest)


@pytest.fixture(scope="module")
def api(pg_url, data_root, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    settings = Settings(database_url=pg_url, store_url=str(store), data_roots=[data_root], max_manifest_bytes=4096)
    starter = RecordingStarter(pg_url)
    starter.settings = settings
    with TestClient(create_app(settings, starter=starter)) as client:
        client.starter, client.settings = starter, settings
        yield client


@pytest.fixture(scope="module")
def keys(pg_url) -> dict[str, dict]:
    with session_scope(pg_url) as session:
        alice, bob = repository.create_key(session, "alice"), repository.create_key(session, "bob")
    return {"alice": {"Authorization": f"Bearer {alice}"}, "bob": {"Authorization": f"Bearer {bob}"}}


def _submit(api, headers, body=None) -> dict:
    response = api.post("/audits", json=manifest_json() if body is None else body, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def test_keys_are_stored_hashed(pg_url, keys):
    from services.db.models import ApiKey
    from sqlalchemy import select

    key = keys["alice"]["Authorization"].split()[1]
    with session_scope(pg_url) as session:
        stored = session.scalars(select(ApiKey.key_hash)).all()
    assert key not in stored and repository.hash_key(key) in stored


def test_no_key_or_a_wrong_key_is_401(api):
    assert api.get("/audits").status_code == 401
    assert api.post("/audits", json=manifest_json()).status_code == 401
    assert api.get("/audits", headers={"Authorization": "Bearer ecif_wrong"}).status_code == 401


def test_submit_poll_and_other_owners_see_404(api, keys):
    created = _submit(api, keys["alice"])
    assert created["id"] in api.starter.started
    assert created["status_url"].endswith(f"/audits/{created['id']}")
    status = api.get(f"/audits/{created['id']}", headers=keys["alice"]).json()
    assert status["status"] == "queued" and status["stage"] == "prepare" and status["error"] is None
    for path in ("", "/results.csv", "/rejected.csv"):
        assert api.get(f"/audits/{created['id']}{path}", headers=keys["bob"]).status_code == 404
    assert api.post(f"/audits/{created['id']}/cancel", headers=keys["bob"]).status_code == 404
    assert api.delete(f"/audits/{created['id']}", headers=keys["bob"]).status_code == 404
    assert created["id"] not in [a["id"] for a in api.get("/audits", headers=keys["bob"]).json()["items"]]
    assert api.get(f"/audits/{created['id']}/results.csv", headers=keys["alice"]).status_code == 409


def test_a_dry_run_answers_the_estimate_after_the_submit_checks_and_creates_no_audit(api, keys, pg_url):
    from sqlalchemy import func, select

    from ecif_core.stages.table import STAGES

    def audits() -> int:
        with session_scope(pg_url) as session:
            return session.scalar(select(func.count()).select_from(Audit))

    before, started = audits(), list(api.starter.started)
    response = api.post("/audits?dry_run=true", json=manifest_json(), headers=keys["alice"])
    assert response.status_code == 200, response.text
    estimate = response.json()
    assert (estimate["pairs"], estimate["validation_pairs"], estimate["batch_size"]) == (96, 24, 8)
    assert list(estimate["stages"]) == [s.name for s in STAGES] and estimate["store_bytes"] > 0
    assert estimate["total_s"] == pytest.approx(sum(estimate["stages"].values())) and estimate["total_s"] > 0
    assert estimate["summary"].startswith("Expected: about ") and " for 96 pairs " in estimate["summary"]
    assert audits() == before and api.starter.started == started and len(api.starter.estimated) == 1
    # a key as for a submit, and the submit's checks before anything is timed
    assert api.post("/audits?dry_run=true", json=manifest_json()).status_code == 401
    refused = api.post("/audits?dry_run=true", json=manifest_json(train="digits/nope.jsonl"), headers=keys["alice"])
    assert refused.status_code == 422 and refused.json()["field"] == "train" and len(api.starter.estimated) == 1
    assert audits() == before


def test_an_embedded_server_refuses_an_estimate_while_an_audit_runs(api):
    from services.api.app import InProcessStarter
    from services.estimates import EstimateUnavailable

    starter = InProcessStarter(api.settings)
    with starter._lock, pytest.raises(EstimateUnavailable, match="retry the estimate when it is done"):
        starter.estimate(None)


def test_with_a_broker_a_gpu_worker_times_the_estimate_and_replies_through_redis(api, keys, redis_url, monkeypatch):
    """The API's half for real (send, wait on the reply list); the worker's task body runs in a thread."""
    import threading

    from ecif_core.errors import ConfigError
    from services import broker, estimates
    from services.api.app import CeleryStarter

    settings = api.settings.model_copy(update={"broker_url": redis_url, "estimate_timeout": 120})
    sent = []

    def worker(name, args, expires):
        sent.append((name, expires))
        threading.Thread(target=estimates.reply_estimate, args=(settings, *args)).start()

    monkeypatch.setattr(broker.app, "send_task", worker)
    with TestClient(create_app(settings, starter=CeleryStarter(settings))) as client:
        answer = client.post("/audits?dry_run=true", json=manifest_json(), headers=keys["alice"])
        assert answer.status_code == 200, answer.text
        assert answer.json()["pairs"] == 96 and sent == [(estimates.ESTIMATE_TASK, 120)]
        real = estimates.estimate_json
        monkeypatch.setattr(estimates, "estimate_json", lambda *a: (_ for _ in ()).throw(
            ConfigError("train", "row 3: the image cannot be decoded")))
        refused = client.post("/audits?dry_run=true", json=manifest_json(), headers=keys["alice"])
        assert refused.status_code == 422 and refused.json()["field"] == "train"
        monkeypatch.setattr(estimates, "estimate_json", real)
    monkeypatch.setattr(broker.app, "send_task", lambda *args, **kwargs: None)  # no worker takes it
    quick = settings.model_copy(update={"estimate_timeout": 1})
    with TestClient(create_app(quick, starter=CeleryStarter(quick))) as client:
        late = client.post("/audits?dry_run=true", json=manifest_json(), headers=keys["alice"])
        assert late.status_code == 503 and "no gpu worker took the estimate within 1 s" in late.json()["detail"]


def test_listing_is_paginated_newest_first(api, keys, pg_url):
    with session_scope(pg_url) as session:
        owner_key = repository.create_key(session, "carol")
    headers = {"Authorization": f"Bearer {owner_key}"}
    ids = [_submit(api, headers)["id"] for _ in range(3)]
    page = api.get("/audits?limit=2", headers=headers).json()
    assert page["total"] == 3 and [a["id"] for a in page["items"]] == ids[::-1][:2]
    rest = api.get("/audits?limit=2&offset=2", headers=headers).json()
    assert [a["id"] for a in rest["items"]] == ids[:1]


@pytest.mark.parametrize("body, field", [
    (manifest_json(options={**OPTIONS, "dampin": 1.0}), "options.dampin"),
    (manifest_json(options={**OPTIONS, "damping": "high"}), "options.damping"),
    (manifest_json(train="digits/nope.jsonl"), "train"),
    ({**manifest_json(), "extra": 1}, "extra"),
    (manifest_json(model={"config": "cfg.json", "checkpoint": "missing.pt"}), "model.checkpoint"),
    (manifest_json(model={"config": "nope.json", "checkpoint": "model.pt"}), "model.config"),
    (manifest_json(options={**OPTIONS, "batch_size": 16}), "options.batch_size"),
])
def test_invalid_manifests_are_422_naming_the_field(api, keys, body, field):
    response = api.post("/audits", json=body, headers=keys["alice"])
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert response.json()["detail"][0]["loc"] == ["body", *field.split(".")]


def test_paths_outside_the_data_roots_are_refused(api, keys, data_root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "train.jsonl").write_text((data_root / "digits" / "train.jsonl").read_text())
    link = data_root / "escape"
    if not link.exists():
        os.symlink(outside, link)
    for train in ("../" * 8 + str(outside / "train.jsonl").lstrip("/"), str(outside / "train.jsonl"),
                  "escape/train.jsonl", "digits/../../outside/train.jsonl", "file://" + str(outside / "train.jsonl")):
        response = api.post("/audits", json=manifest_json(train=train), headers=keys["alice"])
        assert response.status_code == 422, train
        assert response.json()["field"] == "train" and "outside the data roots" in response.text, train
    shards = {"path": ["digits/a.tar", str(outside / "b.tar")], "format": "webdataset"}  # one shard outside
    response = api.post("/audits", json=manifest_json(train=shards), headers=keys["alice"])
    assert response.status_code == 422 and response.json()["field"] == "train.path", response.text
    response = api.post("/audits", json=manifest_json(model={"config": "cfg.json", "checkpoint": "/etc/passwd"}),
                        headers=keys["alice"])
    assert response.status_code == 422 and response.json()["field"] == "model.checkpoint"


def test_images_outside_the_data_roots_become_rejected_rows(pg_url, data_root, tmp_path):
    """Image paths inside a pair file are confined too: such rows are rejected, not read."""
    rows = [json.loads(line) for line in (data_root / "digits" / "train.jsonl").read_text().splitlines()]
    rows[0]["image"] = "/etc/hostname"
    (data_root / "digits" / "escape.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    settings = Settings(database_url=pg_url, store_url=str(tmp_path / "store"), data_roots=[data_root])
    starter = RecordingStarter()
    with TestClient(create_app(settings, starter=starter)) as client, session_scope(pg_url) as session:
        key = repository.create_key(session, "dave")
        session.commit()
        audit_id = _submit(client, {"Authorization": f"Bearer {key}"},
                           manifest_json(train="digits/escape.jsonl", validation=None))["id"]
    dispatcher = LocalDispatcher()
    Pipeline(pg_url, dispatcher, image_roots=settings.resolved_roots()).run("prepare", audit_id)
    with session_scope(pg_url) as session:
        rejected = session.query(PairRow).filter(PairRow.audit_id == audit_id, PairRow.reason.is_not(None)).all()
        reasons = {p.pair_id: p.reason for p in rejected}
    assert reasons[rows[0]["id"]] == "image outside the data roots"


def test_manifest_over_the_size_limit_is_413(api, keys):
    body = manifest_json(options={**OPTIONS, "theta": ["x" * 100] * 60})
    assert api.post("/audits", json=body, headers=keys["alice"]).status_code == 413
    raw = json.dumps(body).encode()
    response = api.post("/audits", content=iter([raw]), headers={**keys["alice"], "content-type": "application/json"})
    assert response.status_code == 413  # streamed without Content-Length: counted as it arrives


def test_uploaded_manifest_file_is_accepted(api, keys):
    files = {"manifest": ("manifest.json", json.dumps(manifest_json()).encode(), "application/json")}
    response = api.post("/audits", files=files, headers=keys["alice"])
    assert response.status_code == 202, response.text


def test_cancel_then_delete_removes_rows_and_folder(api, keys, pg_url):
    audit_id = _submit(api, keys["alice"])["id"]
    with session_scope(pg_url) as session:
        audit_dir = session.get(Audit, audit_id).audit_dir
    os.makedirs(audit_dir)
    open(os.path.join(audit_dir, "plan.json"), "w").close()
    cancelled = api.post(f"/audits/{audit_id}/cancel", headers=keys["alice"]).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert api.delete(f"/audits/{audit_id}", headers=keys["alice"]).status_code == 204
    assert api.get(f"/audits/{audit_id}", headers=keys["alice"]).status_code == 404
    assert not os.path.exists(audit_dir)
    with session_scope(pg_url) as session:
        assert session.get(Audit, audit_id) is None


def test_health_ready_and_metrics(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    assert api.get("/openapi.json").json()["paths"]["/audits/{audit_id}/results.csv"]


def test_metrics_need_a_key_and_count_only_that_owners_audits(api, keys, pg_url, data_root):
    assert api.get("/metrics").status_code == 401
    assert api.get("/metrics", headers={"Authorization": "Bearer ecif_wrong"}).status_code == 401
    with session_scope(pg_url) as session:
        dave = repository.create_key(session, "dave-metrics")
    mine = api.get("/metrics", headers={"Authorization": f"Bearer {dave}"})
    assert mine.status_code == 200 and 'ecif_audits{status="queued"} 0.0' in mine.text  # no audits of his
    _submit(api, {"Authorization": f"Bearer {dave}"})
    mine = api.get("/metrics", headers={"Authorization": f"Bearer {dave}"}).text
    assert 'ecif_audits{status="queued"} 1.0' in mine and "ecif_queue_depth" in mine
    settings = api.settings.model_copy(update={"metrics_token": "scrape-secret"})
    with TestClient(create_app(settings, starter=RecordingStarter())) as client:
        everyone = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert everyone.status_code == 200
        queued = float(everyone.text.split('ecif_audits{status="queued"} ')[1].split()[0])
        assert queued > 1  # alice's audits too
        assert client.get("/metrics", headers={"Authorization": "Bearer scrape-secreT"}).status_code == 401


def test_openapi_documents_the_error_responses_and_the_manifest_body(api):
    paths = api.get("/openapi.json").json()["paths"]
    submit = paths["/audits"]["post"]
    assert {"401", "413", "422", "503"} <= set(submit["responses"])
    assert "application/json" in submit["requestBody"]["content"]
    assert "multipart/form-data" in submit["requestBody"]["content"]
    assert {"401", "404", "409"} <= set(paths["/audits/{audit_id}/results.csv"]["get"]["responses"])
    assert "401" in paths["/metrics"]["get"]["responses"]


def test_openapi_links_name_real_operations_and_their_id_parameters(api):
    """The links a client (and the stateful fuzz test) follows: each points at an operation that
    exists and fills exactly that operation's path ids, and the ids reach preview, edits and traces."""
    paths = api.get("/openapi.json").json()["paths"]
    linked = set()
    for path, operations in paths.items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                for name, link in response.get("links", {}).items():
                    target_path, target_method = link["operationRef"].removeprefix("#/paths/").rsplit("/", 1)
                    target_path = target_path.replace("~1", "/").replace("~0", "~")
                    target = paths[target_path][target_method]
                    wanted = {p["name"] for p in target.get("parameters", []) if p["in"] == "path"}
                    assert set(link["parameters"]) == wanted, (path, method, status, name)
                    linked.add((f"{method.upper()} {path}", f"{target_method.upper()} {target_path}"))
    assert {("POST /audits", "GET /audits/{audit_id}/preview"), ("GET /audits", "POST /audits/{audit_id}/edits"),
            ("POST /audits/{audit_id}/edits", "GET /audits/{audit_id}/edits/{edit_id}/checkpoint"),
            ("POST /audits/{audit_id}/traces", "GET /audits/{audit_id}/traces/{trace_id}.csv")} <= linked
    assert ("GET /audits", "DELETE /audits/{audit_id}") not in linked  # a chain deletes only what it created


def test_readyz_reports_an_unmigrated_database(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}", store_url=str(tmp_path / "store"))
    with TestClient(create_app(settings, starter=RecordingStarter())) as client:
        response = client.get("/readyz")
    assert response.status_code == 503 and "ecif db upgrade" in response.json()["checks"]["database"]


def test_a_sidecar_linked_from_outside_the_roots_is_refused(api, keys, data_root, tmp_path):
    linked = data_root / "linked"
    linked.mkdir(exist_ok=True)
    (linked / "model.pt").write_bytes((data_root / "model.pt").read_bytes())
    (tmp_path / "sidecar.json").write_text((data_root / "model.pt.json").read_text())
    if not (linked / "model.pt.json").exists():
        os.symlink(tmp_path / "sidecar.json", linked / "model.pt.json")
    response = api.post("/audits", json=manifest_json(model={"config": "cfg.json", "checkpoint": "linked/model.pt"}),
                        headers=keys["alice"])
    assert response.status_code == 422 and "sidecar is outside the data roots" in response.text


def test_delete_never_removes_a_folder_the_store_does_not_own(api, keys, pg_url, tmp_path):
    audit_id = _submit(api, keys["alice"])["id"]
    elsewhere = tmp_path / "user-folder"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    with session_scope(pg_url) as session:
        session.get(Audit, audit_id).audit_dir = str(elsewhere)
    assert api.delete(f"/audits/{audit_id}", headers=keys["alice"]).status_code == 204
    assert (elsewhere / "keep.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def finished_audit(api, keys, pg_url) -> str:
    """An audit of alice's, run to the end by the pipeline in this process."""
    audit_id = _submit(api, keys["alice"])["id"]
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(pg_url, dispatcher, image_roots=api.settings.resolved_roots())
    pipeline.start(audit_id)
    dispatcher.drain(pipeline)
    return audit_id


def _zero_shot(data_root, index: int = 0) -> dict:
    row = json.loads((data_root / "digits" / "test.jsonl").read_text().splitlines()[index])
    return {"image": f"digits/{row['image']}", "prompts": class_prompts(), "label": label_of_caption(row["caption"])}


def test_trace_is_queued_computed_and_served(api, keys, pg_url, data_root, finished_audit):
    from ecif_core.stages import ModelCache
    from services.pipeline import run_trace

    body = {"tests": [_zero_shot(data_root), {"image": _zero_shot(data_root, 1)["image"], "caption": "a digit"}],
            "k": 5}
    response = api.post(f"/audits/{finished_audit}/traces", json=body, headers=keys["alice"])
    assert response.status_code == 202, response.text
    trace_id = response.json()["trace_id"]
    assert api.starter.traces[-1] == trace_id
    assert api.get(f"/audits/{finished_audit}/traces/{trace_id}", headers=keys["alice"]).json()["status"] == "queued"
    assert api.get(f"/audits/{finished_audit}/traces/{trace_id}", headers=keys["bob"]).status_code == 404
    run_trace(pg_url, trace_id, ModelCache())  # what the gpu worker runs
    status = api.get(f"/audits/{finished_audit}/traces/{trace_id}", headers=keys["alice"]).json()
    assert status["status"] == "succeeded" and len(status["results"]) == 2
    from sqlalchemy import select

    from ecif_core.trace.query import examples_from_json, trace
    from services.db.models import Score, Trace

    with session_scope(pg_url) as session:
        folder, tests = session.get(Audit, finished_audit).audit_dir, session.get(Trace, trace_id).request["tests"]
        flagged = {pair_id for (pair_id,) in session.execute(select(Score.pair_id).where(
            Score.audit_id == finished_audit, Score.suspected.is_(True)))}
    embedded = trace(folder, examples_from_json(tests), k=5)
    for result, alone in zip(status["results"], embedded):
        top = result["top"]
        assert [p["rank"] for p in top] == [1, 2, 3, 4, 5] and result["test_loss"] > 0
        # the same order, prediction and flags as `ecif trace --audit-dir`: harmful first
        assert [p["id"] for p in top] == [p.id for p in alone.top]
        assert [p["influence"] < 0 for p in top] == sorted((p["influence"] < 0 for p in top), reverse=True)
        assert [p["signed_relative_is"] for p in top] == pytest.approx([p.signed_relative_is for p in alone.top])
        assert [p["suspected"] for p in top] == [p["id"] in flagged for p in top]
        assert result["prediction"] == pytest.approx(alone.prediction.to_json())
        assert all(abs(p["influence"] - p["influence_pos"] - p["influence_neg"]) < 1e-9 for p in top)
    csv_text = api.get(f"/audits/{finished_audit}/traces/{trace_id}.csv", headers=keys["alice"]).text
    lines = csv_text.splitlines()
    assert lines[0] == ("test,rank,id,image,caption,relative_is,influence,influence_pos,influence_neg,"
                        "signed_relative_is,suspected") and len(lines) == 11


@pytest.mark.parametrize("test, field", [
    ({"image": "/etc/hostname", "caption": "x"}, "tests[0].image"),
    ({"image": "../../x.png", "caption": "x"}, "tests[0].image"),
    ({"image": "digits/missing.png", "caption": "x"}, "tests[0].image"),
    ({"image": "digits/x.png", "prompts": ["a", "b"], "label": 5}, "tests[0].label"),
])
def test_bad_trace_requests_name_the_field(api, keys, finished_audit, test, field):
    response = api.post(f"/audits/{finished_audit}/traces", json={"tests": [test]}, headers=keys["alice"])
    assert response.status_code == 422 and response.json()["field"] == field, response.text


def test_traces_need_a_finished_audit(api, keys, data_root):
    audit_id = _submit(api, keys["alice"])["id"]
    response = api.post(f"/audits/{audit_id}/traces", json={"tests": [_zero_shot(data_root)]}, headers=keys["alice"])
    assert response.status_code == 409


def test_report_pages_are_served_to_the_owner_only(api, keys, pg_url, data_root, finished_audit):
    from ecif_core.stages import ModelCache
    from services.pipeline import run_trace

    page = api.get(f"/audits/{finished_audit}/report", headers=keys["alice"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    from services.report import TOP_VALUABLE
    from services.review_page import THUMBNAILS

    ranked = api.get(f"/audits/{finished_audit}/results.csv", headers=keys["alice"]).text
    flagged = sum(line.endswith(",true") for line in ranked.splitlines())
    assert page.text.count("<svg") >= 3  # flagged pairs (up to THUMBNAILS) and the valuable ones as thumbnails
    assert page.text.count('class="thumb"') == min(flagged, THUMBNAILS) + TOP_VALUABLE
    assert "<title>Review of train.jsonl (config cfg.json, checkpoint model.pt)</title>" in page.text
    assert 'href="results.csv"' in page.text and "suspect threshold" in page.text
    assert "Removal preview" in page.text and "random:0.1:0" in page.text
    assert api.get(f"/audits/{finished_audit}/report", headers=keys["bob"]).status_code == 404
    unfinished = _submit(api, keys["alice"])["id"]
    assert api.get(f"/audits/{unfinished}/report", headers=keys["alice"]).status_code == 409
    trace_id = api.post(f"/audits/{finished_audit}/traces", json={"tests": [_zero_shot(data_root)], "k": 4},
                        headers=keys["alice"]).json()["trace_id"]
    run_trace(pg_url, trace_id, ModelCache())
    trace_page = api.get(f"/audits/{finished_audit}/traces/{trace_id}/report", headers=keys["alice"]).text
    assert trace_page.count('class="thumb"') == 5 and "relative-IS" in trace_page  # the test image + 4 pairs


def test_a_source_object_path_is_confined_too(api, keys, tmp_path):
    body = manifest_json(train={"path": "../../../etc/passwd", "format": "csv"})
    response = api.post("/audits", json=body, headers=keys["alice"])
    assert response.status_code == 422 and response.json()["field"] == "train.path"
    ok = api.post("/audits", json=manifest_json(train={"path": "digits/train.jsonl", "image_key": "image"}),
                  headers=keys["alice"])
    assert ok.status_code == 202, ok.text


def test_every_shard_a_webdataset_pattern_names_is_confined(api, keys):
    body = manifest_json(train={"path": "digits/{000,../../../../etc/x}.tar", "format": "webdataset"})
    response = api.post("/audits", json=body, headers=keys["alice"])
    assert response.status_code == 422 and response.json()["field"] == "train.path"
    assert "outside the data roots" in response.text


def test_remote_images_need_hosts_the_server_allows(api, keys, pg_url, data_root, tmp_path_factory):
    remote = {"remote_images": {"allowed_hosts": ["169.254.169.254"]}}
    response = api.post("/audits", json={**manifest_json(), **remote}, headers=keys["alice"])
    assert response.status_code == 422 and response.json()["field"] == "remote_images"  # the server allows none
    settings = Settings(database_url=pg_url, store_url=str(tmp_path_factory.mktemp("store")), data_roots=[data_root],
                        remote_image_hosts="images.example.org, 127.0.0.1")
    with TestClient(create_app(settings, starter=RecordingStarter())) as client:
        response = client.post("/audits", json={**manifest_json(), **remote}, headers=keys["alice"])
        assert response.status_code == 422 and response.json()["field"] == "remote_images.allowed_hosts"
        assert "169.254.169.254" in response.text
        allowed = {"remote_images": {"allowed_hosts": ["images.example.org"], "timeout_s": 5}}
        assert client.post("/audits", json={**manifest_json(), **allowed}, headers=keys["alice"]).status_code == 202


def test_operator_image_hosts_are_checked_when_the_service_starts():
    """A URL or a path in ECIF_REMOTE_IMAGE_HOSTS would never match a host: refused at start."""
    from pydantic import ValidationError

    settings = Settings(remote_image_hosts="Images.Example.org, [::1]:8080 ,127.0.0.1:9000")
    assert settings.remote_image_hosts == ["images.example.org", "[::1]:8080", "127.0.0.1:9000"]
    for bad in ("https://images.example.org/", "images.example.org:0", "a.org/images"):
        with pytest.raises(ValidationError, match="ECIF_REMOTE_IMAGE_HOSTS"):
            Settings(remote_image_hosts=bad)


def _audit_files(audit_dir) -> dict:
    """The audit's own files (not its edits/ folder) with their contents' hashes."""
    import hashlib
    from pathlib import Path

    root = Path(audit_dir)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "edits" not in p.relative_to(root).parts}


def test_removal_preview_is_served_to_the_owner(api, keys, finished_audit):
    response = api.get(f"/audits/{finished_audit}/preview", params={"remove": "top:0.1:influence"},
                       headers=keys["alice"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["pairs"] == round(0.1 * 96) and body["predicted_validation_change"] < 0
    assert api.get(f"/audits/{finished_audit}/preview", params={"remove": "suspected"},
                   headers=keys["bob"]).status_code == 404
    bad = api.get(f"/audits/{finished_audit}/preview", params={"remove": "top:2.5:influence"}, headers=keys["alice"])
    assert bad.status_code == 422 and bad.json()["field"] == "remove"
    paths = api.get(f"/audits/{finished_audit}/preview", params={"remove": "ids:/etc/passwd"}, headers=keys["alice"])
    assert paths.status_code == 422 and "list" in paths.text


def test_edit_is_queued_computed_and_downloaded(api, keys, pg_url, finished_audit, data_root, tmp_path):
    import io
    import zipfile

    import torch

    from services.pipeline import run_edit

    with session_scope(pg_url) as session:
        audit_dir = session.get(Audit, finished_audit).audit_dir
    before = _audit_files(audit_dir)
    zero_shot = [{**_zero_shot(data_root, i)} for i in range(4)]
    response = api.post(f"/audits/{finished_audit}/edits", json={"remove": "top:8:self_influence", "zero_shot": zero_shot},
                        headers=keys["alice"])
    assert response.status_code == 202, response.text
    edit_id = response.json()["edit_id"]
    assert api.starter.edits[-1] == edit_id
    status_url = f"/audits/{finished_audit}/edits/{edit_id}"
    assert api.get(status_url, headers=keys["alice"]).json()["status"] == "queued"
    assert api.get(status_url, headers=keys["bob"]).status_code == 404
    assert api.get(f"{status_url}/checkpoint", headers=keys["alice"]).status_code == 409
    run_edit(pg_url, edit_id)  # what the gpu worker runs
    status = api.get(status_url, headers=keys["alice"]).json()
    assert status["status"] == "succeeded", status["error"]
    result = status["result"]["result"]  # the default method: the replay ran its whole recipe
    assert status["result"]["remove"]["pairs"] == 8 and status["result"]["method"]["name"] == "replay"
    assert result["stopped"] == "finished" and result["steps_done"] == result["replay_steps"] >= 1
    assert status["result"]["zero_shot"]["examples"] == 4 and 0 <= status["result"]["zero_shot"]["accuracy_after"] <= 1
    download = api.get(f"{status_url}/checkpoint", headers=keys["alice"])
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(download.content))
    assert {"model.pt", "model.pt.json", "edit.json", "removed_ids.txt"} <= set(archive.namelist())
    state = torch.load(io.BytesIO(archive.read("model.pt")), weights_only=True)
    assert "visual.proj" in state
    assert len(archive.read("removed_ids.txt").split()) == 8
    assert _audit_files(audit_dir) == before  # an edit never modifies the audit
    assert api.get(f"{status_url}/checkpoint", headers=keys["bob"]).status_code == 404


def test_edit_by_ids_and_bad_edit_requests_name_the_field(api, keys, pg_url, finished_audit, data_root):
    with session_scope(pg_url) as session:
        some_id = session.query(PairRow.pair_id).filter(PairRow.audit_id == finished_audit, PairRow.slot.isnot(None)).first()[0]
    ok = api.post(f"/audits/{finished_audit}/edits", json={"ids": [some_id]}, headers=keys["alice"])
    assert ok.status_code == 202, ok.text
    for body, field in [({"ids": ["no-such-pair"]}, "ids"), ({"remove": "suspected", "ids": [some_id]}, "remove"),
                        ({}, "remove"), ({"remove": "top:0.1:nope"}, "remove"),
                        ({"remove": "random:0.1", "max_iterations": 0}, "max_iterations"),
                        ({"remove": "random:0.1", "tolerance": 0}, "tolerance"),
                        ({"remove": "random:0.1", "damping": -1}, "damping"),
                        ({"remove": "ids:/etc/passwd"}, "remove"),
                        ({"remove": "suspected", "zero_shot": [{"image": "/etc/hostname", "prompts": ["a", "b"],
                                                                "label": 0}]}, "zero_shot[0].image"),
                        ({"remove": "suspected", "zero_shot": [{"image": "digits/x.png", "caption": "a"}]},
                         "zero_shot[0]"),
                        ({"remove": "suspected", "zero_shot": [{"image": "digits/x.png", "prompts": ["a", "b"],
                                                                "label": 7}]}, "zero_shot[0].label")]:
        response = api.post(f"/audits/{finished_audit}/edits", json=body, headers=keys["alice"])
        assert response.status_code == 422 and response.json()["field"] == field, (body, response.text)
    unfinished = _submit(api, keys["alice"])["id"]
    assert api.post(f"/audits/{unfinished}/edits", json={"remove": "suspected"}, headers=keys["alice"]).status_code == 409


def test_edit_demotes_with_a_keep_list_and_a_time_budget(api, keys, pg_url, finished_audit):
    """`demote` (a spec) or `ids` with `action` demote; `keep` ids are taken out of the set and counted;
    `max_seconds` is an edit setting; the download holds the demoted ids, not the request's lists."""
    import io
    import zipfile

    from ecif_core.edit.from_audit import removal_set
    from services.db.models import Edit
    from services.pipeline import run_edit

    with session_scope(pg_url) as session:
        audit_dir = session.get(Audit, finished_audit).audit_dir
    top = list(removal_set(audit_dir, "top:8:self_influence").ids)  # the set, as the edit's own parser selects it
    top_two = list(removal_set(audit_dir, "top:2:self_influence").ids)
    response = api.post(f"/audits/{finished_audit}/edits", json={"demote": "top:8:self_influence", "keep": top[:3],
                                                                  "method": "newton", "max_iterations": 3,
                                                                  "max_seconds": 600},
                        headers=keys["alice"])
    assert response.status_code == 202, response.text
    edit_id = response.json()["edit_id"]
    run_edit(pg_url, edit_id)
    status = api.get(f"/audits/{finished_audit}/edits/{edit_id}", headers=keys["alice"]).json()
    assert status["status"] == "succeeded", status["error"]
    assert status["request"]["action"] == "demote" and status["request"]["kept_back"] == 3
    assert status["request"]["max_seconds"] == 600
    record = status["result"]
    assert record["action"] == "demote" and record["demote"]["pairs"] == 5 and record["demote"]["kept_back"] == 3
    assert record["result"]["stopped"] in ("converged", "max iterations")
    archive = zipfile.ZipFile(io.BytesIO(api.get(f"/audits/{finished_audit}/edits/{edit_id}/checkpoint",
                                                 headers=keys["alice"]).content))
    assert sorted(archive.read("demoted_ids.txt").decode().split()) == sorted(top[3:])
    assert "keep_ids.txt" not in archive.namelist() and "removed_ids.txt" not in archive.namelist()
    by_ids = api.post(f"/audits/{finished_audit}/edits", json={"ids": top[:2], "action": "demote"},
                      headers=keys["alice"])
    assert by_ids.status_code == 202, by_ids.text
    with session_scope(pg_url) as session:
        request = session.get(Edit, by_ids.json()["edit_id"]).request
    assert request["action"] == "demote" and request["demote"] == "ids:request_ids.txt" and "remove" not in request
    assert request["method"] == "replay"  # the default, recorded with the request
    for body, field in [({"remove": "suspected", "demote": "suspected"}, "remove"),
                        ({"demote": "suspected", "action": "remove"}, "action"),
                        ({"demote": "top:0.1:nope"}, "demote"), ({"demote": "ids:/etc/passwd"}, "demote"),
                        ({"remove": "top:8:self_influence", "keep": ["no-such-pair"]}, "keep"),
                        ({"demote": "top:2:self_influence", "keep": top_two}, "demote"),
                        ({"remove": "random:0.1", "max_seconds": 0}, "max_seconds"),
                        ({"remove": "random:0.1", "method": "gradient-descent"}, "method"),
                        ({"remove": "random:0.1", "replay_lr": 0}, "replay_lr"),
                        ({"ids": top[:2], "action": "sideways"}, "action")]:
        response = api.post(f"/audits/{finished_audit}/edits", json=body, headers=keys["alice"])
        assert response.status_code == 422 and response.json()["field"] == field, (body, response.text)


def test_a_replay_of_a_checkpoint_without_its_recipe_is_refused_at_submit(api, keys, pg_url, finished_audit):
    """The replay repeats the training recipe: with no training sidecar and no replay_epochs / replay_lr the
    request is a 422 naming replay_epochs before anything is queued; given both, or asking for the Newton step,
    it is accepted."""
    from pathlib import Path

    from services.db.models import Edit

    with session_scope(pg_url) as session:
        checkpoint = Path(session.get(Audit, finished_audit).manifest["model"]["checkpoint"])
        edits_before = session.query(Edit).count()
    sidecar = Path(f"{checkpoint}.json")
    hidden = sidecar.with_name(sidecar.name + ".hidden")
    sidecar.rename(hidden)
    try:
        refused = api.post(f"/audits/{finished_audit}/edits", json={"remove": "top:4:self_influence"},
                           headers=keys["alice"])
        assert refused.status_code == 422 and refused.json()["field"] == "replay_epochs", refused.text
        with session_scope(pg_url) as session:
            assert session.query(Edit).count() == edits_before      # nothing queued
        for body in ({"remove": "top:4:self_influence", "replay_epochs": 1, "replay_lr": 1e-3},
                     {"remove": "top:4:self_influence", "method": "newton", "max_iterations": 2}):
            accepted = api.post(f"/audits/{finished_audit}/edits", json=body, headers=keys["alice"])
            assert accepted.status_code == 202, (body, accepted.text)
    finally:
        hidden.rename(sidecar)


# ------------------------------------------------------------------ faults that were 500s or silently accepted

@pytest.fixture(scope="module")
def bad_checkpoints(data_root):
    """A corrupt file and a pickle that needs more than tensors, inside the data root."""
    import argparse

    import torch

    (data_root / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, data_root / "pickled.pt")
    return data_root


@pytest.mark.parametrize("body, field", [
    (manifest_json(train="digits/\x00train.jsonl"), "train"),
    (manifest_json(train={"path": "digits/train.jsonl", "caption_key": "cap\ud800"}), "train.caption_key"),
    (manifest_json(model={"config": "cfg\ud800.json", "checkpoint": "model.pt"}), "model.config"),
    ({**manifest_json(), "options": {**OPTIONS, "damping": float("inf")}}, "options.damping"),
    ({**manifest_json(), "options": {**OPTIONS, "damping_factor": float("nan")}}, "options.damping_factor"),
    ({**manifest_json(), "options": []}, "options"),
    ({**manifest_json(), "options": "fast"}, "options"),
    (manifest_json(options={**OPTIONS, "chunk": 10**9}), "options.chunk"),
    (manifest_json(options={**OPTIONS, "shard_batches": 10**9}), "options.shard_batches"),
    (manifest_json(options={**OPTIONS, "partitions": 1000}), "options.partitions"),
    (manifest_json(options={**OPTIONS, "damping": 1e300}), "options.damping"),
    (manifest_json(options={**OPTIONS, "projection": {"k_in": 10**6, "k_out": 4}}), "options.projection.k_in"),
    (manifest_json(options={**OPTIONS, "projection": {"k_in": 4, "k_out": 4, "seed": -1}}), "options.projection.seed"),
    (manifest_json(options={**OPTIONS, "projection": None, "theta": ["*.weight"]}), "options.projection"),
    (manifest_json(options={**OPTIONS, "theta": [1]}), "options.theta[0]"),
    (manifest_json(options={**OPTIONS, "theta": []}), "options.theta"),
    (manifest_json(train={"path": "digits/x{1..100000000}.tar", "format": "webdataset"}), "train.path"),
    (manifest_json(train={"path": "digits/x{1..3.tar", "format": "webdataset"}), "train.path"),
    (manifest_json(model={"arch": "hf-hub:laion/CLIP-ViT-B-32", "checkpoint": "model.pt"}), "model.arch"),
    (manifest_json(model={"arch": "NoSuchArch", "checkpoint": "model.pt"}), "model.arch"),
    (manifest_json(model={"arch": "ViT-B-32", "checkpoint": "model.pt"}), "model.checkpoint"),
    (manifest_json(model={"config": "cfg.json", "checkpoint": "corrupt.pt"}), "model.checkpoint"),
    (manifest_json(model={"config": "cfg.json", "checkpoint": "pickled.pt"}), "model.checkpoint"),
])
def test_faults_that_were_500s_or_accepted_are_422_naming_the_field(api, keys, bad_checkpoints, body, field):
    response = api.post("/audits", content=json.dumps(body), headers={**keys["alice"], "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field, response.text
    assert "weights_only" not in response.text


def test_a_huge_brace_pattern_is_refused_before_it_is_expanded(api, keys):
    """The issue's 50-byte manifest: 100k shards took 10.8 s of API CPU before its 422."""
    import time

    for count, limit in ((100_000_000, 0.5), (100_000, 10.0)):
        body = manifest_json(train=f"digits/x{{1..{count}}}.tar")
        started = time.process_time()
        response = api.post("/audits", json=body, headers=keys["alice"])
        spent = time.process_time() - started
        assert response.status_code == 422 and response.json()["field"] == "train", response.text
        assert spent < limit, (count, spent)


def test_offset_and_limit_bounds_are_422(api, keys):
    for query in ("offset=10000000000000000000", "offset=1000000001", "offset=-1", "limit=0", "limit=201"):
        assert api.get(f"/audits?{query}", headers=keys["alice"]).status_code == 422, query
    audit_id = _submit(api, keys["alice"])["id"]
    response = api.get(f"/audits/{audit_id}/results.csv?limit=100000000000000000000", headers=keys["alice"])
    assert response.status_code == 422


def test_ids_no_audit_can_have_are_404_without_reaching_the_database(api, keys):
    for path in ("/audits/%00", "/audits/a%00b/results.csv", "/audits/%ED%A0%80/report", "/audits/" + "a" * 5000):
        assert api.get(path, headers=keys["alice"]).status_code == 404, path
    audit_id = _submit(api, keys["alice"])["id"]
    assert api.get(f"/audits/{audit_id}/traces/%00", headers=keys["alice"]).status_code == 404
    assert api.post("/audits/%00/cancel", headers=keys["alice"]).status_code == 404
    assert api.delete("/audits/%00", headers=keys["alice"]).status_code == 404


def test_hard_linked_pair_files_are_422_unless_the_setting_allows_them(api, keys, pg_url, data_root, tmp_path):
    """A hard link inside a root may be a second name of a file outside it (no real path tells)."""
    outside = tmp_path / "outside.jsonl"
    outside.write_text((data_root / "digits" / "train.jsonl").read_text())
    (tmp_path / "outside.tar").write_bytes(b"\0" * 1024)
    for name, source in (("hardlinked.jsonl", "outside.jsonl"), ("hardlinked.tar", "outside.tar")):
        if not (data_root / "digits" / name).exists():
            os.link(tmp_path / source, data_root / "digits" / name)
    shards = {"path": ["digits/hardlinked.tar"], "format": "webdataset"}
    for body, field in ((manifest_json(train="digits/hardlinked.jsonl"), "train"),
                        (manifest_json(validation="digits/hardlinked.jsonl"), "validation"),
                        (manifest_json(train=shards), "train.path")):
        response = api.post("/audits", json=body, headers=keys["alice"])
        assert response.status_code == 422 and response.json()["field"] == field, response.text
        assert "is a hard link (2 names" in response.text and "ECIF_ALLOW_HARD_LINKS=true" in response.text
        assert "cp -al" in response.text
    settings = Settings(database_url=pg_url, store_url=str(tmp_path / "store"), data_roots=[data_root],
                        allow_hard_links=True)
    with TestClient(create_app(settings, starter=RecordingStarter())) as client:
        response = client.post("/audits", json=manifest_json(train="digits/hardlinked.jsonl"), headers=keys["alice"])
        assert response.status_code == 202, response.text


def test_an_empty_train_file_is_422_naming_train(api, keys, data_root):
    (data_root / "digits" / "empty.jsonl").write_text("\n")
    response = api.post("/audits", json=manifest_json(train="digits/empty.jsonl"), headers=keys["alice"])
    assert response.status_code == 422 and response.json()["field"] == "train", response.text
    assert "has no rows (the file is empty)" in response.text


# ------------------------------------------------------------------ strict previews and edits (issue 25, part 5)

def _edit_rows(pg_url, audit_id: str) -> int:
    from sqlalchemy import func, select

    from services.db.models import Edit

    with session_scope(pg_url) as session:
        return session.scalar(select(func.count()).select_from(Edit).where(Edit.audit_id == audit_id))


@pytest.mark.parametrize("spec", ["top:nan:rank", "top:inf:rank", "random:0.5:-1", "random:0.5:99999999999999999999",
                                  "top:1_0:rank", "suspected:1"])
def test_preview_specs_that_were_500s_or_accepted_are_422_naming_remove(api, keys, finished_audit, spec):
    """The first three were 500s (float("nan") taken for a count, a negative seed given to numpy)."""
    for remove in (spec, "top:99999999999999999999999999:rank", "bottom:-3:rank"):  # and counts out of range
        response = api.get(f"/audits/{finished_audit}/preview", params={"remove": remove}, headers=keys["alice"])
        assert response.status_code == 422, (remove, response.text)
        assert response.json()["field"] == "remove" and response.json()["detail"][0]["loc"][-1] == "remove"


def test_edit_settings_out_of_bounds_or_unknown_are_422_before_anything_is_queued(api, keys, pg_url, finished_audit):
    """1e308 was accepted and the edit stayed `running` forever (NaN in its result); unknown fields were ignored."""
    cases = [('{"remove": "random:0.1", "damping": 1e308}', "damping"),
             ('{"remove": "random:0.1", "damping": NaN}', "damping"),
             ('{"remove": "random:0.1", "damping": Infinity}', "damping"),
             ('{"remove": "random:0.1", "damping_factor": -Infinity}', "damping_factor"),
             ('{"remove": "random:0.1", "damping_per_removal_curvature": 1e13}', "damping_per_removal_curvature"),
             ('{"remove": "random:0.1", "damping_factor": 1, "damping_per_removal_curvature": 1}', "damping_factor"),
             ('{"remove": "random:0.1", "tolerance": 1}', "tolerance"),
             ('{"remove": "random:0.1", "max_iterations": 501}', "max_iterations"),
             ('{"remove": "random:0.1", "max_iterations": 1e400}', "max_iterations"),
             ('{"remove": "random:0.1", "max_iterations": true}', "max_iterations"),
             ('{"remove": "random:0.1", "max_iterations": "5"}', "max_iterations"),
             ('{"remove": "random:0.1", "dampin": 1}', "dampin"),
             ('{"remove": "random:0.1", "theta": [""]}', "theta.0")]
    queued, rows = len(api.starter.edits), _edit_rows(pg_url, finished_audit)
    for body, field in cases:
        response = api.post(f"/audits/{finished_audit}/edits", content=body,
                            headers={**keys["alice"], "Content-Type": "application/json"})
        assert response.status_code == 422, (body, response.text)
        assert response.json()["field"] == field, (body, response.text)
        assert "NaN" not in response.text and "Infinity" not in response.text  # strict JSON, the input echoed as null
    assert len(api.starter.edits) == queued and _edit_rows(pg_url, finished_audit) == rows
    response = api.post(f"/audits/{finished_audit}/traces", json={"tests": [], "k": 3, "top": 5}, headers=keys["alice"])
    assert response.status_code == 422 and response.json()["field"] == "top", response.text


def test_theta_is_checked_against_the_audited_model_at_submit_without_reading_weights(api, keys, pg_url,
                                                                                       finished_audit, monkeypatch):
    import torch

    def no_weights(*args, **kwargs):
        raise AssertionError("the API read a checkpoint")

    monkeypatch.setattr(torch, "load", no_weights)
    queued, rows = len(api.starter.edits), _edit_rows(pg_url, finished_audit)
    for theta in (["nomatch*"], ["logit_scale"], ["text.nothing", "*.nothing"]):
        response = api.post(f"/audits/{finished_audit}/edits", json={"remove": "random:0.1", "theta": theta},
                            headers=keys["alice"])
        assert response.status_code == 422, (theta, response.text)
        assert response.json()["field"] == "theta", response.text
    assert len(api.starter.edits) == queued and _edit_rows(pg_url, finished_audit) == rows
    ok = api.post(f"/audits/{finished_audit}/edits", json={"remove": "random:0.1", "theta": ["visual.proj"]},
                  headers=keys["alice"])
    assert ok.status_code == 202, ok.text
    with session_scope(pg_url) as session:
        from services.db.models import Edit

        assert session.get(Edit, ok.json()["edit_id"]).request["theta"] == ["visual.proj"]


def test_openapi_documents_the_edit_settings_table(api):
    """The bounds have one home (ecif_core.edit.settings): the schema, the CLI and the dataclass read it."""
    from ecif_core.edit.settings import EDIT_SETTINGS, EditSettings
    from ecif_core.data.manifest import BOUNDS
    from services.cli import _edit_settings, build_parser

    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    request = schemas["EditRequest"]
    assert request["additionalProperties"] is False and schemas["TraceRequest"]["additionalProperties"] is False
    cli = _edit_settings(build_parser().parse_args(["edit", "--audit-dir", "a", "--remove", "suspected", "--out", "o"]))
    for spec in EDIT_SETTINGS:
        prop = request["properties"][spec.name]
        number = next(p for p in prop.get("anyOf", [prop]) if p.get("type") != "null")
        assert number["type"] == ("integer" if spec.kind is int else "number")
        assert number["exclusiveMinimum" if spec.low_open else "minimum"] == spec.low
        assert number["exclusiveMaximum" if spec.high_open else "maximum"] == spec.high
        assert prop.get("default") == spec.default == getattr(EditSettings(), spec.name) == getattr(cli, spec.name)
        assert prop["description"] == spec.meaning
        if spec.old_name is not None:  # the old name is still accepted, marked deprecated
            assert request["properties"][spec.old_name]["deprecated"] is True
    assert request["properties"]["damping"]["anyOf"][0]["maximum"] == BOUNDS["damping"][1] == 1e12  # as audits


def test_an_edit_whose_diagnostics_are_not_finite_succeeds_with_nulls(api, keys, pg_url, finished_audit, monkeypatch):
    """A NaN in the record used to make the result write fail (Postgres JSON refuses NaN): `running` forever."""
    import ecif_core.edit.from_audit as edit_audit_module
    from services.pipeline import run_edit

    real = edit_audit_module.validation_loss
    monkeypatch.setattr(edit_audit_module, "validation_loss",
                        lambda model, batches, params=None, from_features=False: (
                            float("nan"), real(model, batches, params, from_features)[1]))
    response = api.post(f"/audits/{finished_audit}/edits", json={"remove": "top:4:self_influence",
                                                                  "method": "newton", "max_iterations": 2},
                         headers=keys["alice"])
    assert response.status_code == 202, response.text
    run_edit(pg_url, response.json()["edit_id"])
    status = api.get(f"/audits/{finished_audit}/edits/{response.json()['edit_id']}", headers=keys["alice"]).json()
    assert status["status"] == "succeeded", status["error"]
    assert status["result"]["validation"]["loss_before"] is None and status["result"]["validation"]["loss_after"] is None
    assert status["result"]["result"]["parameter_change_norm"] > 0


def test_an_edit_whose_parameter_change_is_not_finite_fails_with_the_reason(api, keys, pg_url, finished_audit,
                                                                            monkeypatch):
    import torch

    import ecif_core.edit.solver as edit_module
    from services.pipeline import run_edit

    real = edit_module.conjugate_gradient

    def diverging(*args, **kwargs):
        result = real(*args, **kwargs)
        result.solution = result.solution * torch.tensor(float("inf"))
        return result

    monkeypatch.setattr(edit_module, "conjugate_gradient", diverging)
    response = api.post(f"/audits/{finished_audit}/edits", json={"remove": "top:4:self_influence",
                                                                  "method": "newton", "max_iterations": 2},
                         headers=keys["alice"])
    assert response.status_code == 202, response.text
    run_edit(pg_url, response.json()["edit_id"])  # our own error: recorded, not raised
    status = api.get(f"/audits/{finished_audit}/edits/{response.json()['edit_id']}", headers=keys["alice"]).json()
    assert status["status"] == "failed" and "not finite" in status["error"], status
    assert status["result"] is None and status["finished_at"] is not None


def test_no_422_body_shows_the_store_or_a_data_root(api, keys, pg_url, finished_audit, data_root):
    """The ids of an edit are written to the store: unknown ids were reported with that file's server path."""
    import os

    store = str(api.settings.store_url)
    hidden = {store, os.path.realpath(store), str(data_root), os.path.realpath(data_root)}
    bodies = [
        api.post(f"/audits/{finished_audit}/edits", json={"ids": ["no-such-pair"]}, headers=keys["alice"]),
        api.post("/audits", json=manifest_json(train="digits/nope.jsonl"), headers=keys["alice"]),
        api.post("/audits", json=manifest_json(model={"config": "cfg.json", "checkpoint": "missing.pt"}),
                 headers=keys["alice"]),
        api.post("/audits", json=manifest_json(validation="digits/none.jsonl"), headers=keys["alice"]),
    ]
    for response in bodies:
        assert response.status_code == 422, response.text
        assert not [h for h in hidden if h in response.text], response.text
    assert "<store>/" in bodies[0].text and "request_ids.txt" in bodies[0].text  # still says which file
    assert "digits/nope.jsonl" in bodies[1].text  # a data-root path as the manifest named it


def test_the_redactor_replaces_whole_path_prefixes_only(tmp_path):
    from services.api.redact import Redactor

    (tmp_path / "store").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "root")
    redact = Redactor(str(tmp_path / "store"), [str(tmp_path / "link")])
    assert redact(f"not found: {tmp_path}/store/a/b.txt") == "not found: <store>/a/b.txt"
    assert redact(f"x {tmp_path}/root/digits/a.png and {tmp_path}/link/b") == "x digits/a.png and b"
    assert redact(f"{tmp_path}/store2/a {tmp_path}/root") == f"{tmp_path}/store2/a <data root>"
    assert redact(f"file://{tmp_path}/store/x") == "<store>/x"
    assert Redactor("s3://bucket/audits", [])("s3://bucket/audits/e/ids.txt missing") == "<store>/e/ids.txt missing"


def test_a_trace_with_a_non_finite_influence_fails_with_the_reason(api, keys, pg_url, finished_audit, data_root,
                                                                    monkeypatch):
    """A NaN influence was stored and served (as null) in a `succeeded` trace whose ranking it had spoilt."""
    import ecif_core.trace.query as trace_module
    from ecif_core.stages import ModelCache
    from services.pipeline import run_trace

    real = trace_module.trace

    def nan_trace(*args, **kwargs):
        traces = real(*args, **kwargs)
        traces[0].top[1].influence = float("nan")
        return traces

    monkeypatch.setattr(trace_module, "trace", nan_trace)
    response = api.post(f"/audits/{finished_audit}/traces", json={"tests": [_zero_shot(data_root)], "k": 3},
                        headers=keys["alice"])
    assert response.status_code == 202, response.text
    run_trace(pg_url, response.json()["trace_id"], ModelCache())
    status = api.get(f"/audits/{finished_audit}/traces/{response.json()['trace_id']}", headers=keys["alice"])
    assert status.status_code == 200 and status.json()["status"] == "failed", status.text
    assert "rank 2: influence not finite" in status.json()["error"] and status.json()["results"] == []


def test_a_failure_message_in_a_status_shows_no_server_path(api, keys, pg_url, finished_audit, data_root):
    """Status bodies carry the worker's failure text (`error`): the same redaction as a 422's."""
    import os

    from services.db.models import Audit, Edit, Trace
    from services.db.session import session_scope

    store = os.path.realpath(str(api.settings.store_url))
    leak = f"prepare: train: {os.path.realpath(data_root)}/digits/x.jsonl; wrote {store}/abc/plan.json"
    edit = api.post(f"/audits/{finished_audit}/edits", json={"remove": "suspected"}, headers=keys["alice"])
    trace = api.post(f"/audits/{finished_audit}/traces", json={"tests": [_zero_shot(data_root)], "k": 3},
                     headers=keys["alice"])
    failed = _submit(api, keys["alice"])["id"]
    with session_scope(pg_url) as session:
        for table, row_id in ((Edit, edit.json()["edit_id"]), (Trace, trace.json()["trace_id"]), (Audit, failed)):
            row = session.get(table, row_id)
            row.status, row.error = "failed", leak
    urls = [f"/audits/{finished_audit}/edits/{edit.json()['edit_id']}",
            f"/audits/{finished_audit}/traces/{trace.json()['trace_id']}", f"/audits/{failed}"]
    for url in urls:
        error = api.get(url, headers=keys["alice"]).json()["error"]
        assert error == "prepare: train: digits/x.jsonl; wrote <store>/abc/plan.json", (url, error)


class RefusingBroker(RecordingStarter):
    """A dispatcher whose broker is down: every send raises as kombu's does."""

    def start_trace(self, trace_id: str) -> None:
        from kombu.exceptions import OperationalError

        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    start_edit = start_trace


def test_an_edit_or_trace_the_broker_refused_is_503_and_failed_never_run_later(api, keys, pg_url, finished_audit,
                                                                              data_root, tmp_path):
    """The client is told to retry: the row must not also run later through the reconciler (twice the work)."""
    from services.db.models import Edit, Trace
    from services.db.session import session_scope

    settings = Settings(database_url=pg_url, store_url=api.settings.store_url, data_roots=[data_root])
    with TestClient(create_app(settings, starter=RefusingBroker())) as client:
        edit = client.post(f"/audits/{finished_audit}/edits", json={"remove": "suspected"}, headers=keys["alice"])
        trace = client.post(f"/audits/{finished_audit}/traces", json={"tests": [_zero_shot(data_root)], "k": 3},
                            headers=keys["alice"])
    for response, table in ((edit, Edit), (trace, Trace)):
        assert response.status_code == 503 and response.headers["Retry-After"], response.text
        assert "recorded as failed" in response.json()["detail"]
    with session_scope(pg_url) as session:
        rows = session.query(Edit).filter(Edit.audit_id == finished_audit, Edit.status == "queued").all()
        rows += session.query(Trace).filter(Trace.audit_id == finished_audit, Trace.status == "queued").all()
        assert not [r for r in rows if r.error and "broker" in r.error]
        failed = session.query(Edit).filter(Edit.error.like("%broker is unavailable%")).count()
        failed += session.query(Trace).filter(Trace.error.like("%broker is unavailable%")).count()
    assert failed == 2


def test_postgres_connections_give_up_within_a_bounded_time(pg_url):
    """A host that drops packets must end in a 503 within seconds, not the OS's TCP timeout (minutes);
    the engine hands the driver a connect timeout unless the URL sets its own."""
    from services.db.session import CONNECT_TIMEOUT_S, _connect_args, get_engine

    assert 1 <= CONNECT_TIMEOUT_S <= 15
    assert _connect_args("postgresql+psycopg://u@h/x") == {"connect_timeout": CONNECT_TIMEOUT_S}
    assert _connect_args("postgresql+psycopg://u@h/x?connect_timeout=1") == {}  # the URL's own value wins
    with get_engine(pg_url).connect() as connection:  # the driver takes it (a wrong name would fail here)
        assert connection.exec_driver_sql("select 1").scalar() == 1


def test_an_in_process_edit_whose_run_escapes_ends_failed_not_running(api, keys, pg_url, finished_audit, monkeypatch):
    """`ecif serve` without a broker has no reconciler: an edit whose run escaped (the database went
    away mid-run, which run_edit re-raises for a retry that never comes here) is failed with the reason."""
    from sqlalchemy.exc import OperationalError

    import services.pipeline as pipeline
    from services.api.app import InProcessStarter
    from services.db.models import Edit
    from services.db.session import session_scope

    edit_id = api.post(f"/audits/{finished_audit}/edits", json={"remove": "suspected"},
                       headers=keys["alice"]).json()["edit_id"]

    def outage(database_url, row_id, *args, **kwargs):
        with session_scope(database_url) as session:
            session.get(Edit, row_id).status = "running"
        raise OperationalError("UPDATE edits", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(pipeline, "run_edit", outage)
    InProcessStarter(api.settings)._edit(edit_id)
    with session_scope(pg_url) as session:
        edit = session.get(Edit, edit_id)
        assert edit.status == "failed" and edit.error.startswith("stopped: database error"), edit.error


def test_an_edit_record_in_a_status_shows_no_server_path(api, keys, pg_url, finished_audit, data_root):
    """The edit record names the audit folder and the base checkpoint: as the client knows them."""
    import os

    from services.db.models import Edit
    from services.db.session import session_scope

    store = os.path.realpath(str(api.settings.store_url))
    edit_id = api.post(f"/audits/{finished_audit}/edits", json={"remove": "suspected"},
                       headers=keys["alice"]).json()["edit_id"]
    with session_scope(pg_url) as session:
        row = session.get(Edit, edit_id)
        row.status, row.result = "succeeded", {"audit": f"{store}/{finished_audit}", "pairs": 3,
                                               "base": {"checkpoint": [f"{os.path.realpath(data_root)}/model.pt"]}}
    result = api.get(f"/audits/{finished_audit}/edits/{edit_id}", headers=keys["alice"]).json()["result"]
    assert result == {"audit": f"<store>/{finished_audit}", "pairs": 3, "base": {"checkpoint": ["model.pt"]}}
