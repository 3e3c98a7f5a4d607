"""Security groups and their rules, and which groups an instance is created with."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import security_groups as store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import networks
from mycloud_compute.services.errors import Conflict, InvalidParameter, NotFound
from mycloud_compute.services.lifecycle import Status
from mycloud_compute.services.listing import ListQuery
from mycloud_compute.services.pages import Page, read_page
from mycloud_compute.services.text import reject_control_characters

log = logging.getLogger(__name__)

DIRECTIONS = ("ingress", "egress")
# A rule's protocol is one of these, or None for any protocol.
PROTOCOLS = ("tcp", "udp", "icmp")
PORT_PROTOCOLS = ("tcp", "udp")
MIN_PORT, MAX_PORT = 1, 65535
MAX_RULES_PER_GROUP = 100


@dataclass(frozen=True)
class RuleRequest:
    direction: str
    protocol: str | None = None
    port_range_min: int | None = None
    port_range_max: int | None = None
    # None is any address of either IP version.
    remote_ip_prefix: str | None = None


@dataclass(frozen=True)
class SecurityGroup:
    """A group row with its rule rows in position order."""

    row: Row[Any]
    rules: list[Row[Any]]


def _check_ports(
    rule: RuleRequest, invalid: Callable[[str, object, str], InvalidParameter]
) -> None:
    """Check the port range: both ports or neither, 1 to 65535, and only for tcp or udp."""
    low, high = rule.port_range_min, rule.port_range_max
    if low is None and high is None:
        return
    if rule.protocol not in PORT_PROTOCOLS:
        field, value = ("port_range_min", low) if low is not None else ("port_range_max", high)
        raise invalid(
            field,
            value,
            f"ports are allowed only for protocol tcp or udp, not {rule.protocol or 'any'}",
        )
    if low is None or high is None:
        missing = "port_range_min" if low is None else "port_range_max"
        raise invalid(
            missing,
            None,
            "give both port_range_min and port_range_max (equal for a single port), or neither",
        )
    for field, port in (("port_range_min", low), ("port_range_max", high)):
        if not MIN_PORT <= port <= MAX_PORT:
            raise invalid(field, port, f"{field} must be from {MIN_PORT} to {MAX_PORT}, got {port}")
    if low > high:
        raise invalid(
            "port_range_min", low, f"port_range_min {low} is greater than port_range_max {high}"
        )


def check_rule(rule: RuleRequest, parameter_prefix: str = "") -> RuleRequest:
    """Validate a rule and return it with ``remote_ip_prefix`` in canonical form.

    ``parameter_prefix`` (e.g. ``rules[2].``) makes errors name the field within
    the request body.
    """

    def invalid(field: str, value: object, message: str) -> InvalidParameter:
        return InvalidParameter(f"{parameter_prefix}{field}", value, message)

    if rule.direction not in DIRECTIONS:
        raise invalid("direction", rule.direction, "direction must be 'ingress' or 'egress'")
    if rule.protocol is not None and rule.protocol not in PROTOCOLS:
        raise invalid(
            "protocol",
            rule.protocol,
            "protocol must be 'tcp', 'udp', 'icmp' or null (any protocol)",
        )
    _check_ports(rule, invalid)

    if rule.remote_ip_prefix is None:
        return rule
    prefix = networks.parse_cidr(f"{parameter_prefix}remote_ip_prefix", rule.remote_ip_prefix)
    return replace(rule, remote_ip_prefix=str(prefix))


def _rule_key(rule: RuleRequest | Row[Any]) -> tuple[Any, ...]:
    return (
        rule.direction,
        rule.protocol,
        rule.port_range_min,
        rule.port_range_max,
        rule.remote_ip_prefix,
    )


def check_rules(rules: list[RuleRequest]) -> list[RuleRequest]:
    """Validate the rules of a create request; one rule given twice is rejected."""
    if len(rules) > MAX_RULES_PER_GROUP:
        raise InvalidParameter(
            "rules", len(rules), f"a security group has at most {MAX_RULES_PER_GROUP} rules"
        )
    checked: list[RuleRequest] = []
    seen: set[tuple[Any, ...]] = set()
    for index, rule in enumerate(rules):
        rule = check_rule(rule, f"rules[{index}].")
        if _rule_key(rule) in seen:
            raise InvalidParameter(
                f"rules[{index}]", index, f"rules[{index}] repeats an earlier rule"
            )
        seen.add(_rule_key(rule))
        checked.append(rule)
    return checked


def _rule_values(
    organization_id: uuid.UUID, group_id: uuid.UUID, position: int, rule: RuleRequest, now: Any
) -> dict[str, Any]:
    return {
        "organization_id": organization_id,
        "id": uuid.uuid4(),
        "security_group_id": group_id,
        "position": position,
        "direction": rule.direction,
        "protocol": rule.protocol,
        "port_range_min": rule.port_range_min,
        "port_range_max": rule.port_range_max,
        "remote_ip_prefix": rule.remote_ip_prefix,
        "created_at": now,
    }


# --- groups ---------------------------------------------------------------------------


async def list_groups(
    db: Database, organization_id: uuid.UUID, query: ListQuery
) -> tuple[Page, list[SecurityGroup]]:
    async with db.snapshot() as conn:
        page = await read_page(
            conn, store.LIST_ORDER, organization_id, marker=query.marker, limit=query.limit
        )
        rules = await store.rules_of(conn, organization_id, [row.id for row in page.rows])
    return page, [SecurityGroup(row, rules[row.id]) for row in page.rows]


async def _load(
    conn: AsyncConnection, organization_id: uuid.UUID, group_id: uuid.UUID
) -> SecurityGroup:
    row = await store.get(conn, organization_id, group_id)
    if row is None:
        raise NotFound(f"security group {group_id} not found")
    rules = await store.rules_of(conn, organization_id, [group_id])
    return SecurityGroup(row, rules[group_id])


async def get_group(db: Database, organization_id: uuid.UUID, group_id: uuid.UUID) -> SecurityGroup:
    async with db.snapshot() as conn:
        return await _load(conn, organization_id, group_id)


async def create_group(
    db: Database, organization_id: uuid.UUID, name: str, description: str, rules: list[RuleRequest]
) -> SecurityGroup:
    """Store a group with its rules; names are unique within the organization (409)."""
    networks.check_resource_name(name)
    reject_control_characters("description", description, allow_line_breaks=True)
    checked = check_rules(rules)
    group_id = uuid.uuid4()
    now = utcnow()
    conflict = Conflict(f"a security group named {name!r} already exists", {"name": name})

    async with db.transaction() as conn:
        if name == networks.DEFAULT_SECURITY_GROUP:
            await networks.ensure_default_security_group(conn, organization_id)
        if await store.find_by_names(conn, organization_id, [name]):
            raise conflict
        try:
            await store.insert_group(
                conn,
                {
                    "organization_id": organization_id,
                    "id": group_id,
                    "name": name,
                    "description": description,
                    "created_at": now,
                },
            )
        except IntegrityError as exc:
            # A concurrent create of the same name committed first (PostgreSQL).
            raise conflict from exc
        await store.insert_rules(
            conn,
            [
                _rule_values(organization_id, group_id, position, rule, now)
                for position, rule in enumerate(checked)
            ],
        )
        group = await _load(conn, organization_id, group_id)

    log.info(
        "security group created organization=%s security_group_id=%s name=%s rules=%d",
        organization_id,
        group_id,
        name,
        len(checked),
    )
    return group


async def delete_group(db: Database, organization_id: uuid.UUID, group_id: uuid.UUID) -> None:
    """Delete a group that is not ``default`` and that no live instance uses (409 otherwise).

    The group row is locked first (FOR UPDATE on PostgreSQL), and instance creates
    lock the groups they name (FOR KEY SHARE), so a create either commits before
    the in-use check, which then finds its instance, or finds the group gone. On
    SQLite every write transaction holds the database lock.
    """
    async with db.transaction() as conn:
        row = await store.get(conn, organization_id, group_id, lock=True)
        if row is None:
            raise NotFound(f"security group {group_id} not found")
        if row.name == networks.DEFAULT_SECURITY_GROUP:
            raise Conflict(
                "the default security group cannot be deleted", {"security_group": str(group_id)}
            )
        users = await store.instances_using(
            conn,
            organization_id,
            group_id,
            excluded_status=Status.DELETED,
            limit=networks.MAX_LISTED_INSTANCES,
        )
        if users:
            listed = [str(instance_id) for instance_id in users]
            raise Conflict(
                f"security group {row.name!r} is in use by instances ({', '.join(listed)}); "
                "delete them first",
                {"security_group": str(group_id), "instances": listed},
            )
        await store.delete_group(conn, organization_id, group_id)
    log.info(
        "security group deleted organization=%s security_group_id=%s name=%s",
        organization_id,
        group_id,
        row.name,
    )


# --- rules ----------------------------------------------------------------------------


async def add_rule(
    db: Database, organization_id: uuid.UUID, group_id: uuid.UUID, rule: RuleRequest
) -> Row[Any]:
    """Append a rule to the group; an equal rule already there is a 409."""
    checked = check_rule(rule)
    async with db.transaction() as conn:
        # The lock orders concurrent rule changes and deletes of the group.
        row = await store.get(conn, organization_id, group_id, lock=True)
        if row is None:
            raise NotFound(f"security group {group_id} not found")
        existing = (await store.rules_of(conn, organization_id, [group_id]))[group_id]
        for other in existing:
            if _rule_key(other) == _rule_key(checked):
                raise Conflict(
                    f"security group {row.name!r} already has this rule ({other.id})",
                    {"security_group": str(group_id), "rule": str(other.id)},
                )
        if len(existing) >= MAX_RULES_PER_GROUP:
            raise Conflict(
                f"security group {row.name!r} already has {MAX_RULES_PER_GROUP} rules, the maximum",
                {"security_group": str(group_id)},
            )
        position = await store.next_rule_position(conn, organization_id, group_id)
        values = _rule_values(organization_id, group_id, position, checked, utcnow())
        await store.insert_rules(conn, [values])
        created = await store.get_rule(conn, organization_id, values["id"])
    log.info(
        "security group rule added organization=%s security_group_id=%s rule_id=%s",
        organization_id,
        group_id,
        values["id"],
    )
    assert created is not None
    return created


async def delete_rule(
    db: Database, organization_id: uuid.UUID, group_id: uuid.UUID, rule_id: uuid.UUID
) -> None:
    async with db.transaction() as conn:
        row = await store.get(conn, organization_id, group_id, lock=True)
        if row is None:
            raise NotFound(f"security group {group_id} not found")
        if await store.delete_rule(conn, organization_id, group_id, rule_id) == 0:
            raise NotFound(f"security group rule {rule_id} not found")
    log.info(
        "security group rule deleted organization=%s security_group_id=%s rule_id=%s",
        organization_id,
        group_id,
        rule_id,
    )


# --- instance create ------------------------------------------------------------------


async def resolve_for_instance(
    conn: AsyncConnection, organization_id: uuid.UUID, requested: list[str] | None
) -> list[Row[Any]]:
    """Return the groups an instance create names (``default`` when it names none).

    Runs in the create's transaction. The groups stay locked (FOR KEY SHARE on
    PostgreSQL) until it commits, so a concurrent delete waits and then finds the
    new instance.
    """
    names = [networks.DEFAULT_SECURITY_GROUP] if requested is None else requested
    for name in names:
        reject_control_characters("security_groups", name)
    if len(set(names)) != len(names):
        raise InvalidParameter("security_groups", names, "security_groups must not repeat a group")
    if not names:
        # An instance without a group would get no rules at all, not even egress.
        raise InvalidParameter(
            "security_groups",
            [],
            "security_groups must name at least one group; leave it out to get 'default'",
        )
    found = await store.find_by_names(conn, organization_id, names, lock=True)
    if networks.DEFAULT_SECURITY_GROUP in names and networks.DEFAULT_SECURITY_GROUP not in found:
        await networks.ensure_default_security_group(conn, organization_id)
        found = await store.find_by_names(conn, organization_id, names, lock=True)
    for name in names:
        if name not in found:
            raise InvalidParameter("security_groups", name, f"security group {name!r} not found")
    return [found[name] for name in names]
