"""uvicorn HTTP protocols that reject unparseable requests with the error envelope.

uvicorn's HTTP parsers (httptools and h11) reject some requests before any ASGI
application receives them: a raw non-ASCII or control byte in the request line, an
overlong request line, a control character in a header, a Content-Length that is not
a number. uvicorn then writes its own plain-text ``400 Invalid HTTP request
received.``. These subclasses send the contract's JSON error body instead, with an
``X-Request-Id`` that is also in the log line. Serve with one of them:
``uvicorn --http mycloud_compute.api.http_protocol:EnvelopeHttpToolsProtocol``
(``mycloud-compute serve`` does this).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import msgspec
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from mycloud_compute.api.request_context import SECURITY_HEADERS
from mycloud_compute.api.schemas import ErrorBody, ErrorDetail

log = logging.getLogger(__name__)

MESSAGE = "the HTTP request could not be parsed; check the request line and headers"


def bad_request_bytes(request_id: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """Build a whole HTTP/1.1 400 response with the error envelope, ready to write."""
    body = msgspec.json.encode(
        ErrorBody(
            ErrorDetail(
                code=400,
                type="invalid_request",
                message=MESSAGE,
                details=None,
                request_id=request_id,
            )
        )
    )
    headers = [
        *default_headers,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        *SECURITY_HEADERS,
        (b"connection", b"close"),
    ]
    head = b"HTTP/1.1 400 Bad Request\r\n" + b"".join(
        name + b": " + value + b"\r\n" for name, value in headers
    )
    return head + b"\r\n" + body


# NOTE: send_400_response is not part of uvicorn's documented API (checked with
# uvicorn 0.55). The raw request-line cases of tests/test_input_hardening.py fail if
# an upgrade stops calling it.
def _send_envelope(transport: asyncio.Transport, server_state: ServerState) -> None:
    request_id = f"req-{uuid.uuid4()}"
    log.warning("request rejected by the HTTP parser status=400 request_id=%s", request_id)
    transport.write(bad_request_bytes(request_id, list(server_state.default_headers)))
    transport.close()


class EnvelopeHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the error envelope for unparseable requests."""

    def send_400_response(self, msg: str) -> None:
        _send_envelope(self.transport, self.server_state)


class EnvelopeH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the error envelope for unparseable requests."""

    def send_400_response(self, msg: str) -> None:
        _send_envelope(self.transport, self.server_state)
