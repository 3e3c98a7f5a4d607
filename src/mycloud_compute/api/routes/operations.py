"""Operations endpoints that need no token: health, readiness, metrics and the API docs."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import openapi_ui_bundles
from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.static_files import create_static_files_router

from mycloud_compute.api import metrics as request_metrics
from mycloud_compute.api.openapi import ERROR_503
from mycloud_compute.api.schemas import Health
from mycloud_compute.persistence.database import Database
from mycloud_compute.services.errors import ServiceUnavailable

DOCS_ASSETS_PATH = "/docs/assets"
# An empty requirement overrides the document-wide bearer requirement, so no token is needed.
NO_TOKEN: list[dict[str, list[str]]] = [{}]


@get("/healthz", summary="Liveness: the process is up", tags=["operations"], security=NO_TOKEN)
async def healthz() -> Health:
    return Health(status="ok")


@get(
    "/readyz",
    summary="Readiness: the database is reachable",
    tags=["operations"],
    security=NO_TOKEN,
    responses={503: ERROR_503},
)
async def readyz(db: Database) -> Health:
    try:
        await db.ping()
    except Exception as exc:  # any failure to reach the database means "not ready"
        raise ServiceUnavailable("the database is not reachable") from exc
    return Health(status="ok")


@get(
    "/metrics",
    summary="Prometheus metrics",
    description="Request counts and latencies by route and status, database pool usage, "
    "lifecycle tasks by state and task outcomes, in the Prometheus text format.",
    tags=["operations"],
    security=NO_TOKEN,
    responses={
        200: ResponseSpec(
            data_container=str,
            description="Metrics in the Prometheus text exposition format",
            media_type=request_metrics.CONTENT_TYPE,
            generate_examples=False,
        )
    },
)
async def metrics(db: Database) -> Response[bytes]:
    body = await request_metrics.render(db)
    # An explicit header, because Litestar would append a second charset to text/ types.
    return Response(body, headers={"content-type": request_metrics.CONTENT_TYPE})


# validatorUrl: null turns off Swagger UI's online validator badge, which would load an
# image from validator.swagger.io with the spec URL in its query string.
_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>mycloud Compute API</title>
  <link rel="stylesheet" href="{assets}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{assets}/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "/openapi.json", dom_id: "#swagger-ui", validatorUrl: null
    }});
  </script>
</body>
</html>
"""


def _docs_policy(page: str) -> str:
    """Return the Content-Security-Policy of the docs page: its own files and its inline script."""
    inline_script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(inline_script.encode()).digest()).decode()
    # Swagger UI sets style attributes and shows data: images; "Try it out" calls this origin.
    return (
        f"default-src 'none'; script-src 'self' 'sha256-{digest}'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


_DOCS_HTML = _DOCS_PAGE.format(assets=DOCS_ASSETS_PATH)
_DOCS_HEADERS = {"Content-Security-Policy": _docs_policy(_DOCS_HTML)}


@get("/docs", include_in_schema=False)
async def docs() -> Response[str]:
    # Swagger UI is served from the openapi-ui-bundles package, never from a CDN.
    return Response(_DOCS_HTML, media_type="text/html", headers=_DOCS_HEADERS)


docs_assets = create_static_files_router(
    path=DOCS_ASSETS_PATH,
    directories=[openapi_ui_bundles.swagger_ui.static_path],
    include_in_schema=False,
    opt={"public": True},
)

ROUTES: list[Any] = [healthz, readyz, metrics, docs, docs_assets]
