"""http(s) images, fetched once at prepare time under an explicit policy.

A manifest opts in with `remote_images: {"allowed_hosts": [...], "timeout_s": 10,
"max_bytes": ...}`. Each URL is fetched once into the audit folder, so every later stage
(gradients, report thumbnails) reads the same bytes and a worker never touches the network.
Refused: hosts outside the allowlist, redirects to another host or scheme, bodies over the
byte limit (checked on the header and while reading), and fetches past the deadline.
"""
from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError
from .storage import write_bytes

URL_SCHEMES = ("http://", "https://")
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 16 * 2**20
_READ_CHUNK = 64 * 1024


class FetchError(Exception):
    """An image URL could not be fetched under the policy; the message is the row's reason."""


@dataclass(frozen=True)
class RemoteImages:
    """The manifest's opt-in: which hosts, how long, how many bytes."""

    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)  # "host" or "host:port", lower case
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_BYTES

    def to_json(self) -> dict:
        return {"allowed_hosts": list(self.allowed_hosts), "timeout_s": self.timeout_s, "max_bytes": self.max_bytes}

    def host_problem(self, url: str) -> str | None:
        """Why the URL's host may not be fetched, or None."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if not host:
            return f"image URL has no host: {url}"
        netloc = f"{host}:{parts.port}" if parts.port else host
        if host in self.allowed_hosts or netloc in self.allowed_hosts:
            return None
        return f"image host {netloc} is not in remote_images.allowed_hosts"


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
    return RemoteImages(tuple(h.strip().lower() for h in hosts), float(timeout), max_bytes)


def fetched_path(fetch_dir: Path, url: str) -> Path:
    """Where the bytes of `url` live once fetched (content-addressed by the URL)."""
    digest = hashlib.sha256(url.encode()).hexdigest()
    return fetch_dir / digest[:2] / digest


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme, host and port (no open-redirect hops)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        old, new = urlsplit(req.full_url), urlsplit(newurl)
        if (old.scheme, old.hostname, old.port) != (new.scheme, new.hostname, new.port):
            raise FetchError(f"image URL redirects to another host ({new.scheme}://{new.netloc})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameHostRedirects)


def fetch(url: str, policy: RemoteImages, dest: Path) -> Path:
    """Download `url` to `dest` (atomically) under `policy`; FetchError says why not."""
    problem = policy.host_problem(url)
    if problem:
        raise FetchError(problem)
    deadline = time.monotonic() + policy.timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "ecif-audit"})
    try:
        with _OPENER.open(request, timeout=policy.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise FetchError(f"image URL body too large ({declared} bytes; limit {policy.max_bytes})")
            body = bytearray()
            while chunk := response.read(_READ_CHUNK):
                body += chunk
                if len(body) > policy.max_bytes:
                    raise FetchError(f"image URL body too large (over {policy.max_bytes} bytes)")
                if time.monotonic() > deadline:
                    raise FetchError(f"image URL timed out (over {policy.timeout_s:g} s)")
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        raise FetchError(f"image URL returned HTTP {exc.code}") from exc
    except (TimeoutError, OSError, ValueError) as exc:  # socket timeouts are OSError / TimeoutError
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise FetchError(f"image URL timed out (over {policy.timeout_s:g} s)") from exc
        raise FetchError(f"image URL cannot be fetched ({reason})") from exc
    write_bytes(dest, bytes(body))  # whole, on a disk or in the audit's bucket
    return dest
