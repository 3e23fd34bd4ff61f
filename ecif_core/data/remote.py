"""http(s) images, fetched once at prepare time under an explicit policy.

A manifest opts in with `remote_images: {"allowed_hosts": [...], "timeout_s": 10,
"max_bytes": ...}`. Each URL is fetched once into the audit folder, so every later stage
(gradients, report thumbnails) reads the same bytes and a worker never touches the network.

Refused, each with the row's reason and without contacting anything it refuses:
- hosts outside the allowlist; an entry `host` allows only the scheme's standard port (http 80,
  https 443), `host:port` exactly that port (a bare host once allowed every port: the API's
  /metrics or Redis next to an allowed image server);
- loopback, private, link-local and other non-public addresses (netguard.py), checked after
  the name is resolved on the address actually connected, at every redirect hop, unless the
  host:port is opened explicitly (`private_hosts`: the operator's host:port entries, or in the
  embedded mode, which has no operator, the manifest's own host:port entries);
- redirects to another scheme, host or port, and more than MAX_REDIRECTS of them;
- bodies over the byte limit (checked on the header and while reading);
- anything past `timeout_s`, a deadline for the whole fetch (lookup, connect, TLS, headers,
  body, redirects): a server that sends one byte at a time is cut off when it passes, since a
  socket timeout only bounds each read.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator
from urllib.parse import urljoin, urlsplit, urlunsplit

from ecif_core.data import netguard
from ecif_core.errors import ConfigError
from ecif_core.data.storage import write_bytes

URL_SCHEMES = ("http://", "https://")
DEFAULT_PORTS = {"http": 80, "https": 443}
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 16 * 2**20
MAX_REDIRECTS = 5
_READ_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(Exception):
    """An image URL could not be fetched under the policy; the message is the row's reason."""


def host_entry(text: str) -> tuple[str, int | None]:
    """(host, port or None) of an allowlist entry: `host`, `host:port`, an IPv6 address bare or
    as `[addr]:port`; ValueError otherwise (a URL, a path, a bad port)."""
    text = text.strip().lower()
    port: str | None = None
    if text.startswith("["):
        close = text.find("]")
        host, rest = text[1:close], text[close + 1:]
        if close < 0 or (rest and not rest.startswith(":")):
            raise ValueError(text)
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text  # a name, an IPv4 address or a bare IPv6 address
    if not host or any(c in host for c in "/@?#[] \t"):
        raise ValueError(text)
    if ":" in host:
        ipaddress.IPv6Address(host)
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(text)
    return host, None if port is None else int(port)


def host_key(host: str, port: int | None) -> str:
    """The canonical entry text: `host`, `host:port`, `[v6]:port`."""
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical_entry(text: str) -> str:
    return host_key(*host_entry(text))


def private_opt_ins(entries: Collection[str]) -> frozenset[str]:
    """The entries that may reach a non-public address: only explicit `host:port` ones (a
    bare host is never a reason to fetch from the machine's own network)."""
    out = set()
    for entry in entries:
        try:
            host, port = host_entry(entry)
        except ValueError:
            continue
        if port is not None:
            out.add(host_key(host, port))
    return frozenset(out)


