"""Queries on instances and their tags."""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.tables import (
    instance_counts,
    instance_tag_counts,
    instance_tags,
    instances,
)

# Columns returned for the API representation of an instance, in the public order.
INSTANCE_COLUMNS = (
    instances.c.id,
    instances.c.name,
    instances.c.description,
    instances.c.status,
    instances.c.power_state,
    instances.c.task_state,
    instances.c.vm_state,
    instances.c.flavor,
    instances.c.image,
    instances.c.addresses,
    instances.c.security_groups,
    instances.c.volumes_attached,
    instances.c.key_names,
    instances.c["metadata"],
    instances.c.tags,
    instances.c.fault,
    instances.c.created_at,
    instances.c.updated_at,
    instances.c.launched_at,
    instances.c.terminated_at,
)


@dataclass(frozen=True)
class InstanceFilters:
    """Filter values of the list endpoint; None means "not filtered"."""

    name: str | None = None
    name_is_prefix: bool = False
    statuses: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    flavor_id: uuid.UUID | None = None
    image_id: uuid.UUID | None = None


Position = tuple[datetime, uuid.UUID]


def _prefix_upper_bound(prefix: str) -> str | None:
    """Return the smallest string greater than every string starting with ``prefix``.

    None means there is no upper bound (the prefix is empty or made only of the
    largest code point).
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop()) + 1
        if 0xD800 <= last <= 0xDFFF:  # surrogates cannot be stored; skip past them
            last = 0xE000
        if last <= 0x10FFFF:
            return "".join(chars) + chr(last)
    return None


def _where(organization_id: uuid.UUID, filters: InstanceFilters) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = [instances.c.organization_id == organization_id]

    if filters.statuses is None:
        clauses.append(instances.c.status != "DELETED")
    elif len(filters.statuses) == 1:
        clauses.append(instances.c.status == filters.statuses[0])
    else:
        clauses.append(instances.c.status.in_(filters.statuses))

    if filters.name is not None:
        if not filters.name_is_prefix:
            clauses.append(instances.c.name == filters.name)
        elif filters.name:
            # A range instead of LIKE: LIKE treats % and _ as wildcards and is
            # case-insensitive on SQLite, while the filter must be literal and exact.
            clauses.append(instances.c.name >= filters.name)
            upper = _prefix_upper_bound(filters.name)
            if upper is not None:
                clauses.append(instances.c.name < upper)

    if filters.flavor_id is not None:
        clauses.append(instances.c.flavor_id == filters.flavor_id)
    if filters.image_id is not None:
        clauses.append(instances.c.image_id == filters.image_id)

    if filters.tags:
        clauses.append(instances.c.id.in_(_having_every_tag(organization_id, filters.tags)))
    return clauses


def _having_every_tag(organization_id: uuid.UUID, tags: tuple[str, ...]) -> Select[Any]:
    """Ids of the instances that carry every tag in ``tags``.

    One grouped subquery: (organization_id, instance_id, tag) is the primary key,
    so an instance matches exactly when it has one row per requested tag.
    """
    query = select(instance_tags.c.instance_id).where(instance_tags.c.organization_id == organization_id)
    if len(tags) == 1:
        return query.where(instance_tags.c.tag == tags[0])
    return (
        query.where(instance_tags.c.tag.in_(tags))
        .group_by(instance_tags.c.instance_id)
        .having(func.count() == len(tags))
    )


async def find_position(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID
) -> Position | None:
    """Return the sort position of an instance, deleted ones included."""
    row = (
        await conn.execute(
            select(instances.c.created_at, instances.c.id).where(
                instances.c.organization_id == organization_id, instances.c.id == instance_id
            )
        )
    ).first()
    return (row.created_at, row.id) if row else None


async def list_page(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    filters: InstanceFilters,
    *,
    after: Position | None,
    limit: int,
) -> list[Any]:
    """Return up to ``limit + 1`` instances after ``after`` in list order.

    The order (created_at DESC, id DESC) is total because ids are unique, so a keyset
    condition on the pair never skips or repeats rows that share a created_at.
    """
    clauses = _where(organization_id, filters)
    if after is not None:
        clauses.append(tuple_(instances.c.created_at, instances.c.id) < tuple_(*after))
    query = (
        select(*INSTANCE_COLUMNS)
        .where(and_(*clauses))
        .order_by(instances.c.created_at.desc(), instances.c.id.desc())
        .limit(limit + 1)
    )
    return list((await conn.execute(query)).all())


async def position_before(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    filters: InstanceFilters,
    *,
    marker: Position,
    limit: int,
) -> tuple[bool, uuid.UUID | None]:
    """Find the marker of the page before the one that starts after ``marker``.

    The previous page is the ``limit`` instances ending with the marker itself. Its
    own marker is the ``limit``-th instance counted back from ``marker``. Returns
    (True, None) when the previous page is the first page.
    """
    clauses = _where(organization_id, filters)
    clauses.append(tuple_(instances.c.created_at, instances.c.id) > tuple_(*marker))
    query = (
        select(instances.c.id)
        .where(and_(*clauses))
        .order_by(instances.c.created_at.asc(), instances.c.id.asc())
        .limit(limit)
    )
    ids = (await conn.execute(query)).scalars().all()
    if len(ids) < limit:
        return True, None
    return False, ids[-1]


def _status_clause(
    column: ColumnElement[str], statuses: tuple[str, ...] | None
) -> ColumnElement[bool]:
    """Return the condition of the status filter: without one, every status but DELETED."""
    if statuses is None:
        return column != "DELETED"
    return column.in_(statuses)


async def count(conn: AsyncConnection, organization_id: uuid.UUID, filters: InstanceFilters) -> int:
    """Count the instances that match ``filters``.

    Without a name or tags filter the count is a sum over the organization's rows
    of ``instance_counts``, and for one tag without name, flavor or image filters a
    sum over its rows of ``instance_tag_counts``. Triggers keep both exact. Other
    filters count index entries.
    """
    if filters.name is None and not filters.tags:
        counts = instance_counts.c
        clauses = [
            counts.organization_id == organization_id,
            _status_clause(counts.status, filters.statuses),
        ]
        if filters.flavor_id is not None:
            clauses.append(counts.flavor_id == filters.flavor_id)
        if filters.image_id is not None:
            clauses.append(counts.image_id == filters.image_id)
        summed = select(func.coalesce(func.sum(counts.count), 0)).where(*clauses)
        return int((await conn.execute(summed)).scalar_one())
    only_tags = filters.name is None and filters.flavor_id is None and filters.image_id is None
    if only_tags and filters.tags and len(filters.tags) == 1:
        tag_counts = instance_tag_counts.c
        summed = select(func.coalesce(func.sum(tag_counts.count), 0)).where(
            tag_counts.organization_id == organization_id,
            tag_counts.tag == filters.tags[0],
            _status_clause(tag_counts.status, filters.statuses),
        )
        return int((await conn.execute(summed)).scalar_one())
    if only_tags and filters.tags:
        # The tag rows carry their instance's status (kept by triggers).
        tagged = instance_tags.c
        tag_clauses = [
            tagged.organization_id == organization_id,
            tagged.tag.in_(filters.tags),
            _status_clause(tagged.status, filters.statuses),
        ]
        matched = (
            select(tagged.instance_id)
            .where(*tag_clauses)
            .group_by(tagged.instance_id)
            .having(func.count() == len(filters.tags))
            .subquery()
        )
        return int((await conn.execute(select(func.count()).select_from(matched))).scalar_one())
    query = select(func.count()).select_from(instances).where(and_(*_where(organization_id, filters)))
    return int((await conn.execute(query)).scalar_one())


async def get(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID
) -> Row[Any] | None:
    query = select(instances).where(
        instances.c.organization_id == organization_id, instances.c.id == instance_id
    )
    return (await conn.execute(query)).first()


async def get_for_update(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID
) -> Row[Any] | None:
    """Read an instance and lock its row until the transaction ends (PostgreSQL)."""
    query = (
        select(instances)
        .where(instances.c.organization_id == organization_id, instances.c.id == instance_id)
        .with_for_update()
    )
    return (await conn.execute(query)).first()


async def insert_instance(conn: AsyncConnection, values: dict[str, Any]) -> Row[Any]:
    """Insert an instance with its tags and return the stored row (as ``get`` reads it)."""
    row = (await conn.execute(_INSERT_INSTANCE, values)).one()
    if values["tags"]:
        await conn.execute(
            insert(instance_tags),
            [
                {"organization_id": values["organization_id"], "instance_id": values["id"], "tag": tag}
                for tag in values["tags"]
            ],
        )
    return row


# Built once, so that a create does not rebuild it (building a statement costs Python time).
_INSERT_INSTANCE = insert(instances).returning(*instances.c)


# Built once: SQLAlchemy derives the SET clause from the keys of the parameters
# each execution passes, and caches the compiled form of each set of keys.
_UPDATE_INSTANCE = update(instances).where(
    instances.c.organization_id == bindparam("match_organization_id"),
    instances.c.id == bindparam("match_id"),
)


async def update_instance(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID, values: dict[str, Any]
) -> None:
    """Store plain values (no SQL expressions) in the instance's columns.

    A ``tags`` value also replaces the instance's rows in ``instance_tags``.
    """
    await conn.execute(
        _UPDATE_INSTANCE, {**values, "match_organization_id": organization_id, "match_id": instance_id}
    )
    if "tags" in values:
        await replace_tags(conn, organization_id, instance_id, values["tags"])


async def replace_tags(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID, tags: list[str]
) -> None:
    await conn.execute(
        delete(instance_tags).where(
            instance_tags.c.organization_id == organization_id,
            instance_tags.c.instance_id == instance_id,
        )
    )
    if tags:
        await conn.execute(
            insert(instance_tags),
            [{"organization_id": organization_id, "instance_id": instance_id, "tag": tag} for tag in tags],
        )


# --- the list page rendered by PostgreSQL ---------------------------------------------
#
# On PostgreSQL one statement returns a whole list page: the instances already
# rendered as the JSON array the API sends, the total, whether a page follows, the
# markers, and optionally whether the caller's token is still valid. The JSON
# columns are copied as stored (the service writes them compact, as msgspec
# encodes them), strings go through to_json, whose escaping equals msgspec's, and
# timestamps are cut to whole seconds like the Python rendering.

_TIMESTAMP = """'YYYY-MM-DD"T"HH24:MI:SS"Z"'"""


def _timestamp_sql(column: str) -> str:
    return f"""'"' || to_char(i.{column}, {_TIMESTAMP}) || '"'"""


_INSTANCE_JSON = " || ".join(
    [
        """'{"id":"' || i.id::text || '",' || $3::text || i.id::text || '"'""",
        """',"name":' || to_json(i.name::text)::text""",
        """',"description":' || to_json(i.description::text)::text""",
        """',"status":' || to_json(i.status::text)::text""",
        """',"power_state":' || to_json(i.power_state::text)::text""",
        """',"task_state":' || coalesce(to_json(i.task_state::text)::text, 'null')""",
        """',"vm_state":' || to_json(i.vm_state::text)::text""",
        *(
            f"""',"{column}":' || i.{column}::text"""
            for column in (
                "flavor", "image", "addresses", "security_groups", "volumes_attached",
                "key_names", "metadata", "tags",
            )
        ),
        """',"fault":' || coalesce(i.fault::text, 'null')""",
        """',"created_at":' || """ + _timestamp_sql("created_at"),
        """',"updated_at":' || """ + _timestamp_sql("updated_at"),
        """',"launched_at":' || coalesce(""" + _timestamp_sql("launched_at") + ", 'null')",
        """',"terminated_at":' || coalesce(""" + _timestamp_sql("terminated_at") + ", 'null')",
        "'}'",
    ]
)


@dataclass(frozen=True)
class PageShape:
    """The filters a list request uses; each shape is one prepared statement."""

    name: str  # "", "exact", "prefix" or "prefix_open" (no upper bound)
    statuses: int  # 0: not filtered (DELETED hidden), 1: one status, 2: several
    tags: int  # how many tags the instance must all have
    flavor: bool
    image: bool
    marker: bool
    check_token: bool


@dataclass(frozen=True)
class RenderedPage:
    """A list page from :func:`read_rendered_page`."""

    token_valid: bool
    marker_found: bool
    total: int
    # The page's instances as a JSON array, ready to send.
    instances_json: str
    has_more: bool
    last_id: uuid.UUID | None
    previous_marker: uuid.UUID | None
    previous_is_first: bool


def _shape_and_arguments(
    filters: InstanceFilters, marker: uuid.UUID | None, secret_hash: str | None
) -> tuple[PageShape, list[Any]]:
    """Return the statement shape and its arguments from $4 on ($1..$3 are fixed)."""
    arguments: list[Any] = []

    name = ""
    if filters.name is not None:
        if not filters.name_is_prefix:
            name = "exact"
            arguments.append(filters.name)
        elif filters.name:
            upper = _prefix_upper_bound(filters.name)
            name = "prefix" if upper is not None else "prefix_open"
            arguments.append(filters.name)
            if upper is not None:
                arguments.append(upper)

    statuses = 0 if filters.statuses is None else min(len(filters.statuses), 2)
    if statuses == 1:
        arguments.append(filters.statuses[0])  # type: ignore[index]
    elif statuses == 2:
        arguments.append(list(filters.statuses))  # type: ignore[arg-type]

    tags = len(filters.tags) if filters.tags else 0
    arguments.extend(filters.tags or ())

    if filters.flavor_id is not None:
        arguments.append(filters.flavor_id)
    if filters.image_id is not None:
        arguments.append(filters.image_id)
    if marker is not None:
        arguments.append(marker)
    if secret_hash is not None:
        arguments.extend([secret_hash, utcnow()])
    shape = PageShape(
        name=name,
        statuses=statuses,
        tags=tags,
        flavor=filters.flavor_id is not None,
        image=filters.image_id is not None,
        marker=marker is not None,
        check_token=secret_hash is not None,
    )
    return shape, arguments


class _Parameters:
    """Numbers positional parameters from $4 on, in the order they are asked for."""

    def __init__(self) -> None:
        self.next = 4

    def take(self, count: int = 1) -> list[str]:
        numbers = [f"${self.next + offset}" for offset in range(count)]
        self.next += count
        return numbers


def _needs_custom_plan(shape: PageShape) -> bool:
    """Whether the statement must be planned with each request's values.

    The other shapes run with a generic plan (``Database.list_reader``). Migration
    0008 makes generic plans assume an organization of 10,000 instances, and for
    pages, markers, an exact name, statuses, flavor and image they then walk one
    index in list order and stop after the page. For a name prefix or tags the best
    plan depends on how many instances match, so those are planned per request.
    """
    return shape.name.startswith("prefix") or bool(shape.tags)


def is_planned_per_request(filters: InstanceFilters) -> bool:
    """Return whether the page statement for ``filters`` must be planned with its values."""
    shape, _ = _shape_and_arguments(filters, None, None)
    return _needs_custom_plan(shape)


@functools.lru_cache(maxsize=512)
def page_statement(shape: PageShape) -> str:
    """Return the SQL of one list page for ``shape``.

    Parameters: $1 organization id, $2 limit, $3 the JSON text that starts the CRN
    member (``"crn":"crn:<region>:compute:instance:``), then the filter values in
    the order of :func:`_shape_and_arguments`.
    """
    parameters = _Parameters()
    where: list[str] = ["{t}.organization_id = $1"]
    counter_where: list[str] = ["c.organization_id = $1"]
    if shape.name == "exact":
        (name,) = parameters.take()
        where.append(f"{{t}}.name = {name}")
    elif shape.name == "prefix":
        low, high = parameters.take(2)
        where.append(f"{{t}}.name >= {low} AND {{t}}.name < {high}")
    elif shape.name == "prefix_open":
        (low,) = parameters.take()
        where.append(f"{{t}}.name >= {low}")
    if shape.statuses == 0:
        status = "{t}.status <> 'DELETED'"
    elif shape.statuses == 1:
        status = "{t}.status = " + parameters.take()[0]
    else:
        status = "{t}.status = ANY(" + parameters.take()[0] + "::varchar[])"
    where.append(status)
    counter_where.append(status.format(t="c"))
    tags = parameters.take(shape.tags)
    # One semi-join per tag, so that a page can walk the list order and probe the
    # tag index for each instance, and stop after `limit` matches.
    where.extend(
        f"EXISTS (SELECT 1 FROM instance_tags g{number} WHERE g{number}.organization_id = $1 "
        f"AND g{number}.tag = {tag} AND g{number}.instance_id = {{t}}.id)"
        for number, tag in enumerate(tags)
    )
    for enabled, column in ((shape.flavor, "flavor_id"), (shape.image, "image_id")):
        if enabled:
            (value,) = parameters.take()
            where.append(f"{{t}}.{column} = {value}")
            counter_where.append(f"c.{column} = {value}")

    position = ""
    marker_cte = ""
    if shape.marker:
        (marker,) = parameters.take()
        # Looked up once: the page, the previous page and marker_found all use it.
        marker_cte = (
            "marker AS MATERIALIZED (SELECT m.created_at, m.id FROM instances m "
            f"WHERE m.organization_id = $1 AND m.id = {marker}), "
        )
        position = "(SELECT created_at, id FROM marker)"

    def condition(table: str) -> str:
        return " AND ".join(clause.format(t=table) for clause in where)

    if shape.tags == 1 and not (shape.name or shape.flavor or shape.image):
        # The tag's counter rows, at most one per status (kept by triggers).
        total = (
            "(SELECT coalesce(sum(t.count), 0) FROM instance_tag_counts t "
            f"WHERE t.organization_id = $1 AND t.tag = {tags[0]} AND {status.format(t='t')})::bigint"
        )
    elif shape.tags and not (shape.name or shape.flavor or shape.image):
        # The tag rows carry the instance's status: index-only scans of the tag
        # index, joined on the instance id for each further tag; no instance rows.
        others = "".join(
            f" AND EXISTS (SELECT 1 FROM instance_tags g{number} WHERE g{number}.organization_id = $1 "
            f"AND g{number}.tag = {tag} AND g{number}.instance_id = g.instance_id)"
            for number, tag in enumerate(tags[1:], start=1)
        )
        total = (
            "(SELECT count(*) FROM instance_tags g WHERE g.organization_id = $1 "
            f"AND g.tag = {tags[0]} AND {status.format(t='g')}{others})"
        )
    elif shape.name or shape.tags:
        total = f"(SELECT count(*) FROM instances i WHERE {condition('i')})"
    else:
        total = (
            "(SELECT coalesce(sum(c.count), 0) FROM instance_counts c "
            f"WHERE {' AND '.join(counter_where)})::bigint"
        )

    page_where = condition("i")
    marker_found = "true"
    previous = "NULL::uuid"
    if shape.marker:
        page_where += f" AND (i.created_at, i.id) < {position}"
        marker_found = "EXISTS (SELECT 1 FROM marker)"
        previous = (
            f"(SELECT q.id FROM instances q WHERE {condition('q')} "
            f"AND (q.created_at, q.id) > {position} "
            "ORDER BY q.created_at, q.id OFFSET $2 - 1 LIMIT 1)"
        )
    token_valid = "true"
    if shape.check_token:
        secret_hash, now = parameters.take(2)
        token_valid = (
            "EXISTS (SELECT 1 FROM tokens k WHERE k.secret_hash = "
            f"{secret_hash} AND k.organization_id = $1 AND k.revoked_at IS NULL "
            f"AND (k.expires_at IS NULL OR k.expires_at > {now}))"
        )

    return f"""
WITH {marker_cte}page AS MATERIALIZED (
    SELECT i.created_at, i.id, {_INSTANCE_JSON} AS document
    FROM instances i
    WHERE {page_where}
    ORDER BY i.created_at DESC, i.id DESC
    LIMIT $2 + 1
), shown AS MATERIALIZED (
    SELECT created_at, id, document FROM page ORDER BY created_at DESC, id DESC LIMIT $2
)
SELECT
    {token_valid} AS token_valid,
    {marker_found} AS marker_found,
    {total} AS total,
    (SELECT '[' || coalesce(string_agg(document, ',' ORDER BY created_at DESC, id DESC), '') || ']'
       FROM shown) AS instances_json,
    (SELECT count(*) FROM page) > $2 AS has_more,
    (SELECT id FROM shown ORDER BY created_at, id LIMIT 1) AS last_id,
    {previous} AS previous_marker
"""


async def read_rendered_page(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    filters: InstanceFilters,
    *,
    marker: uuid.UUID | None,
    limit: int,
    crn_prefix: str,
    secret_hash: str | None = None,
) -> RenderedPage:
    """Read one list page on PostgreSQL in a single statement.

    ``crn_prefix`` is the JSON text ``"crn":"crn:<region>:compute:instance:``.
    With ``secret_hash`` the statement also checks that this token of the
    organization is still valid (not revoked, not expired).
    """
    shape, arguments = _shape_and_arguments(filters, marker, secret_hash)
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    sql = page_statement(shape)
    if _needs_custom_plan(shape):
        # Prepared once for this request, so planned with its actual values.
        statement = await raw.prepare(sql)
        row = await statement.fetchrow(organization_id, limit, crn_prefix, *arguments)
    else:
        row = await raw.fetchrow(sql, organization_id, limit, crn_prefix, *arguments)
    return RenderedPage(
        token_valid=row["token_valid"],
        marker_found=row["marker_found"],
        total=row["total"],
        instances_json=row["instances_json"],
        has_more=row["has_more"],
        last_id=row["last_id"],
        previous_marker=row["previous_marker"],
        previous_is_first=marker is not None and row["previous_marker"] is None,
    )
