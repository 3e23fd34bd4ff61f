"""http(s) images through a real HTTP server on 127.0.0.1: the opt-in, the host allowlist,
timeouts, size limits and redirects, and an audit over URLs equal to the one over files."""
import csv
import json
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ecif_core import audit
from ecif_core.errors import ConfigError
from ecif_core.manifest import load_manifest
from ecif_core.remote import FetchError, RemoteImages, fetch, remote_images_of
from tests.core.test_audit import OPTIONS, _write_manifest, finished, workspace  # noqa: F401  (fixtures)

SLOW_SECONDS = 3.0
BIG_BYTES = 200_000


class _Handler(SimpleHTTPRequestHandler):
    """Files under the served folder, plus a few misbehaving endpoints."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        port = self.server.server_address[1]
        if self.path.startswith("/slow/"):
            time.sleep(SLOW_SECONDS)
            self.path = self.path[len("/slow"):]
        elif self.path == "/big-declared.png":
            self._send(200, {"Content-Length": str(BIG_BYTES)}, b"\0" * BIG_BYTES)
            return
        elif self.path == "/big-undeclared.png":  # no Content-Length: only counting the body finds it
            self.send_response(200)
            self.end_headers()
            for _ in range(BIG_BYTES // 1000):
                self.wfile.write(b"\0" * 1000)
            return
        elif self.path.startswith("/same-host-redirect/"):
            self._send(302, {"Location": self.path[len("/same-host-redirect"):]}, b"")
            return
        elif self.path.startswith("/other-host-redirect/"):
            location = f"http://localhost:{port}{self.path[len('/other-host-redirect'):]}"
            self._send(302, {"Location": location}, b"")
            return
        super().do_GET()

    def _send(self, code: int, headers: dict, body: bytes) -> None:
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture(scope="module")
def server(workspace):
    handler = lambda *a, **k: _Handler(*a, directory=str(workspace / "data"), **k)  # noqa: E731
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


POLICY = RemoteImages(allowed_hosts=("127.0.0.1",), timeout_s=1.0, max_bytes=100_000)


def _first_image(workspace: Path) -> str:
    return json.loads((workspace / "data" / "train.jsonl").read_text().splitlines()[0])["image"]


def test_fetch_writes_the_body_and_follows_a_same_host_redirect(server, workspace, tmp_path):
    image = _first_image(workspace)
    expected = (workspace / "data" / image).read_bytes()
    assert fetch(f"{server}/{image}", POLICY, tmp_path / "a").read_bytes() == expected
    assert fetch(f"{server}/same-host-redirect/{image}", POLICY, tmp_path / "b").read_bytes() == expected


@pytest.mark.parametrize("path, reason", [
    ("/slow/{image}", "timed out"),
    ("/big-declared.png", "too large (200000 bytes; limit 100000)"),
    ("/big-undeclared.png", "too large (over 100000 bytes)"),
    ("/other-host-redirect/{image}", "redirects to another host"),
    ("/no-such.png", "HTTP 404"),
])
def test_fetch_refusals_say_why_and_leave_no_file(server, workspace, tmp_path, path, reason):
    dest = tmp_path / "out"
    started = time.monotonic()
    with pytest.raises(FetchError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        fetch(server + path.format(image=_first_image(workspace)), POLICY, dest)
    assert time.monotonic() - started < SLOW_SECONDS  # the timeout, not the server, ended the slow one
    assert not dest.exists() and not list(tmp_path.iterdir())


def test_a_host_outside_the_allowlist_is_not_contacted(tmp_path):
    with pytest.raises(FetchError, match="not in remote_images.allowed_hosts"):
        fetch("http://10.255.255.1/x.png", POLICY, tmp_path / "x")


@pytest.mark.parametrize("value, field", [
    ({"allowed_hosts": []}, "remote_images.allowed_hosts"),
    ({"allowed_hosts": ["a"], "timeout_s": 0}, "remote_images.timeout_s"),
    ({"allowed_hosts": ["a"], "max_bytes": -1}, "remote_images.max_bytes"),
    ({"allowed_hosts": ["a"], "proxy": "x"}, "remote_images.proxy"),
    (["a"], "remote_images"),
])
def test_bad_remote_image_policies_name_the_field(value, field):
    with pytest.raises(ConfigError) as error:
        remote_images_of(value)
    assert error.value.field == field


def _url_rows(workspace: Path, server: str, replace: dict[int, str] | None = None) -> Path:
    """train.jsonl with every image as a URL on the test server (row i's URL from `replace`)."""
    rows = [json.loads(line) for line in (workspace / "data" / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["image"] = (replace or {}).get(i, f"{server}/{row['image']}").format(server=server, image=row["image"])
    path = workspace / "data" / f"train-urls-{len(replace or {})}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _url_manifest(workspace: Path, train: Path, remote: dict | None) -> Path:
    path = _write_manifest(workspace, f"manifest-{train.stem}-{bool(remote)}.json", OPTIONS, train=str(train))
    if remote is not None:
        path.write_text(json.dumps({**json.loads(path.read_text()), "remote_images": remote}))
    return path


def test_an_audit_over_urls_equals_the_audit_over_files(workspace, finished, server, tmp_path):
    manifest = _url_manifest(workspace, _url_rows(workspace, server), {"allowed_hosts": ["127.0.0.1"]})
    ranked = audit.run_audit(manifest, tmp_path / "urls")
    with ranked.open() as handle, (finished / "ranked.csv").open() as local_handle:
        url_rows, file_rows = list(csv.DictReader(handle)), list(csv.DictReader(local_handle))
    assert [r["id"] for r in url_rows] == [r["id"] for r in file_rows]
    for url_row, file_row in zip(url_rows, file_rows):
        assert url_row["image"].startswith(server)  # the CSV keeps the URL the user gave
        assert {k: v for k, v in url_row.items() if k != "image"} == {k: v for k, v in file_row.items() if k != "image"}
    assert len(list((tmp_path / "urls" / "fetched").rglob("*"))) >= len(url_rows)  # one local copy per image


def test_url_images_are_fetched_into_an_audit_folder_in_a_bucket(workspace, finished, server, s3):
    """The fetched copies live with the audit (in its bucket); later stages read them from there."""
    from ecif_core.folder import AuditFolder

    manifest = _url_manifest(workspace, _url_rows(workspace, server), {"allowed_hosts": ["127.0.0.1"]})
    out = f"s3://{s3.new_bucket()}/urls"
    ranked = audit.run_audit(manifest, out)
    url_rows = list(csv.DictReader(ranked.read_text().splitlines()))
    with (finished / "ranked.csv").open() as handle:
        file_rows = list(csv.DictReader(handle))
    assert [r["id"] for r in url_rows] == [r["id"] for r in file_rows]
    for url_row, file_row in zip(url_rows, file_rows):
        assert {k: v for k, v in url_row.items() if k != "image"} == {k: v for k, v in file_row.items() if k != "image"}
    fetched = [p for p in AuditFolder(out).fetched.rglob("*") if p.is_file()]
    assert len(fetched) >= len(url_rows) and not any(p.name.endswith((".part", ".tmp")) for p in fetched)


def test_bad_urls_are_rejected_rows_and_the_audit_finishes(workspace, server, tmp_path):
    bad = {0: "{server}/slow/{image}", 1: "{server}/big-undeclared.png", 2: "{server}/other-host-redirect/{image}",
           3: "{server}/no-such.png", 4: "http://10.255.255.1/{image}"}
    remote = {"allowed_hosts": ["127.0.0.1"], "timeout_s": 1, "max_bytes": 100_000}
    ranked = audit.run_audit(_url_manifest(workspace, _url_rows(workspace, server, bad), remote), tmp_path / "bad")
    with (tmp_path / "bad" / "rejected.csv").open() as handle:
        reasons = [r["reason"] for r in csv.DictReader(handle)]
    for expected in ("timed out", "too large", "redirects to another host", "HTTP 404", "not in remote_images"):
        assert any(expected in reason for reason in reasons), (expected, reasons)
    assert len(ranked.read_text().splitlines()) - 1 == 64 - len(reasons)


def test_url_images_without_the_opt_in_are_rejected_and_an_all_rejected_audit_says_why(workspace, server, tmp_path):
    manifest = _url_manifest(workspace, _url_rows(workspace, server), None)
    with pytest.raises(ConfigError, match="remote_images opt-in"):
        audit.run_audit(manifest, tmp_path / "no-opt-in")
    assert load_manifest(manifest).remote_images is None
