"""Which network addresses an image fetch may connect to, and connecting only to a vetted one.

A host name is resolved once, every address is checked, and the socket is connected to the
checked address itself (never to the name again), so a DNS answer that changes between the
check and the connect (rebinding) cannot lead the fetch to an internal service. The peer
address of the connected socket is checked once more before a byte is sent.

Refused unless the caller opens them for this host:port: loopback, private (RFC 1918,
fc00::/7), shared (100.64/10), link-local (169.254/16, fe80::/10: cloud metadata such as
169.254.169.254 and fd00:ec2::254), unspecified, multicast and reserved addresses, also when
written as IPv4-mapped, NAT64 or 6to4 IPv6 forms of such an IPv4 address.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Union

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(Exception):
    """The host's addresses are not ones an image may be fetched from; the message says why."""


def address_problem(address: str | Address) -> str | None:
    """Why an image may not be fetched from `address` (without an opt-in), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    # An IPv6 form carrying an IPv4 address (mapped, NAT64, 6to4) reaches that IPv4 address, so
    # it alone decides: the IPv6 prefixes themselves count as reserved, and a DNS64 network
    # would otherwise refuse every public image.
    embedded = _embedded_ipv4(ip)
    for candidate in ((embedded,) if embedded is not None else (ip,)):
        for kind, test in (("loopback", candidate.is_loopback), ("link-local", candidate.is_link_local),
                           ("unspecified", candidate.is_unspecified), ("multicast", candidate.is_multicast),
                           ("private", candidate.is_private), ("reserved", candidate.is_reserved)):
            if test:
                return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address ({ip})"
        if not candidate.is_global:
            return f"a non-public address ({ip})"
    return None


def _embedded_ipv4(ip: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, NAT64, 6to4): the one really reached."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def resolve(host: str, port: int, timeout: float) -> list[tuple]:
    """getaddrinfo's TCP answers for host:port, within `timeout` seconds (a resolver that hangs
    would otherwise hold the fetch past its deadline: the lookup runs in a daemon thread)."""
    result: dict[str, object] = {}

    def lookup() -> None:
        try:
            result["answers"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            result["error"] = exc

    thread = threading.Thread(target=lookup, name="ecif-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise socket.timeout(f"resolving {host} took too long")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["answers"]  # type: ignore[return-value]


def connect(host: str, port: int, deadline: float, allow_private: bool) -> socket.socket:
    """A socket connected to a vetted address of host:port (resolved once, here), by the
    `deadline` (time.monotonic()); socket.timeout past it.

    `allow_private`: the operator opened this exact host:port (e.g. a local image server).
    Raises AddressRefused when no address of the host may be used, OSError when none answers.
    """
    answers = resolve(host, port, _left(deadline))
    refused, last_error = [], None
    for family, kind, proto, _, sockaddr in answers:
        problem = None if allow_private else address_problem(sockaddr[0])
        if problem:
            refused.append(problem)
            continue
        try:
            sock = socket.socket(family, kind, proto)  # a family the kernel lacks: try the next address
        except OSError as exc:
            last_error = exc
            continue
        try:
            sock.settimeout(_left(deadline))
            sock.connect(sockaddr)  # the checked address, not the name: no second lookup
            peer = sock.getpeername()[0]
            problem = None if allow_private else address_problem(peer)
            if problem:  # cannot happen unless the kernel routed elsewhere: checked on what is connected
                raise AddressRefused(f"image host {host} connected to {problem}")
            return sock
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            last_error = exc
    if last_error is not None:
        raise last_error
    raise AddressRefused(f"image host {host} resolves to {refused[0] if refused else 'no address'}")


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("deadline passed")
    return left
