"""The instance list on PostgreSQL: one statement per page, rendered by the database.

The page's instances arrive as the JSON array the API sends, with the total, the
paging facts and, for a principal from the token cache, whether its token is still
valid, all from one prepared statement. SQLite uses ``instances.list_instances``,
which returns rows for the API layer to render; both give the same bytes.
"""

from __future__ import annotations

import dataclasses

import msgspec

from mycloud_compute.persistence import instances as store
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.instances import RenderedPage
from mycloud_compute.services import identity
from mycloud_compute.services.errors import InvalidParameter
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.instances import _filters_from
from mycloud_compute.services.listing import ListQuery


def crn_prefix(region: str) -> str:
    """Return the JSON text that opens an instance's ``crn`` member, up to the id."""
    opening = msgspec.json.encode(f"crn:{region}:compute:instance:").decode()
    return '"crn":' + opening[:-1]


async def list_rendered(
    db: Database, principal: Principal, query: ListQuery, *, crn_prefix_json: str
) -> RenderedPage:
    """Read one page of instances rendered as JSON (PostgreSQL only)."""
    filters = _filters_from(query)
    generic_plans = not store.is_planned_per_request(filters)
    async with db.list_connection(generic_plans=generic_plans) as conn:
        page = await store.read_rendered_page(
            conn,
            principal.organization_id,
            filters,
            marker=query.marker,
            limit=query.limit,
            crn_prefix=crn_prefix_json,
            secret_hash=principal.unconfirmed_hash,
        )
    if not page.token_valid:
        # Raises Unauthorized with the reason (revoked, expired, unknown).
        await identity.confirm_token(db, principal)
        # Valid again by now (e.g. an expiry moved): read the page without the cache.
        confirmed = dataclasses.replace(principal, unconfirmed_hash=None)
        return await list_rendered(db, confirmed, query, crn_prefix_json=crn_prefix_json)
    if not page.marker_found:
        raise InvalidParameter("marker", str(query.marker), f"marker {query.marker} not found")
    return page
