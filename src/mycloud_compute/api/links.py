"""Absolute pagination links (``self``, ``next``, ``previous``) for list responses."""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from litestar import Request

from mycloud_compute.api.schemas import PageLinks, PageMeta
from mycloud_compute.services.listing import ListQuery, QueryFilter
from mycloud_compute.settings import Settings

_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
# Kept readable in links; both are legal in a query string.
_SAFE_CHARACTERS = "*,"


def _first(value: str | None) -> str | None:
    return value.split(",", 1)[0].strip() if value else None


def _is_trusted_proxy(request: Request[Any, Any, Any], settings: Settings) -> bool:
    networks = settings.trusted_proxy_networks
    if not networks or request.client is None:
        return False
    try:
        address = ipaddress.ip_address(request.client.host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def origin(request: Request[Any, Any, Any], settings: Settings) -> str:
    """Return the scheme and host that links start with.

    The configured public URL wins. Otherwise the request's own scheme and Host,
    with X-Forwarded-Proto/X-Forwarded-Host honoured only from trusted proxies.
    A Host that is not a plain host[:port] is replaced by the server's address,
    so a forged header cannot inject text into links.
    """
    if settings.public_url:
        return settings.public_url
    scheme = request.scope.get("scheme", "http")
    host = request.headers.get("host")
    if _is_trusted_proxy(request, settings):
        forwarded_proto = _first(request.headers.get("x-forwarded-proto"))
        forwarded_host = _first(request.headers.get("x-forwarded-host"))
        if forwarded_proto in ("http", "https"):
            scheme = forwarded_proto
        if forwarded_host:
            host = forwarded_host
    if not host or not _HOST.match(host):
        server = request.scope.get("server") or ("localhost", None)
        host = server[0] if server[1] in (None, 80, 443) else f"{server[0]}:{server[1]}"
    return f"{scheme}://{host}"


def _url(base: str, limit: int, marker: uuid.UUID | None, filters: list[tuple[str, str]]) -> str:
    params: list[tuple[str, str]] = [("limit", str(limit))]
    if marker is not None:
        params.append(("marker", str(marker)))
    params.extend(filters)
    return f"{base}?{urlencode(params, safe=_SAFE_CHARACTERS, quote_via=quote)}"


def page_links(
    request: Request[Any, Any, Any],
    settings: Settings,
    query: ListQuery,
    declared: Sequence[QueryFilter],
    *,
    last_id: uuid.UUID | None,
    has_more: bool,
    previous_marker: uuid.UUID | None,
    previous_is_first: bool,
) -> PageLinks:
    base = origin(request, settings) + request.scope["path"]
    filters = [(item.name, query.raw[item.name]) for item in declared if item.name in query.raw]
    self_url = _url(base, query.limit, query.marker, filters)
    next_url = _url(base, query.limit, last_id, filters) if has_more and last_id else None
    previous_url = None
    if query.marker is not None:
        previous_url = _url(base, query.limit, None if previous_is_first else previous_marker, filters)
    return PageLinks(self=self_url, next=next_url, previous=previous_url)


def page_meta(total: int, limit: int, last_id: uuid.UUID | None, has_more: bool) -> PageMeta:
    return PageMeta(total=total, limit=limit, marker=last_id, has_more=has_more)


class ListPage(Protocol):
    """The shape shared by the services' list results: rows with ids and paging facts."""

    @property
    def rows(self) -> Sequence[Any]: ...
    @property
    def total(self) -> int: ...
    @property
    def has_more(self) -> bool: ...
    @property
    def previous_marker(self) -> uuid.UUID | None: ...
    @property
    def previous_is_first(self) -> bool: ...


def page_envelope(
    request: Request[Any, Any, Any],
    settings: Settings,
    query: ListQuery,
    declared: Sequence[QueryFilter],
    page: ListPage,
) -> tuple[PageMeta, PageLinks]:
    """Build the ``meta`` and ``links`` of a list response from a service's page."""
    return envelope(
        request,
        settings,
        query,
        declared,
        total=page.total,
        last_id=page.rows[-1].id if page.rows else None,
        has_more=page.has_more,
        previous_marker=page.previous_marker,
        previous_is_first=page.previous_is_first,
    )


def envelope(
    request: Request[Any, Any, Any],
    settings: Settings,
    query: ListQuery,
    declared: Sequence[QueryFilter],
    *,
    total: int,
    last_id: uuid.UUID | None,
    has_more: bool,
    previous_marker: uuid.UUID | None,
    previous_is_first: bool,
) -> tuple[PageMeta, PageLinks]:
    """Build the ``meta`` and ``links`` of a list response from the paging facts."""
    meta = page_meta(total, query.limit, last_id, has_more)
    links = page_links(
        request,
        settings,
        query,
        declared,
        last_id=last_id,
        has_more=has_more,
        previous_marker=previous_marker,
        previous_is_first=previous_is_first,
    )
    return meta, links
