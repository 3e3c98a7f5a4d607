"""The client behind trusted reverse proxies: its address and the scheme it used.

The ASGI scope contains the TCP peer. When that peer is one of ``MYCLOUD_TRUSTED_PROXIES``,
the client is the right-most ``X-Forwarded-For`` address that is not itself a trusted
proxy: each proxy appends the address it received the request from, so entries to the
left of the last untrusted one can be forged by the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _is_trusted(host: str, networks: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def peer_address(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def peer_is_trusted(scope: dict[str, Any], networks: Sequence[Network]) -> bool:
    """Check whether the TCP peer is a trusted proxy whose X-Forwarded-* headers count."""
    return bool(networks) and _is_trusted(peer_address(scope), networks)


def client_address(scope: dict[str, Any], networks: Sequence[Network]) -> str:
    """Return the address of the client, looking through trusted proxies only."""
    peer = peer_address(scope)
    if not peer_is_trusted(scope, networks):
        return peer
    # Proxies that add a header line of their own (HAProxy's "option forwardfor") put it
    # after the client's. Read together, the lines form one list (RFC 9110, section 5.3).
    forwarded = ",".join(
        bytes(value).decode("latin-1")
        for key, value in scope.get("headers", ())
        if key == b"x-forwarded-for"
    )
    if not forwarded:
        return peer
    hops = [hop.strip() for hop in forwarded.split(",")]
    for hop in reversed(hops):
        if not _is_trusted(hop, networks):
            # Not an address at all: the proxy chain is broken, so count the peer.
            return hop if _is_address(hop) else peer
    # Every hop is a trusted proxy: the left-most one sent the request.
    return hops[0] or peer


def forwarded_proto(scope: dict[str, Any], networks: Sequence[Network]) -> str:
    """Return the scheme the client used: X-Forwarded-Proto from a trusted proxy, else the scope's."""
    scheme = str(scope.get("scheme", "http"))
    if peer_is_trusted(scope, networks):
        header = _header(scope, b"x-forwarded-proto")
        first = header.split(",", 1)[0].strip().lower() if header else ""
        if first in ("http", "https"):
            return first
    return scheme


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
