"""Instance creates on PostgreSQL in one statement, and the row every create stores.

``services.instances.create_instance`` runs a create as a transaction of about a
dozen statements. On PostgreSQL it first calls :func:`create_in_one_statement`,
which does the same writes in one statement on a connection outside a transaction
(persistence/instance_create.py), sent on the asyncpg connection directly. That
statement changes nothing unless every check passes. Whenever it changes nothing,
or this module cannot build it, the function returns None and the transaction
runs. So every error, every Idempotency-Key replay and every repair (creating a
missing default network or security group) comes from the transaction, and the
one-statement path stores only what the transaction would have stored.

The statement needs the flavor's and image's names and sizes up front, because
the response stored with the Idempotency-Key embeds them. They come from a
per-process cache that the transaction fills, and the statement checks them
against the rows. A stale entry only sends the create to the transaction.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
from sqlalchemy.engine import Row

from mycloud_compute.persistence import instance_create as store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import idempotency as idempotency_service
from mycloud_compute.services.errors import InvalidParameter
from mycloud_compute.services.idempotency import KEY_LIFETIME, Idempotency, StoredResponse
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.lifecycle import PowerState, TaskState, VmState, derive_status
from mycloud_compute.services.networks import DEFAULT_NETWORK_NAME, DEFAULT_SECURITY_GROUP
from mycloud_compute.services.text import reject_control_characters

if TYPE_CHECKING:
    from mycloud_compute.services.instances import CreateRequest

log = logging.getLogger(__name__)

# Entries of each catalog cache; a full cache is emptied. A catalog contains tens
# of flavors and images, so the bound matters only for a far larger catalog.
MAX_CACHED = 1024

# Columns stored as JSON: their values go to the statement as encoded text.
_JSON_COLUMNS = frozenset({
    "flavor", "image", "network_ids", "addresses", "security_groups", "volumes_attached",
    "key_names", "metadata", "tags", "fault",
})


@dataclass(frozen=True)
class FlavorFields:
    """The flavor fields an instance row embeds."""

    name: str
    vcpus: int
    ram: int
    disk: int


_flavors: dict[uuid.UUID, FlavorFields] = {}
_image_names: dict[uuid.UUID, str] = {}


def remember_catalog(flavor: Row[Any], image: Row[Any]) -> None:
    """Cache a flavor and an image that a create accepted, for the next creates of this process."""
    if len(_flavors) >= MAX_CACHED:
        _flavors.clear()
    if len(_image_names) >= MAX_CACHED:
        _image_names.clear()
    _flavors[flavor.id] = FlavorFields(flavor.name, flavor.vcpus, flavor.ram, flavor.disk)
    _image_names[image.id] = image.name


def forget_catalog() -> None:
    """Empty the flavor and image cache."""
    _flavors.clear()
    _image_names.clear()


class CreatedInstance:
    """An instance row that the one-statement create stored.

    It has the attributes of a ``Row`` read from ``instances``, one per column, so
    the same code renders either.
    """

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"CreatedInstance(id={self._values['id']})"


def instance_values(
    organization_id: uuid.UUID,
    instance_id: uuid.UUID,
    request: CreateRequest,
    *,
    flavor: dict[str, Any],
    image: dict[str, Any],
    network_ids: list[str],
    security_group_names: list[str],
    key_names: list[str],
    volumes_attached: list[dict[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    """Return the column values of a new instance row in BUILD."""
    return {
        "organization_id": organization_id,
        "id": instance_id,
        "name": request.name,
        "description": request.description,
        "status": derive_status(VmState.BUILDING, TaskState.SCHEDULING).value,
        "vm_state": VmState.BUILDING.value,
        "task_state": TaskState.SCHEDULING.value,
        "power_state": PowerState.NOSTATE.value,
        "flavor_id": uuid.UUID(flavor["id"]),
        "flavor": flavor,
        "image_id": uuid.UUID(image["id"]),
        "image": image,
        "host_id": None,
        "network_ids": network_ids,
        "addresses": {},
        "security_groups": [{"name": name} for name in security_group_names],
        "volumes_attached": volumes_attached,
        "key_names": key_names,
        "metadata": request.metadata,
        "tags": request.tags,
        "fault": None,
        "created_at": now,
        "updated_at": now,
        "launched_at": None,
        "terminated_at": None,
    }


def _security_group_names(request: CreateRequest) -> list[str] | None:
    """Return the group names the create names, or None when the transaction must reject them."""
    names = [DEFAULT_SECURITY_GROUP] if request.security_groups is None else request.security_groups
    if not names or len(set(names)) != len(names):
        return None
    try:
        for name in names:
            reject_control_characters("security_groups", name)
    except InvalidParameter:
        return None
    return names


def _takes_one_statement(request: CreateRequest) -> bool:
    """Return True when the statement can handle the request's shape; it checks the references itself."""
    if request.volumes:
        return False
    if len(set(request.key_names)) != len(request.key_names):
        return False
    networks = request.networks
    return networks is None or (bool(networks) and len(set(networks)) == len(networks))


