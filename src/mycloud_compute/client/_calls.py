"""Request descriptions and response parsing shared by Client and AsyncClient.

Every SDK method first builds a ``Call``: method, path, query, body, headers and
the function that decodes a successful response. The two clients only send calls
and sleep between retries, so the rules here exist once for both.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import msgspec

from mycloud_compute.client._exceptions import InstanceFailed, api_error_class
from mycloud_compute.client._models import Action, Instance, Page, PageLinks, PageMeta

ResultT = TypeVar("ResultT")
ItemT = TypeVar("ItemT")

# Methods that a retry after a connection error cannot apply twice.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "DELETE"})
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class Call(Generic[ResultT]):
    """One API request and the decoder of its successful response body."""

    method: str
    path: str
    decode: Callable[[bytes], ResultT]
    params: Mapping[str, str] = field(default_factory=dict)
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def retries_connection_errors(self) -> bool:
        """Whether a retry after a connection error cannot apply the request twice."""
        return self.method in IDEMPOTENT_METHODS or "Idempotency-Key" in self.headers


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a request again.

    429 and 503 responses are retried for every method, because the server did not
    act on them. Connection errors are retried only for calls whose
    ``retries_connection_errors`` is true. Delays grow as ``backoff`` seconds times
    2 to the attempt number, up to ``max_backoff``, with up to 50 % random jitter.
    A ``Retry-After`` header replaces that delay, capped at ``max_retry_after``.
    """

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def delay_after_response(self, attempt: int, response: httpx.Response) -> float | None:
        """Return the seconds to wait before retrying ``response``, or None to stop."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return self.backoff_delay(attempt)

    def delay_after_error(self, attempt: int, call: Call[Any]) -> float | None:
        """Return the seconds to wait after a connection error, or None to stop."""
        if not call.retries_connection_errors or attempt >= self.max_retries:
            return None
        return self.backoff_delay(attempt)

    def backoff_delay(self, attempt: int) -> float:
        delay = min(self.backoff * 2.0**attempt, self.max_backoff)
        return delay * (1 + random.random() / 2)


def parse_retry_after(value: str | None) -> float | None:
    """Parse a Retry-After header: delay seconds or an HTTP date (RFC 9110)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def raise_for_error(response: httpx.Response) -> None:
    """Raise the APIError subclass of an error response; do nothing on 2xx."""
    if response.is_success:
        return
    request_id = response.headers.get("X-Request-Id")
    try:
        error = msgspec.json.decode(response.content, type=dict[str, Any])["error"]
        raise api_error_class(response.status_code)(
            status=int(error.get("code", response.status_code)),
            type=str(error.get("type", "unknown")),
            message=str(error.get("message", response.reason_phrase)),
            request_id=error.get("request_id", request_id),
            details=error.get("details"),
        )
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
        # A proxy in front of the API, or uvicorn itself, returned an error without the JSON envelope.
        text = response.text.strip()[:200] or response.reason_phrase
        raise api_error_class(response.status_code)(
            status=response.status_code, type="unknown", message=text, request_id=request_id
        ) from None


def decode_response(call: Call[ResultT], response: httpx.Response) -> ResultT:
    raise_for_error(response)
    return call.decode(response.content)


def decode_nothing(_content: bytes) -> None:
    return None


def model_decoder(model: type[ResultT]) -> Callable[[bytes], ResultT]:
    decoder = msgspec.json.Decoder(model)
    return decoder.decode


def page_decoder(key: str, model: type[ItemT]) -> Callable[[bytes], Page[ItemT]]:
    """Decode a list response ``{key: [...], "meta": ..., "links": ...}`` into a Page."""
    items_decoder = msgspec.json.Decoder(list[model])  # type: ignore[valid-type]

    def decode(content: bytes) -> Page[ItemT]:
        parts = msgspec.json.decode(content, type=dict[str, msgspec.Raw])
        return Page(
            items=items_decoder.decode(parts[key]),
            meta=msgspec.json.decode(parts["meta"], type=PageMeta),
            links=msgspec.json.decode(parts["links"], type=PageLinks),
        )

    return decode


def query_of(link: str) -> dict[str, str]:
    """Return the query parameters of a ``links.next`` URL.

    The SDK sends them to its own base URL instead of following the link's origin,
    so the token never goes to a host the caller did not configure.
    """
    return dict(parse_qsl(urlsplit(link).query, keep_blank_values=True))


def list_params(filters: Mapping[str, Any], limit: int | None, marker: str | None) -> dict[str, str]:
    """Turn keyword filters into query parameters: lists join with commas, None is left out."""
    params: dict[str, str] = {}
    if limit is not None:
        params["limit"] = str(limit)
    if marker is not None:
        params["marker"] = marker
    for name, value in filters.items():
        if value is None:
            continue
        if isinstance(value, list | tuple | set | frozenset):
            params[name] = ",".join(str(item) for item in value)
        else:
            params[name] = str(value)
    return params


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class CollectionCalls(Generic[ItemT]):
    """Calls of one resource collection: ``GET/POST path`` and ``GET/DELETE path/{id}``."""

    path: str
    key: str
    model: type[ItemT]
    # Only routes that honour Idempotency-Key get one, because only there is a
    # create safe to send again after a connection error.
    idempotent_create: bool = False

    def list_page(self, filters: Mapping[str, Any], limit: int | None, marker: str | None) -> Call[Page[ItemT]]:
        return Call("GET", self.path, page_decoder(self.key, self.model), params=list_params(filters, limit, marker))

    def next_page(self, page: Page[ItemT]) -> Call[Page[ItemT]] | None:
        if page.links.next is None:
            return None
        return Call("GET", self.path, page_decoder(self.key, self.model), params=query_of(page.links.next))

    def get(self, item_id: str) -> Call[ItemT]:
        return Call("GET", self.item_path(item_id), model_decoder(self.model))

    def create(self, body: Mapping[str, Any], idempotency_key: str | None = None) -> Call[ItemT]:
        headers = {}
        if self.idempotent_create:
            headers["Idempotency-Key"] = idempotency_key or new_idempotency_key()
        return Call("POST", self.path, model_decoder(self.model), json=dict(body), headers=headers)

    def delete(self, item_id: str) -> Call[None]:
        return Call("DELETE", self.item_path(item_id), decode_nothing)

    def item_path(self, item_id: str) -> str:
        return f"{self.path}/{quote(item_id, safe='')}"


def without_none(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def action_call(instance_id: str, action: str, body: Mapping[str, Any] | None = None) -> Call[Action]:
    path = f"/v1/instances/{quote(instance_id, safe='')}/actions/{action}"
    return Call("POST", path, model_decoder(Action), json=dict(body) if body is not None else {})


def wait_result(instance: Instance, status: str) -> Instance | None:
    """Return the instance once it is in ``status`` with no task running, else None.

    Raises InstanceFailed when it went to ERROR and ERROR is not what the caller waits for.
    """
    if instance.status == status and instance.task_state is None:
        return instance
    if instance.status == "ERROR" and status != "ERROR":
        message = instance.fault.message if instance.fault else "no fault recorded"
        raise InstanceFailed(f"instance {instance.id} went to ERROR: {message}", instance)
    return None

