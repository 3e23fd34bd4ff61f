"""Schemathesis against the app: no 5xx, and no status code or content type the OpenAPI schema
does not document.

- stateless, in process: every operation, schema-valid and schema-violating requests, half the
  time with the id of a real audit (never for DELETE);
- stateful, in process: chains of calls along the API's OpenAPI links, starting from real ids
  (a finished and a queued audit, a finished trace and edit), so previews, edits and traces are
  fuzzed on them, with removal specs drawn from their grammar;
- the `st` CLI against a real `ecif serve`."""
from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from ecif_core.ranking import SUSPICION_SIGN
from services import repository
from services.api.app import create_app
from services.db.session import session_scope
from services.settings import Settings
from tests.services.test_api import RecordingStarter
from tests.services.test_pipeline import _new_audit, _run_to_the_end

pytestmark = pytest.mark.slow
EXAMPLES = 25  # per operation and generation mode: 15 operations x 2 modes x 25 = 750 requests at most


class AsServer:
    """The app as a server runs it: an unhandled exception is the 500 Starlette's outermost middleware
    has already sent, and a line in the log (kept in `errors` for the report), not an exception in the
    client, which would end a fuzz run at its first one (or, caught, hide it)."""

    def __init__(self, app) -> None:
        self.app, self.errors = app, []

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - what uvicorn does: log it, the client has its 500
            self.errors.append(f"{type(exc).__name__}: {exc}")


def _fuzzed_app(pg_url, data_root, tmp_path_factory, owner: str):
    """The app under fuzz (in process, real Postgres, nothing queued for real), the owner's key
    header, and two audits of that owner: one run to the end, one left queued."""
    from services.db.models import Audit

    store = tmp_path_factory.mktemp("fuzz-store")
    app = create_app(Settings(database_url=pg_url, store_url=str(store), data_roots=[data_root],
                              max_manifest_bytes=65536), starter=RecordingStarter(pg_url))
    with session_scope(pg_url) as session:
        key = repository.create_key(session, owner)
    finished = _new_audit(pg_url, data_root / "manifest.json", tmp_path_factory.mktemp("fuzz-audit"))
    queued = _new_audit(pg_url, data_root / "manifest.json", tmp_path_factory.mktemp("fuzz-audit"))
    with session_scope(pg_url) as session:
        for audit_id in (finished, queued):
            session.get(Audit, audit_id).owner = owner
    _run_to_the_end(pg_url, finished)
    return app, {"Authorization": f"Bearer {key}"}, finished, queued


def test_no_operation_answers_5xx_or_an_undocumented_status(pg_url, data_root, tmp_path_factory):
    app, headers, finished, queued = _fuzzed_app(pg_url, data_root, tmp_path_factory, "fuzzer")
    with TestClient(app) as client:  # runs the app's startup, as a server would
        trace = client.post(f"/audits/{finished}/traces", headers=headers, json={
            "tests": [{"image": "digits/images/" + sorted((data_root / "digits" / "images").iterdir())[0].name,
                       "caption": "a digit"}], "k": 3})
        assert trace.status_code == 202, trace.text
        trace_id = trace.json()["trace_id"]
    server = AsServer(app)
    schema = schemathesis.openapi.from_asgi("/openapi.json", server)
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
                if response.status_code >= 500 and server.errors:
                    failures.append(f"{case.method} {case.formatted_path} {case.query}: {server.errors.pop()}"[:600])
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


# ------------------------------------------------------------------ stateful

SEED = 25
SCENARIOS = 300   # hypothesis examples, each a chain of up to STEPS calls: ~2,500 requests, ~2 min here
STEPS = 8


# What Python's float() reads (the server parses Q with it): signs, nan/inf/infinity in any case,
# digits with underscores, a decimal point, an exponent.
FLOAT_TEXT = r"[-+]?([nN][aA][nN]|[iI][nN][fF]([iI][nN][iI][tT][yY])?|[0-9](_?[0-9])*(\.[0-9]*)?([eE][-+]?[0-9]+)?)"


