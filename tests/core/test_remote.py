"""http(s) images through a real HTTP server on 127.0.0.1: the opt-in, the host allowlist and
its ports, non-public addresses, the whole-fetch deadline, size limits and redirects, and an
audit over URLs equal to the one over files.

The image server is on a loopback address, so every fetch from it goes through the explicit
host:port opt-in (the operator's, or in the embedded mode the manifest's own). A canary server
records every connection: in each refused case it must never have been contacted."""
import csv
import json
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ecif_core.errors import ConfigError
from ecif_core.data.manifest import load_manifest
from ecif_core.data import netguard
from ecif_core.data.remote import FetchError, RemoteImages, fetch, remote_images_of
from services.embedded import run_audit
from tests.core.test_audit import OPTIONS, _write_manifest, finished, workspace  # noqa: F401  (fixtures)

SLOW_SECONDS = 3.0
BIG_BYTES = 200_000
DRIP_BYTES, DRIP_INTERVAL = 100, 0.2  # 20 s of a server sending one byte at a time


class _Handler(SimpleHTTPRequestHandler):
    """Files under the served folder, plus a few misbehaving endpoints."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        port = self.server.server_address[1]
        self.server.hosts.append(self.headers.get("Host"))
        if self.path.startswith("/drip-body"):  # headers at once, then the body a byte at a time
            self.send_response(200)
            self.send_header("Content-Length", str(DRIP_BYTES))
            self.end_headers()
            self._drip(b"\0" * DRIP_BYTES)
            return
        if self.path.startswith("/drip-headers"):  # even the status line a byte at a time
            self._drip(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n" + b"X-Pad: " + b"a" * DRIP_BYTES)
            return
        if self.path.startswith("/redirect-to/"):  # /redirect-to/<port>/<path>: the same host, another port
            other, rest = self.path[len("/redirect-to/"):].split("/", 1)
            self._send(302, {"Location": f"http://127.0.0.1:{other}/{rest}"}, b"")
            return
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

    def _drip(self, data: bytes) -> None:
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(DRIP_INTERVAL)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up at its deadline

    def _send(self, code: int, headers: dict, body: bytes) -> None:
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep test output clean
        pass


class _Recording(ThreadingHTTPServer):
    """Counts every connection it accepts (not only complete requests) and the Host headers."""

    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.connections, self.hosts = 0, []

    def get_request(self):
        request = super().get_request()
        self.connections += 1
        return request


def _serve(handler, address: str = "127.0.0.1", port: int = 0) -> _Recording:
    httpd = _Recording((address, port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture(scope="module")
def httpd(workspace):
    httpd = _serve(lambda *a, **k: _Handler(*a, directory=str(workspace / "data"), **k))
    yield httpd
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(httpd):
    return f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.fixture
def canary(workspace):
    """A server nothing may reach: every refused fetch below is aimed at it."""
    httpd = _serve(lambda *a, **k: _Handler(*a, directory=str(workspace / "data"), **k))
    yield httpd
    httpd.shutdown()


def _key(url: str) -> str:
    return url.split("://", 1)[1]


@pytest.fixture(scope="module")
def policy(server):
    """The server's exact host:port: the only kind of entry that may open a loopback address."""
    return RemoteImages(allowed_hosts=(_key(server),), timeout_s=1.0, max_bytes=100_000)


def _first_image(workspace: Path) -> str:
    return json.loads((workspace / "data" / "train.jsonl").read_text().splitlines()[0])["image"]


def test_fetch_writes_the_body_and_follows_a_same_host_redirect(server, policy, workspace, tmp_path):
    image = _first_image(workspace)
    expected = (workspace / "data" / image).read_bytes()
    opened = {_key(server)}
    assert fetch(f"{server}/{image}", policy, tmp_path / "a", opened).read_bytes() == expected
    assert fetch(f"{server}/same-host-redirect/{image}", policy, tmp_path / "b", opened).read_bytes() == expected


