"""Database or broker down: every route answers 503 with Retry-After and the error body (never a
500, never the connection string), and the same app serves again once the dependency is back.
The database is a real PostgreSQL cluster the test stops and starts (the `scratch_pg` fixture)."""
from __future__ import annotations

import threading
import time
import uuid

import httpx
import psycopg
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import text

from services import repository
from services.api.app import create_app
from services.api.deps import SessionDep
from services.db.models import Audit
from services.db.session import session_scope, upgrade
from services.settings import Settings
from tests.services.conftest import manifest_json
from tests.services.processes import Service, free_port, service_env
from tests.services.test_api import RecordingStarter

DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}  # the framework's pages: no database
BODIES = {"/audits": manifest_json(), "/audits/{audit_id}/traces": {"tests": [], "k": 1},
          "/audits/{audit_id}/edits": {"remove": "suspected"}}


def _service(cluster, data_root, store) -> tuple[Settings, str, str]:
    """Schema, an API key and a succeeded audit (no rows: its CSVs are a header) in the cluster."""
    upgrade(cluster.url)
    with session_scope(cluster.url) as session:
        key = repository.create_key(session, "outage")
        audit = Audit(id=str(uuid.uuid4()), owner="outage", status="succeeded", stage="done", manifest={},
                      audit_dir=str(store / "finished"))
        session.add(audit)
    settings = Settings(database_url=cluster.url, store_url=str(store), data_roots=[data_root])
    return settings, f"Bearer {key}", audit.id


def _routes(app) -> tuple[list, set[str]]:
    """The app's operations (included routers resolved, as FastAPI's OpenAPI sees them) and the
    paths of its other routes."""
    contexts = list(iter_route_contexts(app.routes))
    return ([c for c in contexts if isinstance(c.original_route, APIRoute)],
            {c.path for c in contexts if not isinstance(c.original_route, APIRoute)})


def _calls(app, audit_id: str):
    """(method, path template, path, json body) of every operation of the app, ids filled in."""
    ids = {"audit_id": audit_id, "trace_id": str(uuid.uuid4()), "edit_id": str(uuid.uuid4())}
    for route in _routes(app)[0]:
        path = route.path.format(**{name: ids[name] for name in route.param_convertors})
        for method in sorted(route.methods):
            yield method, route.path, path, BODIES.get(route.path, {}) if method in ("POST", "PUT", "PATCH") else None


def _assert_unavailable(response, what: str, secrets: list[str]) -> None:
    assert response.status_code == 503, (what, response.status_code, response.text[:300])
    assert int(response.headers["Retry-After"]) > 0, what
    body = response.json()
    assert set(body) == {"detail", "field"} and body["field"] is None, (what, body)
    assert "unavailable" in body["detail"] and "retry" in body["detail"], (what, body)
    for secret in secrets:
        assert secret not in response.text, what


def test_every_route_answers_503_while_the_database_is_down_then_serves_again(scratch_pg, data_root, tmp_path,
                                                                               caplog):
    settings, key, audit_id = _service(scratch_pg, data_root, tmp_path / "store")
    headers = {"Authorization": key}
    secrets = [scratch_pg.password, scratch_pg.url]
    app = create_app(settings, starter=RecordingStarter())
    assert _routes(app)[1] == DOCS  # any other route is an operation, called below
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/audits", headers=headers).status_code == 200  # the pool holds a live connection now
        scratch_pg.stop()
        caplog.clear()
        answers = {(method, template): client.request(method, path, headers=headers, json=body,
                                                      params={"remove": "suspected"})
                   for method, template, path, body in _calls(app, audit_id)}
        assert {("POST", "/audits"), ("GET", "/audits/{audit_id}"), ("GET", "/audits/{audit_id}/results.csv"),
                ("GET", "/metrics")} <= set(answers)
        assert {call: r.status_code for call, r in answers.items() if r.status_code != 503} == {("GET", "/healthz"): 200}
        assert answers["GET", "/readyz"].json()["checks"]["database"].startswith("error")
        for (method, template), response in answers.items():
            if template not in ("/healthz", "/readyz"):
                _assert_unavailable(response, f"{method} {template}", secrets)
        for path in DOCS:
            assert client.get(path).status_code == 200, path
        assert "database unavailable" in caplog.text
        for secret in secrets:
            assert secret not in caplog.text

        scratch_pg.start()  # the same app and client, not restarted
        assert client.get("/readyz").status_code == 200
        listed = client.get("/audits", headers=headers)
        assert listed.status_code == 200 and audit_id in {a["id"] for a in listed.json()["items"]}
        assert client.get(f"/audits/{audit_id}", headers=headers).status_code == 200
        assert client.get(f"/audits/{audit_id}/results.csv", headers=headers).text.startswith("rank,")
        assert client.post("/audits", headers=headers, json=manifest_json()).status_code == 202


