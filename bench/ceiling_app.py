"""The in-memory ceiling: our HTTP stack serving fixed bytes with no database.

``MYCLOUD_CEILING_BODY`` names a file holding a response body captured from the real
service. Every GET under /v1/ returns those bytes through the same Litestar
application class, request-context layer and server as the real service, so the
ratio real/ceiling shows what the database work and serialization cost.
"""

from __future__ import annotations

import os
from pathlib import Path

from litestar import Litestar, Response, get

from mycloud_compute.api.request_context import RequestContextMiddleware

BODY = Path(os.environ["MYCLOUD_CEILING_BODY"]).read_bytes()


@get("/v1/{path:path}", sync_to_thread=False)
def fixed_page(path: str) -> Response[bytes]:
    return Response(BODY, media_type="application/json")


app = RequestContextMiddleware(Litestar(route_handlers=[fixed_page], debug=False, logging_config=None))
