"""/v1/security-groups and their rules."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from sqlalchemy.engine import Row

from mycloud_compute.api.bodies import strict_body
from mycloud_compute.api.links import page_envelope
from mycloud_compute.api.openapi import ITEM_ERRORS, READ_ERRORS, WRITE_ERRORS, list_operation
from mycloud_compute.api.routes.common import path_id
from mycloud_compute.api.schemas import (
    SecurityGroup,
    SecurityGroupCreate,
    SecurityGroupList,
    SecurityGroupRule,
    SecurityGroupRuleCreate,
)
from mycloud_compute.api.views import timestamp
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import security_groups as service
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.listing import parse_list_query
from mycloud_compute.settings import Settings

AuthRequest = Request[Principal, None, State]

# A delete that the state does not allow is a 409, like every write.
DELETE_ERRORS = {**ITEM_ERRORS, 409: WRITE_ERRORS[409]}


def rule_view(row: Row[Any]) -> SecurityGroupRule:
    return SecurityGroupRule(
        id=row.id,
        direction=row.direction,
        protocol=row.protocol,
        port_range_min=row.port_range_min,
        port_range_max=row.port_range_max,
        remote_ip_prefix=row.remote_ip_prefix,
    )


def group_view(group: service.SecurityGroup) -> SecurityGroup:
    return SecurityGroup(
        id=group.row.id,
        name=group.row.name,
        description=group.row.description,
        rules=[rule_view(rule) for rule in group.rules],
        created_at=timestamp(group.row.created_at),
    )


def rule_request(data: SecurityGroupRuleCreate) -> service.RuleRequest:
    return service.RuleRequest(
        direction=data.direction,
        protocol=data.protocol,
        port_range_min=data.port_range_min,
        port_range_max=data.port_range_max,
        remote_ip_prefix=data.remote_ip_prefix,
    )


@get(
    "/v1/security-groups",
    opt={"scope": "read"},
    summary="List security groups",
    description="List the security groups of the current organization with their rules, newest first.",
    operation_class=list_operation(()),
    responses=READ_ERRORS,
    tags=["security-groups"],
)
async def list_security_groups(
    request: AuthRequest, db: Database, settings: Settings
) -> SecurityGroupList:
    query = parse_list_query(request.scope["query_string"], ())
    page, groups = await service.list_groups(db, request.user.organization_id, query)
    meta, links = page_envelope(request, settings, query, (), page)
    return SecurityGroupList(security_groups=[group_view(group) for group in groups], meta=meta, links=links)


@post(
    "/v1/security-groups",
    opt={"scope": "write"},
    status_code=HTTP_201_CREATED,
    summary="Create a security group",
    description=(
        "Create a security group with its rules (at most 100). Names are unique in the "
        "organization (409). Instances name groups at create in `security_groups`."
    ),
    responses=WRITE_ERRORS,
    tags=["security-groups"],
)
async def create_security_group(
    request: AuthRequest, data: SecurityGroupCreate, db: Database
) -> Response[SecurityGroup]:
    data = await strict_body(request, SecurityGroupCreate)
    group = await service.create_group(
        db,
        request.user.organization_id,
        data.name,
        data.description,
        [rule_request(rule) for rule in data.rules],
    )
    return Response(
        group_view(group),
        status_code=HTTP_201_CREATED,
        headers={"Location": f"/v1/security-groups/{group.row.id}"},
    )


@get(
    "/v1/security-groups/{security_group_id:str}",
    opt={"scope": "read"},
    summary="Show a security group",
    responses=ITEM_ERRORS,
    tags=["security-groups"],
)
async def show_security_group(
    request: AuthRequest, security_group_id: str, db: Database
) -> SecurityGroup:
    group_id = path_id("security group", security_group_id)
    return group_view(await service.get_group(db, request.user.organization_id, group_id))


@delete(
    "/v1/security-groups/{security_group_id:str}",
    opt={"scope": "write"},
    status_code=HTTP_204_NO_CONTENT,
    summary="Delete a security group",
    description=(
        "Delete a security group. `default` cannot be deleted, and neither can a group "
        "that an instance which is not DELETED uses (409)."
    ),
    responses=DELETE_ERRORS,
    tags=["security-groups"],
)
async def delete_security_group(request: AuthRequest, security_group_id: str, db: Database) -> None:
    group_id = path_id("security group", security_group_id)
    await service.delete_group(db, request.user.organization_id, group_id)


@post(
    "/v1/security-groups/{security_group_id:str}/rules",
    opt={"scope": "write"},
    status_code=HTTP_201_CREATED,
    summary="Add a security group rule",
    description="Add a rule to a group; a rule equal to one the group has is a 409.",
    responses=WRITE_ERRORS,
    tags=["security-groups"],
)
async def create_security_group_rule(
    request: AuthRequest, security_group_id: str, data: SecurityGroupRuleCreate, db: Database
) -> SecurityGroupRule:
    group_id = path_id("security group", security_group_id)
    data = await strict_body(request, SecurityGroupRuleCreate)
    row = await service.add_rule(db, request.user.organization_id, group_id, rule_request(data))
    return rule_view(row)


@delete(
    "/v1/security-groups/{security_group_id:str}/rules/{rule_id:str}",
    opt={"scope": "write"},
    status_code=HTTP_204_NO_CONTENT,
    summary="Delete a security group rule",
    responses=ITEM_ERRORS,
    tags=["security-groups"],
)
async def delete_security_group_rule(
    request: AuthRequest, security_group_id: str, rule_id: str, db: Database
) -> None:
    group_id = path_id("security group", security_group_id)
    await service.delete_rule(
        db, request.user.organization_id, group_id, path_id("security group rule", rule_id)
    )


ROUTES = [
    list_security_groups,
    create_security_group,
    show_security_group,
    delete_security_group,
    create_security_group_rule,
    delete_security_group_rule,
]