def test_results_csv_is_a_503_when_the_database_goes_down_before_the_first_byte(scratch_pg, data_root, tmp_path):
    """The route's own lookups succeed; the stream's first query waits on a lock, and the database
    stops while it waits: the client gets a 503, not a 200 cut short."""
    settings, key, audit_id = _service(scratch_pg, data_root, tmp_path / "store")
    plain = scratch_pg.url.replace("postgresql+psycopg://", "postgresql://")
    locker = psycopg.connect(plain)
    locker.execute("LOCK TABLE scores IN ACCESS EXCLUSIVE MODE")  # held until the cluster stops
    watcher = psycopg.connect(plain, autocommit=True)

    def stop_once_the_stream_waits() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0]:
            time.sleep(0.05)
        scratch_pg.stop()

    stopper = threading.Thread(target=stop_once_the_stream_waits)
    with TestClient(create_app(settings, starter=RecordingStarter()), raise_server_exceptions=False) as client:
        stopper.start()
        response = client.get(f"/audits/{audit_id}/results.csv", headers={"Authorization": key})
        stopper.join()
    locker.close()
    watcher.close()
    _assert_unavailable(response, "results.csv", [scratch_pg.password])


def test_a_commit_that_fails_after_the_route_returned_is_a_503(scratch_pg, data_root, tmp_path):
    """The session dependency commits when the route returns; the connection is cut between the
    route's query and that commit, so the error comes after the route has its answer."""
    settings, _key, _audit = _service(scratch_pg, data_root, tmp_path / "store")
    plain = scratch_pg.url.replace("postgresql+psycopg://", "postgresql://")

    def cut_after_reading(session: SessionDep) -> dict:
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with psycopg.connect(plain, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]:
                time.sleep(0.02)
        return {"pid": pid}

    app = create_app(settings, starter=RecordingStarter())
    app.add_api_route("/cut-after-reading", cut_after_reading)
    with TestClient(app, raise_server_exceptions=False) as client:
        _assert_unavailable(client.get("/cut-after-reading"), "commit", [scratch_pg.password])
        assert client.get("/readyz").status_code == 200  # the cut connection left the pool


def test_submissions_answer_503_with_retry_after_while_the_broker_is_down(pg_url, data_root, tmp_path):
    """A real `ecif serve` whose broker URL names a closed port: POST /audits (the audit recorded as
    failed) and POST .../traces answer 503 with Retry-After, and quickly."""
    with session_scope(pg_url) as session:
        key = repository.create_key(session, f"brokerless-{uuid.uuid4().hex[:6]}")
        owner = repository.owner_of_key(session, key)
        finished = Audit(id=str(uuid.uuid4()), owner=owner, status="succeeded", stage="done", manifest={},
                         audit_dir=str(tmp_path / "finished"))
        session.add(finished)
    broker = f"redis://:broker-secret@127.0.0.1:{free_port()}/0"
    service = Service(env=service_env(pg_url, broker, tmp_path / "store", data_root), logs=tmp_path)
    headers = {"Authorization": f"Bearer {key}"}
    image = "digits/images/" + sorted((data_root / "digits" / "images").iterdir())[0].name
    try:
        service.spawn("server", "serve", "--port", str(service.port))
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{service.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.3)
        with httpx.Client(base_url=service.url, headers=headers, timeout=60) as client:
            started = time.monotonic()
            submitted = client.post("/audits", json=manifest_json())
            seconds = time.monotonic() - started
            _assert_unavailable(submitted, "POST /audits", ["broker-secret"])
            assert "broker" in submitted.json()["detail"] and seconds < 30, seconds
            assert client.get("/audits").json()["items"][0]["status"] == "failed"
            traced = client.post(f"/audits/{finished.id}/traces", json={"tests": [{"image": image, "caption": "a"}],
                                                                       "k": 3})
            _assert_unavailable(traced, "POST traces", ["broker-secret"])
    finally:
        service.stop()
    log = (tmp_path / "server.log").read_text()
    assert "task broker is unavailable" in log and "broker-secret" not in log and "Traceback" not in log


