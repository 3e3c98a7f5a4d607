"""OpenAPI pieces shared by the routes: error responses and list parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Operation, Parameter, Schema
from litestar.openapi.spec.enums import OpenAPIType

from mycloud_compute.api.schemas import ErrorBody
from mycloud_compute.services.listing import DEFAULT_LIMIT, MAX_LIMIT, QueryFilter


def _error(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=ErrorBody, description=description, generate_examples=False)


ERROR_400 = _error("Invalid parameter or request body")
ERROR_401 = _error("Authentication required or token invalid")
ERROR_403 = _error("The token lacks the scope for this operation")
ERROR_404 = _error("Not found")
ERROR_409 = _error("Conflict with the current state")
ERROR_413 = _error("Request body too large")
ERROR_415 = _error("Request body is not JSON")
ERROR_500 = _error("Internal server error")
ERROR_503 = _error("Service temporarily unavailable; retry after Retry-After seconds")

READ_ERRORS: dict[int, ResponseSpec] = {
    400: ERROR_400, 401: ERROR_401, 403: ERROR_403, 500: ERROR_500, 503: ERROR_503
}
WRITE_ERRORS: dict[int, ResponseSpec] = {
    **READ_ERRORS, 404: ERROR_404, 409: ERROR_409, 413: ERROR_413, 415: ERROR_415
}
ITEM_ERRORS: dict[int, ResponseSpec] = {**READ_ERRORS, 404: ERROR_404}


def _schema(raw: dict[str, Any]) -> Schema:
    return Schema(
        type=OpenAPIType(raw["type"]),
        format=raw.get("format"),
        min_length=raw.get("minLength"),
        max_length=raw.get("maxLength"),
    )


def list_parameters(filters: Sequence[QueryFilter]) -> list[Parameter]:
    """Return the query parameters of a list endpoint: limit, marker and the declared filters."""
    parameters = [
        Parameter(
            name="limit",
            param_in="query",
            required=False,
            description="Maximum number of items to return",
            schema=Schema(
                type=OpenAPIType.INTEGER, minimum=1, maximum=MAX_LIMIT, default=DEFAULT_LIMIT
            ),
            example=DEFAULT_LIMIT,
        ),
        Parameter(
            name="marker",
            param_in="query",
            required=False,
            description="ID of the last item from the previous page (for pagination)",
            schema=Schema(type=OpenAPIType.STRING, format="uuid"),  # type: ignore[arg-type]
        ),
    ]
    for item in filters:
        parameters.append(
            Parameter(
                name=item.name,
                param_in="query",
                required=False,
                description=item.description,
                schema=_schema(item.schema),
                example=item.example,
            )
        )
    return parameters


def list_operation(filters: Sequence[QueryFilter]) -> type[Operation]:
    """An Operation class that documents the query parameters the handler parses itself."""

    @dataclass
    class ListOperation(Operation):
        def __post_init__(self) -> None:
            self.parameters = [*(self.parameters or []), *list_parameters(filters)]

    return ListOperation