@pytest.mark.parametrize("path, reason", [
    ("/slow/{image}", "timed out"),
    ("/big-declared.png", "too large (200000 bytes; limit 100000)"),
    ("/big-undeclared.png", "too large (over 100000 bytes)"),
    ("/other-host-redirect/{image}", "redirects to another host"),
    ("/no-such.png", "HTTP 404"),
])
def test_fetch_refusals_say_why_and_leave_no_file(server, policy, workspace, tmp_path, path, reason):
    dest = tmp_path / "out"
    started = time.monotonic()
    with pytest.raises(FetchError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        fetch(server + path.format(image=_first_image(workspace)), policy, dest, {_key(server)})
    assert time.monotonic() - started < SLOW_SECONDS  # the timeout, not the server, ended the slow one
    assert not dest.exists() and not list(tmp_path.iterdir())


def test_a_host_outside_the_allowlist_is_not_contacted(policy, tmp_path):
    with pytest.raises(FetchError, match="not in remote_images.allowed_hosts"):
        fetch("http://10.255.255.1/x.png", policy, tmp_path / "x")


@pytest.mark.parametrize("value, field", [
    ({"allowed_hosts": []}, "remote_images.allowed_hosts"),
    ({"allowed_hosts": ["a"], "timeout_s": 0}, "remote_images.timeout_s"),
    ({"allowed_hosts": ["a"], "max_bytes": -1}, "remote_images.max_bytes"),
    ({"allowed_hosts": ["a"], "proxy": "x"}, "remote_images.proxy"),
    ({"allowed_hosts": ["http://a.org/"]}, "remote_images.allowed_hosts"),  # a URL never matched a host
    ({"allowed_hosts": ["a.org:0"]}, "remote_images.allowed_hosts"),
    ({"allowed_hosts": ["a.org:http"]}, "remote_images.allowed_hosts"),
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
    manifest = _url_manifest(workspace, _url_rows(workspace, server), {"allowed_hosts": [_key(server)]})
    ranked = run_audit(manifest, tmp_path / "urls")
    with ranked.open() as handle, (finished / "ranked.csv").open() as local_handle:
        url_rows, file_rows = list(csv.DictReader(handle)), list(csv.DictReader(local_handle))
    assert [r["id"] for r in url_rows] == [r["id"] for r in file_rows]
    for url_row, file_row in zip(url_rows, file_rows):
        assert url_row["image"].startswith(server)  # the CSV keeps the URL the user gave
        assert {k: v for k, v in url_row.items() if k != "image"} == {k: v for k, v in file_row.items() if k != "image"}
    assert len(list((tmp_path / "urls" / "fetched").rglob("*"))) >= len(url_rows)  # one local copy per image


def test_url_images_are_fetched_into_an_audit_folder_in_a_bucket(workspace, finished, server, s3):
    """The fetched copies live with the audit (in its bucket); later stages read them from there."""
    from ecif_core.data.folder import AuditFolder

    manifest = _url_manifest(workspace, _url_rows(workspace, server), {"allowed_hosts": [_key(server)]})
    out = f"s3://{s3.new_bucket()}/urls"
    ranked = run_audit(manifest, out)
    url_rows = list(csv.DictReader(ranked.read_text().splitlines()))
    with (finished / "ranked.csv").open() as handle:
        file_rows = list(csv.DictReader(handle))
    assert [r["id"] for r in url_rows] == [r["id"] for r in file_rows]
    for url_row, file_row in zip(url_rows, file_rows):
        assert {k: v for k, v in url_row.items() if k != "image"} == {k: v for k, v in file_row.items() if k != "image"}
    fetched = [p for p in AuditFolder(out).fetched.rglob("*") if p.is_file()]
    assert len(fetched) >= len(url_rows) and not any(p.name.endswith((".part", ".tmp")) for p in fetched)


def test_bad_urls_are_rejected_rows_and_the_audit_finishes(workspace, server, canary, tmp_path):
    """Each bad URL is its row's reason (the slow-drip one cut at the deadline); the audit goes on."""
    other = canary.server_address[1]
    bad = {0: ("{server}/slow/{image}", "timed out"), 1: ("{server}/big-undeclared.png", "too large"),
           2: ("{server}/other-host-redirect/{image}", "redirects to another host"),
           3: ("{server}/no-such.png", "HTTP 404"), 4: ("http://10.255.255.1/{image}", "not in remote_images"),
           5: ("{server}/drip-body/{image}", "timed out (over 1 s)"),
           6: (f"http://127.0.0.1:{other}/{{image}}", "not in remote_images"),
           7: (f"{{server}}/redirect-to/{other}/{{image}}", "redirects to another host")}
    remote = {"allowed_hosts": [_key(server)], "timeout_s": 1, "max_bytes": 100_000}
    train = _url_rows(workspace, server, {i: url for i, (url, _) in bad.items()})
    ids = [json.loads(line)["id"] for line in train.read_text().splitlines()]
    ranked = run_audit(_url_manifest(workspace, train, remote), tmp_path / "bad")
    with (tmp_path / "bad" / "rejected.csv").open() as handle:
        reasons = {r["id"]: r["reason"] for r in csv.DictReader(handle)}
    for i, (_, expected) in bad.items():
        assert expected in reasons.get(ids[i], ""), (i, expected, reasons)
    assert len(ranked.read_text().splitlines()) - 1 == 64 - len(reasons)
    assert canary.connections == 0
    prepare = json.loads((tmp_path / "bad" / "timing.json").read_text())["prepare"]
    assert prepare < DRIP_BYTES * DRIP_INTERVAL / 2, prepare  # cut at its deadline, not after the last byte


def test_url_images_without_the_opt_in_are_rejected_and_an_all_rejected_audit_says_why(workspace, server, tmp_path):
    manifest = _url_manifest(workspace, _url_rows(workspace, server), None)
    with pytest.raises(ConfigError, match="remote_images opt-in"):
        run_audit(manifest, tmp_path / "no-opt-in")
    assert load_manifest(manifest).remote_images is None


# ---------------------------------------------------------------- ports, addresses, deadline

@pytest.mark.parametrize("entries, url, allowed", [
    (("a.org",), "http://a.org/x.png", True),
    (("a.org",), "https://a.org/x.png", True),
    (("a.org",), "http://a.org:80/x.png", True),
    (("a.org",), "http://a.org:8080/x.png", False),  # a bare host once allowed every port
    (("a.org",), "http://a.org:443/x.png", False),  # the scheme's own port only
    (("a.org",), "https://a.org:6379/x.png", False),
    (("a.org:8080",), "http://a.org:8080/x.png", True),
    (("a.org:8080",), "http://a.org/x.png", False),
    (("[::1]:8080",), "http://[::1]:8080/x.png", True),
])
def test_a_host_entry_without_a_port_allows_the_standard_port_only(entries, url, allowed):
    problem = RemoteImages(allowed_hosts=entries).host_problem(url)
    assert (problem is None) == allowed, problem


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.0.0.2", "::1", "10.0.0.1", "172.16.5.4", "192.168.0.1", "fc00::1", "fd00:ec2::254",
    "169.254.169.254", "fe80::1", "fe80::1%eth0", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "240.0.0.1",
    "100.64.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "64:ff9b::a9fe:a9fe",
    "2002:7f00:1::1",
])
def test_non_public_addresses_are_refused_in_every_form(address):
    assert netguard.address_problem(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111",
                                     "64:ff9b::808:808", "::ffff:8.8.8.8", "2002:808:808::1"])