def test_openapi_documents_503_with_retry_after_on_every_operation(tmp_path):
    """Every operation but /healthz can meet a database or broker outage; its 503 is documented."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'unused.db'}", store_url=str(tmp_path / "store"))
    with TestClient(create_app(settings, starter=RecordingStarter())) as client:
        paths = client.get("/openapi.json").json()["paths"]
    undocumented = [f"{method.upper()} {path}" for path, operations in paths.items() for method, operation in
                    operations.items() if path != "/healthz" and "503" not in operation["responses"]]
    assert undocumented == []
    submit = paths["/audits"]["post"]["responses"]["503"]
    assert "database" in submit["description"] and "broker" in submit["description"]
    assert "Retry-After" in submit["headers"]
    assert "503" not in paths["/healthz"]["get"]["responses"]


def test_the_broker_client_gives_up_within_seconds():
    """kombu's Redis transport waits forever by default: a broker host that drops packets would hold
    POST /audits for minutes instead of the 503 above."""
    from services.broker import BROKER_CONNECT_TIMEOUT_S, BROKER_READ_TIMEOUT_S, app

    options = app.conf.broker_transport_options
    assert options["socket_connect_timeout"] == BROKER_CONNECT_TIMEOUT_S <= 10
    assert options["socket_timeout"] == BROKER_READ_TIMEOUT_S <= 60
    assert app.connection_for_write().transport_options["socket_connect_timeout"] == BROKER_CONNECT_TIMEOUT_S


def test_a_primary_demoted_to_read_only_is_an_outage_and_a_real_bug_is_not():
    """During a failover a write meets a read-only server (SQLSTATE 25006, psycopg's InternalError):
    retry later (503). A constraint violation is no outage: it stays the server's error."""
    from sqlalchemy.exc import IntegrityError, InternalError

    from services.api.unavailable import is_outage

    class DriverError(Exception):
        def __init__(self, sqlstate: str) -> None:
            self.sqlstate = sqlstate

    assert is_outage(InternalError("INSERT", {}, DriverError("25006")))
    assert is_outage(InternalError("SELECT", {}, DriverError("57P01")))
    assert is_outage(InternalError("SELECT", {}, DriverError("08006")))
    assert not is_outage(IntegrityError("INSERT", {}, DriverError("23505")))
    assert not is_outage(InternalError("SELECT", {}, DriverError("XX000")))


def test_the_app_answers_503_for_a_read_only_primary_and_500_for_a_bug(tmp_path):
    from sqlalchemy.exc import IntegrityError, InternalError

    class DriverError(Exception):
        def __init__(self, sqlstate: str) -> None:
            self.sqlstate = sqlstate

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'unused.db'}", store_url=str(tmp_path / "store"))
    app = create_app(settings, starter=RecordingStarter())

    @app.get("/test-only/failover")
    def failover() -> None:
        raise InternalError("INSERT INTO audits", {}, DriverError("25006"))

    @app.get("/test-only/bug")
    def bug() -> None:
        raise IntegrityError("INSERT INTO audits", {}, DriverError("23505"))

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/test-only/failover")
        assert answer.status_code == 503 and answer.headers["Retry-After"] and "database" in answer.json()["detail"]
        assert client.get("/test-only/bug").status_code == 500
