"""Request and response bodies (msgspec structs), in the contract's field order."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

# An aware UTC datetime without microseconds, which msgspec writes as
# "2024-01-15T10:30:00Z" (RFC 3339, second precision, Z suffix).
Timestamp = datetime


# --- errors -------------------------------------------------------------------------


class ErrorDetail(Struct):
    code: int
    type: str
    message: str
    details: dict[str, Any] | None
    request_id: str


class ErrorBody(Struct):
    error: ErrorDetail


# --- pagination ---------------------------------------------------------------------


class PageMeta(Struct):
    total: int
    limit: int
    marker: uuid.UUID | None
    has_more: bool


class PageLinks(Struct):
    self: str
    next: str | None
    previous: str | None


# --- catalog ------------------------------------------------------------------------


class Flavor(Struct):
    id: uuid.UUID
    name: str
    vcpus: int
    ram: Annotated[int, Meta(description="RAM in MiB")]
    disk: Annotated[int, Meta(description="Root disk in GiB")]
    is_public: bool
    created_at: Timestamp


class FlavorList(Struct):
    flavors: list[Flavor]
    meta: PageMeta
    links: PageLinks


class FlavorCreate(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=255)]
    vcpus: Annotated[int, Meta(ge=1, le=1024)]
    ram: Annotated[int, Meta(ge=64, le=16 * 1024 * 1024, description="MiB")]
    disk: Annotated[int, Meta(ge=0, le=100_000, description="GiB")]
    is_public: bool = True


class Image(Struct):
    id: uuid.UUID
    name: str
    os_distro: str
    os_version: str
    min_disk: Annotated[int, Meta(description="GiB")]
    min_ram: Annotated[int, Meta(description="MiB")]
    status: str
    created_at: Timestamp


class ImageList(Struct):
    images: list[Image]
    meta: PageMeta
    links: PageLinks


class ImageCreate(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=255)]
    os_distro: Annotated[str, Meta(min_length=1, max_length=64)]
    os_version: Annotated[str, Meta(min_length=1, max_length=64)]
    min_disk: Annotated[int, Meta(ge=0, le=100_000)] = 0
    min_ram: Annotated[int, Meta(ge=0, le=16 * 1024 * 1024)] = 0


# --- instances ----------------------------------------------------------------------


class FlavorRef(Struct):
    id: uuid.UUID
    name: str
    vcpus: int
    ram: int
    disk: int


class ImageRef(Struct):
    id: uuid.UUID
    name: str


class Address(Struct):
    addr: str
    version: int
    type: str
    mac_addr: str


class SecurityGroupRef(Struct):
    name: str


class VolumeAttachment(Struct):
    id: uuid.UUID
    device: str
    delete_on_termination: bool


class Fault(Struct):
    code: int
    message: str
    details: str | None
    created: Timestamp


class Instance(Struct):
    id: uuid.UUID
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
    volumes_attached: list[VolumeAttachment]
    key_names: list[str]
    metadata: dict[str, str]
    tags: list[str]
    fault: Fault | None
    created_at: Timestamp
    updated_at: Timestamp
    launched_at: Timestamp | None
    terminated_at: Timestamp | None


class InstanceList(Struct):
    instances: list[Instance]
    meta: PageMeta
    links: PageLinks


InstanceName = Annotated[str, Meta(min_length=1, max_length=255)]
Description = Annotated[str, Meta(max_length=1024)]
MetadataMap = Annotated[dict[str, str], Meta(max_length=128)]
TagList = Annotated[list[Annotated[str, Meta(min_length=1, max_length=60)]], Meta(max_length=50)]


class InstanceCreate(Struct, forbid_unknown_fields=True):
    name: InstanceName
    flavor_id: uuid.UUID
    image_id: uuid.UUID
    description: Description = ""
    networks: Annotated[list[uuid.UUID], Meta(max_length=16)] | None = None
    key_names: Annotated[list[str], Meta(max_length=16)] = msgspec.field(default_factory=list)
    security_groups: Annotated[list[str], Meta(max_length=16)] | None = None
    metadata: MetadataMap = msgspec.field(default_factory=dict)
    tags: TagList = msgspec.field(default_factory=list)


class InstanceUpdate(Struct, forbid_unknown_fields=True):
    name: InstanceName | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType = msgspec.UNSET
    metadata: MetadataMap | msgspec.UnsetType = msgspec.UNSET
    tags: TagList | msgspec.UnsetType = msgspec.UNSET


# --- operations ---------------------------------------------------------------------


class Health(Struct):
    status: str
