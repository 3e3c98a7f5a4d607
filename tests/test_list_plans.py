"""Generic plans of the cached list statements walk the list order on PostgreSQL.

A cached statement gets a generic plan, chosen without the organization's id. The
database here has one organization of 50,000 instances and 2,000 of one instance,
so an average organization is small. The list statements must still read about a
page of rows when the large organization lists, whatever the filters and marker.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from conftest import Backend, new_backend

from mycloud_compute.persistence.instances import (
    InstanceFilters,
    _needs_custom_plan,
    _shape_and_arguments,
    page_statement,
)

LARGE_ORGANIZATION = 50_000
SMALL_ORGANIZATIONS = 2_000
# A plan that walks one index in list order reads the page, the previous page for a
# marker and a few index pages: under 100 blocks here. A plan that sorts or scans
# the large organization's entries reads more than 1,000.
MAX_BLOCKS = 150

FLAVOR = uuid.UUID("00000000-0000-4000-8000-00000000f001")
IMAGE = uuid.UUID("00000000-0000-4000-8000-00000000a001")
OTHER_FLAVOR = uuid.UUID("00000000-0000-4000-8000-00000000f002")
OTHER_IMAGE = uuid.UUID("00000000-0000-4000-8000-00000000a002")

LOAD = f"""
INSERT INTO organizations (id, name, created_at)
SELECT gen_random_uuid(), 'plan-org-' || g, now() FROM generate_series(0, {SMALL_ORGANIZATIONS}) g;

CREATE TEMPORARY TABLE large AS
SELECT id FROM organizations WHERE name = 'plan-org-0';

INSERT INTO instances (organization_id, id, name, description, status, vm_state, power_state,
    flavor_id, flavor, image_id, image, network_ids, addresses, security_groups,
    volumes_attached, key_names, metadata, tags, created_at, updated_at)
SELECT CASE WHEN g <= {LARGE_ORGANIZATION} THEN (SELECT id FROM large)
            ELSE (SELECT id FROM organizations WHERE name = 'plan-org-' || (g - {LARGE_ORGANIZATION})) END,
       gen_random_uuid(), 'server-' || lpad(g::text, 6, '0'), '',
       (ARRAY['ACTIVE', 'ACTIVE', 'ACTIVE', 'SHUTOFF', 'DELETED'])[1 + g % 5],
       'ACTIVE', 'RUNNING',
       CASE WHEN g % 3 = 0 THEN '{FLAVOR}'::uuid ELSE '{OTHER_FLAVOR}'::uuid END, '{{}}',
       CASE WHEN g % 4 = 0 THEN '{IMAGE}'::uuid ELSE '{OTHER_IMAGE}'::uuid END, '{{}}',
       '[]', '{{}}', '[]', '[]', '[]', '{{}}', '[]',
       now() - g * interval '1 second', now()
FROM generate_series(1, {LARGE_ORGANIZATION + SMALL_ORGANIZATIONS}) g;

VACUUM (ANALYZE)
"""


@pytest.fixture(scope="module")
def plan_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    with new_backend("postgresql", tmp_path_factory.mktemp("plans")) as backend:

        async def load() -> None:
            connection = await asyncpg.connect(backend.url)
            try:
                for statement in LOAD.split(";\n\n"):
                    await connection.execute(statement)
            finally:
                await connection.close()

        asyncio.run(load())
        yield backend


def _cached_filters() -> Iterator[tuple[InstanceFilters, bool, bool]]:
    """Yield every filter combination whose statement is cached, with marker and token flags."""
    names = (None, "server-000010")
    statuses: tuple[tuple[str, ...] | None, ...] = (None, ("ACTIVE",), ("ACTIVE", "SHUTOFF"))
    for name, status, flavor, image, marker, token in itertools.product(
        names, statuses, (None, FLAVOR), (None, IMAGE), (False, True), (False, True)
    ):
        yield InstanceFilters(name=name, statuses=status, flavor_id=flavor, image_id=image), marker, token


def _largest_node(plan: dict[str, Any]) -> tuple[int, str]:
    """Return the most blocks one node of ``plan`` read, alone, with that node's description."""
    children = plan.get("Plans", [])
    blocks = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    own = blocks - sum(child["Shared Hit Blocks"] + child["Shared Read Blocks"] for child in children)
    largest = (own, f"{plan['Node Type']} {plan.get('Index Name', plan.get('Relation Name', ''))}")
    for child in children:
        largest = max(largest, _largest_node(child))
    return largest


async def _generic_plan_sizes(url: str) -> list[tuple[str, int, str]]:
    connection = await asyncpg.connect(url)
    try:
        organization = await connection.fetchval("SELECT id FROM organizations WHERE name = 'plan-org-0'")
        # The marker matches every filter and sits at 90% of the most filtered list,
        # where a sorting plan reads the most.
        matching = (
            "FROM instances WHERE organization_id = $1 AND status = 'ACTIVE' "
            "AND flavor_id = $2 AND image_id = $3"
        )
        count = await connection.fetchval(f"SELECT count(*) {matching}", organization, FLAVOR, IMAGE)
        marker = await connection.fetchval(
            f"SELECT id {matching} ORDER BY created_at DESC, id DESC OFFSET $4 LIMIT 1",
            organization, FLAVOR, IMAGE, count * 9 // 10,
        )
        assert marker is not None
        await connection.execute("SET plan_cache_mode = force_generic_plan")
        sizes = []
        for number, (filters, with_marker, with_token) in enumerate(_cached_filters()):
            shape, arguments = _shape_and_arguments(
                filters, marker if with_marker else None, "no-such-hash" if with_token else None
            )
            assert not _needs_custom_plan(shape), shape
            name = f"page_{number}"
            await connection.execute(f"PREPARE {name} AS {page_statement(shape)}")
            values = [organization, 20, '"crn":"crn:test:compute:instance:', *arguments]
            literals = ", ".join(_literal(value) for value in values)
            plan = await connection.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {name}({literals})")
            top = json.loads(plan)[0]["Plan"]
            blocks, node = _largest_node(top)
            sizes.append((repr(shape), top["Shared Hit Blocks"] + top["Shared Read Blocks"], node))
        return sizes
    finally:
        await connection.close()


def _literal(value: Any) -> str:
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def test_generic_plans_read_about_a_page(plan_database: Backend) -> None:
    sizes = asyncio.run(_generic_plan_sizes(plan_database.url))
    assert len(sizes) == 96
    too_large = [size for size in sizes if size[1] > MAX_BLOCKS]
    assert too_large == []


def test_prefix_and_tags_planned_per_request() -> None:
    for filters in (
        InstanceFilters(name="web", name_is_prefix=True),
        InstanceFilters(tags=("production",)),
    ):
        shape, _ = _shape_and_arguments(filters, None, None)
        assert _needs_custom_plan(shape)