@dataclass(frozen=True)
class RemoteImages:
    """The manifest's opt-in: which hosts, how long, how many bytes."""

    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)  # canonical "host" or "host:port", lower case
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_BYTES

    def to_json(self) -> dict:
        return {"allowed_hosts": list(self.allowed_hosts), "timeout_s": self.timeout_s, "max_bytes": self.max_bytes}

    def host_problem(self, url: str) -> str | None:
        """Why the URL's host and port may not be fetched, or None (nothing is resolved here)."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        scheme = parts.scheme.lower()
        if not host or scheme not in DEFAULT_PORTS:
            return f"image URL has no host: {url}"
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            return f"image URL has a bad port: {url}"
        key = host_key(host, port)
        if key in self.allowed_hosts or (host in self.allowed_hosts and port == DEFAULT_PORTS[scheme]):
            return None
        if host in self.allowed_hosts:
            return (f"image host {key} is not in remote_images.allowed_hosts (the entry {host} allows port "
                    f"{DEFAULT_PORTS[scheme]} for {scheme} only; another port needs an entry {key})")
        return f"image host {key} is not in remote_images.allowed_hosts"


def is_url(image: str) -> bool:
    return image.lower().startswith(URL_SCHEMES)


def remote_images_of(value: object, field_name: str = "remote_images") -> RemoteImages | None:
    """The policy from a manifest value (None: remote images are not allowed)."""
    if value is None:
        return None
    if isinstance(value, RemoteImages):
        return value
    if not isinstance(value, dict):
        raise ConfigError(field_name, "must be an object with allowed_hosts")
    unknown = set(value) - {"allowed_hosts", "timeout_s", "max_bytes"}
    if unknown:
        raise ConfigError(f"{field_name}.{sorted(unknown)[0]}", "unknown field")
    hosts = value.get("allowed_hosts")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h.strip() for h in hosts):
        raise ConfigError(f"{field_name}.allowed_hosts", "must be a non-empty list of host names")
    timeout = value.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 300:
        raise ConfigError(f"{field_name}.timeout_s", "must be a number of seconds in (0, 300]")
    max_bytes = value.get("max_bytes", DEFAULT_MAX_BYTES)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 0 < max_bytes <= 2**30:
        raise ConfigError(f"{field_name}.max_bytes", "must be an integer in [1, 2**30]")
    entries = []
    for host in hosts:
        try:
            entries.append(canonical_entry(host))
        except ValueError:
            raise ConfigError(f"{field_name}.allowed_hosts", f"{host!r} is not a host or host:port "
                              "(no scheme or path; an IPv6 address with a port as [addr]:port)") from None
    return RemoteImages(tuple(entries), float(timeout), max_bytes)


def fetched_path(fetch_dir: Path, url: str) -> Path:
    """Where the bytes of `url` live once fetched (content-addressed by the URL)."""
    digest = hashlib.sha256(url.encode()).hexdigest()
    return fetch_dir / digest[:2] / digest


def fetch(url: str, policy: RemoteImages, dest: Path, private_hosts: Collection[str] = ()) -> Path:
    """Download `url` to `dest` (atomically) under `policy`; FetchError says why not.

    `private_hosts`: canonical `host:port` keys whose addresses may be non-public.
    """
    deadline = time.monotonic() + policy.timeout_s
    try:
        body = _fetch_body(url, policy, deadline, frozenset(private_hosts))
        if time.monotonic() > deadline:  # the watchdog cut the connection: what came is not the image
            raise TimeoutError
    except FetchError:
        raise
    except netguard.AddressRefused as exc:
        raise FetchError(f"{exc}: refused (a non-public address is fetched only from a host:port listed "
                         "explicitly: by the service's ECIF_REMOTE_IMAGE_HOSTS, or in an audit run with ecif "
                         "audit, by remote_images.allowed_hosts)") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:  # socket timeouts are OSError
        if isinstance(exc, TimeoutError) or time.monotonic() > deadline:
            raise FetchError(f"image URL timed out (over {policy.timeout_s:g} s)") from exc
        raise FetchError(f"image URL cannot be fetched ({type(exc).__name__}: {exc})") from exc
    write_bytes(dest, body)  # whole, on a disk or in the audit's bucket
    return dest


def _fetch_body(url: str, policy: RemoteImages, deadline: float, private_hosts: frozenset[str]) -> bytes:
    """The body of `url`, following same-origin redirects; every hop is checked again."""
    for _ in range(MAX_REDIRECTS + 1):
        problem = policy.host_problem(url)
        if problem:
            raise FetchError(problem)
        with _response(url, deadline, private_hosts) as response:
            if response.status in _REDIRECTS:
                url = _redirect_target(url, response.getheader("Location"))
                continue
            if not 200 <= response.status < 300:
                raise FetchError(f"image URL returned HTTP {response.status}")
            return _read_body(response, policy)
    raise FetchError(f"image URL redirects more than {MAX_REDIRECTS} times")


def _redirect_target(url: str, location: str | None) -> str:
    """Follow a redirect only to the same scheme, host and port (no open-redirect hops)."""
    if not location:
        raise FetchError("image URL redirects without a Location")
    new = urljoin(url, location.strip())
    old_parts, new_parts = urlsplit(url), urlsplit(new)
    try:
        same = ((old_parts.scheme, old_parts.hostname, old_parts.port)
                == (new_parts.scheme, new_parts.hostname, new_parts.port))
    except ValueError:  # a bad port in the Location
        same = False
    if not same:
        raise FetchError(f"image URL redirects to another host ({new_parts.scheme}://{new_parts.netloc})")
    return new


def _read_body(response: http.client.HTTPResponse, policy: RemoteImages) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchError(f"image URL body too large ({declared} bytes; limit {policy.max_bytes})")
    body = bytearray()
    while chunk := response.read1(_READ_CHUNK):  # what has arrived, never a wait for a full chunk
        body += chunk
        if len(body) > policy.max_bytes:
            raise FetchError(f"image URL body too large (over {policy.max_bytes} bytes)")
    if response.length:  # the connection ended before the declared length
        raise http.client.IncompleteRead(bytes(body), response.length)
    return bytes(body)


@contextlib.contextmanager
def _response(url: str, deadline: float, private_hosts: frozenset[str]) -> Iterator[http.client.HTTPResponse]:
    """One GET on a connection to a vetted address (netguard.connect), cut at the deadline."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port or DEFAULT_PORTS[scheme]
    sock = netguard.connect(host, port, deadline, allow_private=host_key(host, port) in private_hosts)
    watchdog = _Watchdog(sock, deadline)
    connection = None
    try:
        if scheme == "https":  # SNI and certificate checked against the URL's host name
            sock = _tls_context().wrap_socket(sock, server_hostname=host)
        connection = _Connection(host, port, sock, DEFAULT_PORTS[scheme])
        target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection.request("GET", target, headers={"User-Agent": "ecif-audit", "Accept-Encoding": "identity"})
        yield connection.getresponse()
    finally:
        watchdog.stop()
        (connection or sock).close()


class _Connection(http.client.HTTPConnection):
    """http.client over a socket already connected (to the vetted address); the Host header
    still names the URL's host. It never opens a connection of its own."""

    def __init__(self, host: str, port: int, sock: socket.socket, default_port: int) -> None:
        super().__init__(host, port)
        self.default_port = default_port  # Host: without the port when it is the scheme's own
        self.sock = sock

    def connect(self) -> None:
        raise http.client.NotConnected("the vetted connection was closed")


class _Watchdog:
    """Shuts the connection down at the deadline, whatever it is waiting for (TLS handshake, a
    header line, the body); a socket timeout alone restarts with every byte that arrives."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._spare = sock.dup()  # the same connection, still valid after TLS wraps `sock`
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        with self._lock:
            with contextlib.suppress(OSError):
                self._spare.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._spare.close()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()