def test_public_addresses_are_allowed(address):
    """IPv6 forms of a public IPv4 address too: a DNS64 network gives every IPv4-only host a NAT64 address."""
    assert netguard.address_problem(address) is None


REFUSED = {  # name: (allowed_hosts, url, opened host:port keys, reason); {c}: the canary's port, {s}: the server's
    "another port of a bare host": (["127.0.0.1"], "http://127.0.0.1:{c}/x.png", [], "allows port 80 for http only"),
    "localhost resolves to loopback": (["localhost:{c}"], "http://localhost:{c}/x.png", [], "loopback address"),
    "a loopback address": (["127.0.0.1:{c}"], "http://127.0.0.1:{c}/x.png", [], "loopback address"),
    # the second spelling is the one the old allowlist compared; the address is what refuses it now
    "an IPv4-mapped loopback": (["[::ffff:127.0.0.1]:{c}", "::ffff:127.0.0.1:{c}"],
                                "http://[::ffff:127.0.0.1]:{c}/x.png", [], "loopback address"),
    "opened on another port": (["127.0.0.1:{c}", "127.0.0.1:{s}"], "http://127.0.0.1:{c}/x.png", ["127.0.0.1:{s}"],
                               "loopback address"),
    "a redirect to another port": (["127.0.0.1:{s}"], "http://127.0.0.1:{s}/redirect-to/{c}/x.png",
                                   ["127.0.0.1:{s}"], "redirects to another host"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_fetches_never_contact_anything(case, httpd, canary, tmp_path):
    entries, url, opened, reason = REFUSED[case]
    ports = {"c": canary.server_address[1], "s": httpd.server_address[1]}
    policy = RemoteImages(allowed_hosts=tuple(e.format(**ports) for e in entries), timeout_s=2.0)
    args = (url.format(**ports), policy, tmp_path / "x") + ((set(o.format(**ports) for o in opened),) if opened else ())
    with pytest.raises(FetchError, match=reason):
        fetch(*args)
    assert canary.connections == 0 and not (tmp_path / "x").exists()


def test_a_loopback_host_is_fetched_when_its_host_port_is_opened(canary, workspace, tmp_path):
    """The operator's (or the embedded user's) explicit host:port is the one way to a local server."""
    image, port = _first_image(workspace), canary.server_address[1]
    policy = RemoteImages(allowed_hosts=(f"localhost:{port}",))
    fetch(f"http://localhost:{port}/{image}", policy, tmp_path / "x", {f"localhost:{port}"})
    assert (tmp_path / "x").read_bytes() == (workspace / "data" / image).read_bytes()
    assert canary.hosts == [f"localhost:{port}"]


@pytest.mark.parametrize("path", ["/drip-body/x.png", "/drip-headers/x.png"])
def test_the_timeout_is_a_deadline_for_the_whole_fetch(server, policy, tmp_path, path):
    """A server sending one byte per 0.2 s never trips a per-read timeout; the deadline cuts it."""
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"timed out \(over 1 s\)"):
        fetch(server + path, policy, tmp_path / "x", {_key(server)})
    elapsed = time.monotonic() - started
    assert policy.timeout_s <= elapsed < policy.timeout_s + 0.5, elapsed  # not DRIP_BYTES * DRIP_INTERVAL
    assert not (tmp_path / "x").exists()


@pytest.fixture
def rebinding(httpd, workspace, monkeypatch):
    """`rebind.test` resolves to 127.0.0.1 (the image server) the first time and to 127.0.0.2 (a
    canary on the same port) after that, and 127.0.0.1 counts as public: no local address is
    public, so this stands for a public answer followed by a private one (DNS rebinding)."""
    port = httpd.server_address[1]
    other = _serve(lambda *a, **k: _Handler(*a, directory=str(workspace / "data"), **k), "127.0.0.2", port)
    answers, real_resolve, real_problem = [], socket.getaddrinfo, netguard.address_problem

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real_resolve(host, port, *args, **kwargs)
        answers.append("127.0.0.1" if not answers else "127.0.0.2")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (answers[-1], port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(netguard, "address_problem", lambda a: None if str(a) == "127.0.0.1" else real_problem(a))
    yield f"http://rebind.test:{port}", other, answers
    other.shutdown()
    other.server_close()


def test_the_address_connected_is_the_address_checked(rebinding, httpd, workspace, tmp_path):
    """Resolved once, checked, connected to that address with the URL's Host header: a second
    lookup could answer differently."""
    base, other, answers = rebinding
    image = _first_image(workspace)
    policy = RemoteImages(allowed_hosts=(_key(base),))
    assert fetch(f"{base}/{image}", policy, tmp_path / "x").read_bytes() == (workspace / "data" / image).read_bytes()
    assert other.connections == 0 and answers == ["127.0.0.1"] and httpd.hosts[-1] == _key(base)


def test_every_redirect_hop_is_checked_again(rebinding, workspace, tmp_path):
    """A same-host redirect whose name now resolves to a private address is refused at that hop."""
    base, other, answers = rebinding
    policy = RemoteImages(allowed_hosts=(_key(base),))
    with pytest.raises(FetchError, match="loopback address"):
        fetch(f"{base}/same-host-redirect/{_first_image(workspace)}", policy, tmp_path / "x")
    assert other.connections == 0 and answers == ["127.0.0.1", "127.0.0.2"]


def _self_signed(name: str, folder: Path) -> tuple[Path, Path]:
    """A certificate for `name` and its key (PEM files), signed by itself."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_goes_to_the_vetted_address_with_the_url_host_name_for_sni_and_certificate(
        workspace, tmp_path, monkeypatch):
    """https over the pinned socket: SNI, the certificate check and the Host header all use the
    URL's host name, not the address it was connected to."""
    import ssl

    from ecif_core.data import remote

    cert, key = _self_signed("images.test", tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    names = []
    server_context.sni_callback = lambda sock, name, context: names.append(name)
    httpd = _serve(lambda *a, **k: _Handler(*a, directory=str(workspace / "data"), **k))
    httpd.socket = server_context.wrap_socket(httpd.socket, server_side=True)
    port, real_resolve = httpd.server_address[1], socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real_resolve(
        "127.0.0.1" if host == "images.test" else host, *a, **k))
    try:
        image, url = _first_image(workspace), f"https://images.test:{port}/{_first_image(workspace)}"
        policy, opened = RemoteImages(allowed_hosts=(f"images.test:{port}",)), {f"images.test:{port}"}
        with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):  # verified: not trusted by default
            fetch(url, policy, tmp_path / "untrusted", opened)
        monkeypatch.setattr(remote, "_tls_context", lambda: ssl.create_default_context(cafile=str(cert)))
        fetch(url, policy, tmp_path / "x", opened)
        assert (tmp_path / "x").read_bytes() == (workspace / "data" / image).read_bytes()
        assert names == ["images.test", "images.test"] and httpd.hosts == [f"images.test:{port}"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_tls_handshake_that_never_comes_is_cut_at_the_deadline(tmp_path):
    listening = socket.create_server(("127.0.0.1", 0))  # connections queue in the backlog, nothing answers
    key = f"127.0.0.1:{listening.getsockname()[1]}"
    started = time.monotonic()
    try:
        with pytest.raises(FetchError, match=r"timed out \(over 1 s\)"):
            fetch(f"https://{key}/x.png", RemoteImages(allowed_hosts=(key,), timeout_s=1.0), tmp_path / "x", {key})
    finally:
        listening.close()
    assert time.monotonic() - started < 1.5
