"""Response models of the Compute API, decoded with msgspec.

Unknown fields are ignored, so a server that adds fields does not break an older
SDK. Ids are kept as strings, timestamps as aware ``datetime`` values in UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar

from msgspec import Struct

__all__ = [
    "Action",
    "Address",
    "Fault",
    "Flavor",
    "FlavorRef",
    "Host",
    "Image",
    "ImageRef",
    "Instance",
    "KeyPair",
    "Network",
    "Page",
    "PageLinks",
    "PageMeta",
    "SecurityGroup",
    "SecurityGroupRef",
    "SecurityGroupRule",
    "Volume",
    "VolumeAttachment",
    "VolumeRef",
]

ItemT = TypeVar("ItemT")


class PageMeta(Struct):
    """Paging state of one list response.

    ``marker`` is the id (the name for key pairs) of the last item on the page.
    """

    total: int
    limit: int
    marker: str | None
    has_more: bool


class PageLinks(Struct):
    self: str
    next: str | None
    previous: str | None


class Page(Struct, Generic[ItemT]):
    """One page of a list: its items, ``meta`` and ``links``."""

    items: list[ItemT]
    meta: PageMeta
    links: PageLinks


class FlavorRef(Struct):
    id: str
    name: str
    vcpus: int
    ram: int
    disk: int


class ImageRef(Struct):
    id: str
    name: str


class Address(Struct):
    addr: str
    version: int
    type: str
    mac_addr: str


class SecurityGroupRef(Struct):
    name: str


class VolumeRef(Struct):
    """A volume as an instance lists it in ``volumes_attached``."""

    id: str
    device: str
    delete_on_termination: bool


class Fault(Struct):
    code: int
    message: str
    details: str | None
    created: datetime


class Instance(Struct):
    id: str
    crn: str
    name: str
    description: str
    status: str
    power_state: str
    task_state: str | None
    vm_state: str
    flavor: FlavorRef
    image: ImageRef
    addresses: dict[str, list[Address]]
    security_groups: list[SecurityGroupRef]
    volumes_attached: list[VolumeRef]
    key_names: list[str]
    metadata: dict[str, str]
    tags: list[str]
    fault: Fault | None
    created_at: datetime
    updated_at: datetime
    launched_at: datetime | None
    terminated_at: datetime | None


class Action(Struct):
    """One record of an instance's action history."""

    id: str
    instance_id: str
    action: str
    status: str
    request_id: str | None
    started_at: datetime
    finished_at: datetime | None
    message: str | None
    token_name: str | None = None


class Flavor(Struct):
    id: str
    name: str
    vcpus: int
    ram: int
    disk: int
    is_public: bool
    created_at: datetime


class Image(Struct):
    id: str
    name: str
    os_distro: str
    os_version: str
    min_disk: int
    min_ram: int
    status: str
    created_at: datetime


class Network(Struct):
    id: str
    crn: str
    name: str
    cidr: str
    ip_version: int
    created_at: datetime


class KeyPair(Struct):
    name: str
    public_key: str
    fingerprint: str
    type: str
    created_at: datetime


class SecurityGroupRule(Struct):
    id: str
    direction: str
    protocol: str | None
    port_range_min: int | None
    port_range_max: int | None
    remote_ip_prefix: str | None


class SecurityGroup(Struct):
    id: str
    name: str
    description: str
    rules: list[SecurityGroupRule]
    created_at: datetime


class VolumeAttachment(Struct):
    """The instance a volume is attached to, and its device there."""

    instance_id: str
    device: str


class Volume(Struct):
    id: str
    crn: str
    name: str
    size_gb: int
    status: str
    attachments: list[VolumeAttachment]
    created_at: datetime


class Host(Struct):
    id: str
    name: str
    vcpus: int
    ram: int
    disk: int
    vcpus_used: int
    ram_used: int
    disk_used: int
    instance_count: int
    status: str

