"""Schemathesis against the app (in process, real Postgres): every operation, schema-valid
and schema-violating requests, with a valid key and, half the time, the id of a real audit
(one finished, one queued; never for DELETE, which would remove them) so the routes behind
the 404 are reached too. No 5xx, and no
status code or content type the OpenAPI schema does not document."""
from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from services import repository
from services.api.app import create_app
from services.db.session import session_scope
from services.settings import Settings
from tests.services.test_api import RecordingStarter
from tests.services.test_pipeline import _new_audit, _run_to_the_end

pytestmark = pytest.mark.slow
EXAMPLES = 25  # per operation and generation mode: 15 operations x 2 modes x 25 = 750 requests at most


def test_no_operation_answers_5xx_or_an_undocumented_status(pg_url, data_root, tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz-store")
    app = create_app(Settings(database_url=pg_url, store_url=str(store), data_roots=[data_root],
                              max_manifest_bytes=65536), starter=RecordingStarter())
    with session_scope(pg_url) as session:
        key = repository.create_key(session, "fuzzer")
    finished = _new_audit(pg_url, data_root / "manifest.json", tmp_path_factory.mktemp("fuzz-audit"))
    queued = _new_audit(pg_url, data_root / "manifest.json", tmp_path_factory.mktemp("fuzz-audit"))
    with session_scope(pg_url) as session:
        from services.db.models import Audit

        for audit_id in (finished, queued):
            session.get(Audit, audit_id).owner = "fuzzer"
    _run_to_the_end(pg_url, finished)
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as client:  # runs the app's startup, as a server would
        trace = client.post(f"/audits/{finished}/traces", headers=headers, json={
            "tests": [{"image": "digits/images/" + sorted((data_root / "digits" / "images").iterdir())[0].name,
                       "caption": "a digit"}], "k": 3})
        assert trace.status_code == 202, trace.text
        trace_id = trace.json()["trace_id"]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    sent, statuses, failures = 0, {}, []

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode), real=st.sampled_from([None, finished, queued]))
            def call(case, real) -> None:
                nonlocal sent
                if real is not None and "audit_id" in (case.path_parameters or {}) and case.method != "DELETE":
                    case.path_parameters["audit_id"] = real
                    if "trace_id" in case.path_parameters:
                        case.path_parameters["trace_id"] = trace_id
                response = case.call(headers=headers)
                sent += 1
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                documented = {str(code) for code in operation.definition.raw.get("responses", {})}
                if str(response.status_code) not in documented:  # whatever the library's checks skip
                    failures.append(f"{case.method} {case.formatted_path}: undocumented {response.status_code} "
                                    f"{response.text[:200]}")
                try:
                    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                             content_type_conformance], headers=headers)
                except Exception as exc:  # noqa: BLE001 - collected, reported all at once below
                    failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {exc}"[:600])
                    raise

            try:
                call()
            except BaseException as exc:  # hypothesis re-raises the shrunk failure; it is in `failures`
                if isinstance(exc, KeyboardInterrupt):
                    raise
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    print(f"\nschemathesis: {sent} requests, statuses {dict(sorted(statuses.items()))}, {server_errors} 5xx")
    assert not failures, "\n".join(failures[:10])
    assert server_errors == 0 and sent >= 300


def test_schemathesis_cli_against_a_real_server(pg_url, data_root, tmp_path_factory):
    """The same property from outside: `st run` (examples, coverage, fuzzing and stateful
    phases) against a real `ecif serve` on Postgres and Redis (no worker: audits stay queued)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.services.processes import Service, service_env
    from tests.services.test_integration import _redis_db

    work = tmp_path_factory.mktemp("st")
    svc = Service(service_env(pg_url, _redis_db(4), work / "store", data_root), work)
    try:
        svc.start_server()
        key = svc.run("keys", "create", "--owner", "st-cli").stdout.strip()
        report = work / "report.json"
        run = subprocess.run([str(Path(sys.executable).parent / "st"), "run", f"{svc.url}/openapi.json",
                              "-H", f"Authorization: Bearer {key}", "--checks",
                              "not_a_server_error,status_code_conformance,content_type_conformance",
                              "-n", "20", "--seed", "1", "--report-json-path", str(report)],
                             cwd=work, capture_output=True, text=True, timeout=600)
        cases = json.loads(report.read_text())["test_cases"]
        print(f"\nst run against ecif serve: {cases['generated']} test cases, {cases['with_failures']} with failures")
        assert run.returncode == 0, run.stdout[-3000:]
        assert cases["with_failures"] == 0 and cases["errored"] == 0 and cases["generated"] >= 500
    finally:
        svc.stop()