def _statement_parameters(
    principal: Principal,
    request: CreateRequest,
    values: dict[str, Any],
    flavor: FlavorFields,
    image_name: str,
    group_names: list[str],
    request_id: str | None,
) -> dict[str, Any]:
    """Return the statement's parameters, except the Idempotency-Key's."""
    parameters = {name: msgspec.json.encode(value).decode() if name in _JSON_COLUMNS else value
                  for name, value in values.items()}
    parameters.update(
        include_private=principal.allows("admin"),
        flavor_name=flavor.name,
        flavor_vcpus=flavor.vcpus,
        flavor_ram=flavor.ram,
        flavor_disk=flavor.disk,
        image_name=image_name,
        default_network_name=DEFAULT_NETWORK_NAME,
        network_id_list=request.networks,
        group_names=group_names,
        key_name_list=request.key_names,
        tag_list=request.tags,
        request_id=request_id,
        action_id=uuid.uuid4(),
        token_name=principal.token_name,
        action_started_at=utcnow(),
        task_id=uuid.uuid4(),
        task_created_at=utcnow(),
    )
    return parameters


def _key_parameters(idempotency: Idempotency, response: StoredResponse) -> dict[str, Any]:
    """Return the parameters of the Idempotency-Key row that stores ``response``."""
    key = idempotency.key
    now = utcnow()
    return {
        "key": key.key,
        "route": key.route,
        "request_hash": key.request_hash,
        "status_code": response.status_code,
        "response_body": response.body.decode(),
        "location": response.location,
        "key_created_at": now,
        "expired_before": now - KEY_LIFETIME,
    }


async def create_in_one_statement(
    db: Database,
    principal: Principal,
    request: CreateRequest,
    *,
    request_id: str | None,
    idempotency: Idempotency | None,
    purge_expired_keys: bool | None = None,
) -> CreatedInstance | None:
    """Store the create in one statement, or return None to leave it to the transaction.

    Call it after the request's own fields were checked. ``purge_expired_keys``
    None purges at every PURGE_EVERY-th claim of the process, as the transaction does.
    """
    flavor = _flavors.get(request.flavor_id)
    image_name = _image_names.get(request.image_id)
    group_names = _security_group_names(request)
    if flavor is None or image_name is None or group_names is None or not _takes_one_statement(request):
        return None

    organization_id = principal.organization_id
    values = instance_values(
        organization_id,
        uuid.uuid4(),
        request,
        flavor={"id": str(request.flavor_id), "name": flavor.name, "vcpus": flavor.vcpus,
                "ram": flavor.ram, "disk": flavor.disk},
        image={"id": str(request.image_id), "name": image_name},
        # The default network's id is not known here; the statement stores it and
        # returns it. The response does not show network_ids.
        network_ids=[] if request.networks is None else [str(network) for network in request.networks],
        security_group_names=group_names,
        key_names=request.key_names,
        volumes_attached=[],
        now=utcnow(),
    )
    parameters = _statement_parameters(
        principal, request, values, flavor, image_name, group_names, request_id
    )
    response = None
    if idempotency is not None:
        response = idempotency.render(CreatedInstance(values))
        parameters.update(_key_parameters(idempotency, response))
        if purge_expired_keys is None:
            purge_expired_keys = idempotency_service.purge_due()
    shape = store.CreateShape(
        default_network=request.networks is None,
        idempotency_key=idempotency is not None,
        purge_expired_keys=idempotency is not None and bool(purge_expired_keys),
    )

    async with db.autocommit_driver_connection() as connection:
        outcome = await store.insert_checked(connection, shape, parameters)
    if outcome.network_ids is None:
        if not outcome.catalog_matched:
            _flavors.pop(request.flavor_id, None)
            _image_names.pop(request.image_id, None)
        log.debug(
            "one-statement create changed nothing, running the transaction request_id=%s "
            "organization=%s catalog_matched=%s",
            request_id, organization_id, outcome.catalog_matched,
        )
        return None

    values["network_ids"] = msgspec.json.decode(outcome.network_ids)
    # Columns the statement leaves NULL, so that the record has every column of the row.
    values.update(new_flavor=None, new_host_id=None, old_flavor=None, old_host_id=None)
    if idempotency is not None:
        idempotency.response = response
    log.info(
        "instance create accepted request_id=%s organization=%s instance_id=%s flavor=%s image=%s "
        "volumes=%d",
        request_id, organization_id, values["id"], flavor.name, request.image_id, 0,
    )
    return CreatedInstance(values)
