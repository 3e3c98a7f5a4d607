"""Dependencies every route can ask for by name."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide

from mycloud_compute.api.request_context import request_id_of
from mycloud_compute.persistence.database import Database
from mycloud_compute.settings import Settings


def _db(state: State) -> Database:
    return state.db  # type: ignore[no-any-return]


def _settings(state: State) -> Settings:
    return state.settings  # type: ignore[no-any-return]


def _request_id(request: Request[Any, Any, Any]) -> str:
    return request_id_of(request.scope)


DEPENDENCIES = {
    "db": Provide(_db, sync_to_thread=False),
    "settings": Provide(_settings, sync_to_thread=False),
    "request_id": Provide(_request_id, sync_to_thread=False),
}