def removal_specs() -> st.SearchStrategy[str]:
    """Strings shaped like the `remove` grammar (services.api.openapi.REMOVAL_SPEC): Q and SEED
    drawn from Hypothesis' integers and floats and from the text float() reads (so nan, inf,
    negatives, exponents and huge values), known and unknown columns, and plain text."""
    number = st.one_of(st.integers().map(str), st.floats().map(repr), st.from_regex(FLOAT_TEXT, fullmatch=True))
    known = st.sampled_from(sorted(SUSPICION_SIGN))
    ranked = st.builds("{}:{}:{}".format, st.sampled_from(["top", "bottom"]), number,
                       st.one_of(known, known, st.text(max_size=12)))
    seeded = st.builds(lambda q, seed: f"random:{q}" + ("" if seed is None else f":{seed}"),
                       number, st.one_of(st.none(), st.integers().map(str), st.integers().map(str)))  # mostly a seed
    return st.one_of(ranked, seeded, ranked, seeded, st.just("suspected"), st.just("estimated"),
                     st.text(max_size=40)).filter(lambda text: len(text) <= 200)


def test_stateful_fuzzing_on_real_ids_answers_no_5xx_or_an_undocumented_status(pg_url, data_root,
                                                                               tmp_path_factory):
    """Schemathesis' state machine follows the links in the OpenAPI schema (a response naming an
    audit, trace or edit -> the operations taking its id). Each scenario starts from a real id: the
    status of the fuzzer's finished audit (twice as likely), of its queued one, of a finished trace
    or of a finished edit, fetched through the API; GET /audits (whose first item is the finished
    audit) is the one random entry point. Schema-valid requests, with `remove` drawn from its
    grammar (removal_specs). Every answer is checked and none stops the run: the failures are
    reported together, by operation, status and error. Fixed seed and budget: the same requests
    every run (the fuzzer's own audits, if any, stay queued: RecordingStarter)."""
    from hypothesis import seed as fixed_seed
    from hypothesis.stateful import Bundle, initialize

    from ecif_core.stages import ModelCache
    from schemathesis.generation.stateful.state_machine import StepInput, normalize_name
    from schemathesis.specs.openapi.formats import unregister_string_format
    from services.api.openapi import REMOVAL_SPEC_FORMAT
    from services.pipeline import run_edit, run_trace

    app, headers, finished, queued = _fuzzed_app(pg_url, data_root, tmp_path_factory, "stateful-fuzzer")
    image = "digits/images/" + sorted((data_root / "digits" / "images").iterdir())[0].name
    with TestClient(app) as client:  # runs the app's startup, as a server would
        trace = client.post(f"/audits/{finished}/traces", headers=headers,
                            json={"tests": [{"image": image, "caption": "a digit"}], "k": 3})
        edit = client.post(f"/audits/{finished}/edits", headers=headers,
                           json={"remove": "top:4:self_influence", "max_iterations": 2})
        assert trace.status_code == 202 and edit.status_code == 202, (trace.text, edit.text)
        trace_id, edit_id = trace.json()["trace_id"], edit.json()["edit_id"]
    run_trace(pg_url, trace_id, ModelCache())  # what the gpu worker runs
    run_edit(pg_url, edit_id)

    server = AsServer(app)
    schema = schemathesis.openapi.from_asgi("/openapi.json", server)
    schema.config.phases.stateful.inference.algorithms = []  # the API's own links only: no inferred DELETE
    # Schema-valid requests only (invalid ones mostly dropped the key: 401s; the stateless test sends
    # them): the malformed input here is the grammar-shaped `remove`, on real ids.
    schema.config.phases.stateful.generation.modes = [GenerationMode.POSITIVE]
    documented = {op.ok().label: {str(code) for code in op.ok().definition.raw.get("responses", {})}
                  for op in schema.get_all_operations()}
    calls: dict[str, dict[int, int]] = {}
    failures: dict[tuple[str, int], dict[str, list[str]]] = {}  # (operation, status) -> {what went wrong: requests}
    audit_at, trace_at, edit_at = ("/audits/{audit_id}", "/audits/{audit_id}/traces/{trace_id}",
                                   "/audits/{audit_id}/edits/{edit_id}")
    seeded = [(audit_at, {"audit_id": finished}), (audit_at, {"audit_id": finished}), (audit_at, {"audit_id": queued}),
              (trace_at, {"audit_id": finished, "trace_id": trace_id}),
              (edit_at, {"audit_id": finished, "edit_id": edit_id})]

    workflow = schema.as_state_machine()
    entry = normalize_name("RANDOM -> GET /audits")  # the one root whose ids are real: the listed audits

    class Fuzzer(workflow):
        rule_order_seed = SEED
        root_rules = frozenset({entry})

        def get_call_kwargs(self, case):
            return {"headers": headers}

        @initialize(target=Bundle("catch_all"), chosen=st.sampled_from(seeded))
        def start_from_a_real_id(self, chosen):
            """The status of the finished audit (twice as likely), the queued one, the finished
            trace or the finished edit, fetched as the scenario's first step: its links take the
            real id on (to preview, edits, traces, results, reports, CSVs, the checkpoint)."""
            for path, parameters in [chosen]:
                case = schema[path]["GET"].Case(path_parameters=parameters)
                step = StepInput.initial(case)
                self.recorder.record_case(case=case)
                self.control.record_step(step, self.recorder)
                output = self._step(step)
                self._add_results_to_targets(("catch_all",), [output])

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            label = case.operation.label
            calls.setdefault(label, {}).setdefault(response.status_code, 0)
            calls[label][response.status_code] += 1
            request = f"{case.method} {case.formatted_path}" + (f" query={case.query}" if case.query else "") + (
                f" body={str(case.body)[:160]}" if isinstance(case.body, (dict, list, str)) else "")
            problems = []
            if str(response.status_code) not in documented[label]:
                problems.append("undocumented status")
            try:
                case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                         content_type_conformance], headers=headers,
                                       recorder=self.recorder)
            except (Exception, BaseExceptionGroup) as exc:  # collected: the run goes on to its fixed budget
                problems.extend(getattr(e, "title", type(e).__name__) for e in getattr(exc, "exceptions", [exc]))
            if problems:
                answer = (server.errors.pop() if response.status_code >= 500 and server.errors
                          else response.content[:160].decode("utf-8", "replace"))
                failures.setdefault((label, response.status_code), {}).setdefault(
                    f"{', '.join(sorted(set(problems)))}: {answer}", []).append(request)

    for name in workflow.root_rules - {entry}:  # POST /audits (no manifest from the fuzzer names a real
        setattr(Fuzzer, name, None)            # checkpoint) and random ids: the stateless test's ground
    schemathesis.openapi.format(REMOVAL_SPEC_FORMAT, removal_specs())
    try:
        fixed_seed(SEED)(Fuzzer)
        Fuzzer.run(settings=settings(max_examples=SCENARIOS, stateful_step_count=STEPS, deadline=None,
                                     database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
    finally:
        unregister_string_format(REMOVAL_SPEC_FORMAT)
    print(f"\nstateful schemathesis (seed {SEED}, {SCENARIOS} scenarios of <= {STEPS} steps): "
          f"{sum(sum(c.values()) for c in calls.values())} requests")
    for label, statuses in sorted(calls.items()):
        print(f"  {label}: {dict(sorted(statuses.items()))}")
    report = [f"{label} -> {status}, {len(requests)}x: {what}\n    e.g. " + "\n    e.g. ".join(list(dict.fromkeys(requests))[:3])
              for (label, status), kinds in sorted(failures.items()) for what, requests in sorted(kinds.items())]
    assert not failures, f"{sum(len(r) for k in failures.values() for r in k.values())} failing answers\n" + "\n".join(report)
    reached = {label for label, statuses in calls.items() if any(code not in (401, 404) for code in statuses)}
    for label in ("GET /audits/{audit_id}/preview", "POST /audits/{audit_id}/edits",
                  "GET /audits/{audit_id}/edits/{edit_id}/checkpoint", "GET /audits/{audit_id}/traces/{trace_id}.csv"):
        assert label in reached, f"{label} was never reached with a real id: {calls.get(label)}"
