"""OpenAPI pieces shared by the routes: error responses, list parameters and the final
pass over the generated document."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from litestar import Litestar
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Operation, Parameter, Reference, Schema
from litestar.openapi.spec.enums import OpenAPIType

from mycloud_compute.api import schemas
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
ERROR_429 = _error("Too many requests; retry after Retry-After seconds")
ERROR_500 = _error("Internal server error")
ERROR_503 = _error("Service temporarily unavailable; retry after Retry-After seconds")

READ_ERRORS: dict[int, ResponseSpec] = {
    400: ERROR_400, 401: ERROR_401, 403: ERROR_403, 429: ERROR_429, 500: ERROR_500, 503: ERROR_503
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
        pattern=raw.get("pattern"),
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
            description="ID of the last item from the previous page (for pagination). "
            "An ID that names no item of this list, deleted items included where the "
            "list keeps them, is a 400 invalid_parameter.",
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


def _schema_structs() -> list[type[msgspec.Struct]]:
    return [
        value
        for value in vars(schemas).values()
        if isinstance(value, type)
        and issubclass(value, msgspec.Struct)
        and value.__module__ == schemas.__name__
    ]


def _drop_null_bodies(operation: Operation) -> None:
    """Document 202 and 204 responses without a body as having no content.

    Litestar describes a handler that returns None as a JSON body of type null, but
    those responses have an empty body and no JSON Content-Type.
    """
    for response in (operation.responses or {}).values():
        if isinstance(response, Reference) or not response.content:
            continue
        if all(
            isinstance(media.schema, Schema) and media.schema.type == OpenAPIType.NULL
            for media in response.content.values()
        ):
            response.content = None


def finish_document(app: Litestar) -> None:
    """Correct the OpenAPI document that Litestar generates for ``app``, before it is served.

    Litestar drops the constraints that msgspec enforces on list items and dict keys,
    and it never writes ``additionalProperties: false`` for structs that reject unknown
    fields. msgspec writes both, so its schema replaces Litestar's for every struct of
    the schemas module.
    """
    document = app.openapi_schema
    components = document.components.schemas if document.components else None
    if components is not None:
        _, precise = msgspec.json.schema_components(
            _schema_structs(), ref_template="#/components/schemas/{name}"
        )
        for name, schema in precise.items():
            if name in components:
                # Litestar renders a dict in the document as it is, so msgspec's dict
                # can stand in for a Schema object.
                components[name] = cast(Schema, schema)
    for path_item in (document.paths or {}).values():
        for method in ("get", "put", "post", "delete", "patch"):
            operation = getattr(path_item, method)
            if operation is not None:
                _drop_null_bodies(operation)
