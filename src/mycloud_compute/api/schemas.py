"""Request and response bodies (msgspec structs), in the contract's field order."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from mycloud_compute.services import volumes as volume_rules
from mycloud_compute.services.text import CONTROL_CLASS, WHITESPACE_CLASS

# Patterns of the text rules that the service layer checks. They are written into the
# OpenAPI document only (extra_json_schema), so decoding stays lenient enough for the
# service to reject such text with its own message naming the rule. The character
# classes are C0 and C1 control characters and DEL.
_CONTROL = CONTROL_CLASS
_SPACE = WHITESPACE_CLASS
NAME_PATTERN = rf"^[^{_SPACE}{_CONTROL}]([^{_CONTROL}]*[^{_SPACE}{_CONTROL}])?$"
NO_CONTROL_PATTERN = rf"^[^{_CONTROL}]*$"
DESCRIPTION_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"
TAG_PATTERN = rf"^[^{_SPACE},/{_CONTROL}]([^,/{_CONTROL}]*[^{_SPACE},/{_CONTROL}])?$"
KEYPAIR_NAME_PATTERN = rf"^[^{_SPACE}/{_CONTROL}]([^/{_CONTROL}]*[^{_SPACE}/{_CONTROL}])?$"
CIDR_PATTERN = r"^[0-9A-Fa-f:.]+/[0-9]{1,3}$"

# An aware UTC datetime without microseconds, which msgspec writes as
# "2024-01-15T10:30:00Z" (RFC 3339, second precision, Z suffix).
Timestamp = Annotated[datetime, Meta(extra_json_schema={"format": "date-time"})]


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
    name: Annotated[
        str, Meta(min_length=1, max_length=255, extra_json_schema={"pattern": NAME_PATTERN})
    ]
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
    name: Annotated[
        str, Meta(min_length=1, max_length=255, extra_json_schema={"pattern": NAME_PATTERN})
    ]
    os_distro: Annotated[
        str, Meta(min_length=1, max_length=64, extra_json_schema={"pattern": NO_CONTROL_PATTERN})
    ]
    os_version: Annotated[
        str, Meta(min_length=1, max_length=64, extra_json_schema={"pattern": NO_CONTROL_PATTERN})
    ]
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


InstanceName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=255,
        description="No control characters and no leading or trailing whitespace",
        extra_json_schema={"pattern": NAME_PATTERN},
    ),
]
Description = Annotated[
    str,
    Meta(
        max_length=1024,
        description="No control characters except tab and line breaks",
        extra_json_schema={"pattern": DESCRIPTION_PATTERN},
    ),
]
MetadataMap = Annotated[
    dict[
        str,
        Annotated[str, Meta(extra_json_schema={"maxLength": 255, "pattern": NO_CONTROL_PATTERN})],
    ],
    Meta(
        max_length=128,
        description="Keys of 1 to 255 and values of at most 255 characters, "
        "without control characters",
        extra_json_schema={
            "propertyNames": {"minLength": 1, "maxLength": 255, "pattern": NO_CONTROL_PATTERN}
        },
    ),
]
TagList = Annotated[
    list[
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=60,
                description="No comma, slash or control character, and no leading or "
                "trailing whitespace",
                extra_json_schema={"pattern": TAG_PATTERN},
            ),
        ]
    ],
    Meta(max_length=50, description="Unique tags", extra_json_schema={"uniqueItems": True}),
]


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
    volumes: InstanceVolumeList = msgspec.field(default_factory=list)


class InstanceUpdate(Struct, forbid_unknown_fields=True):
    name: InstanceName | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType = msgspec.UNSET
    metadata: MetadataMap | msgspec.UnsetType = msgspec.UNSET
    tags: TagList | msgspec.UnsetType = msgspec.UNSET


# --- operations ---------------------------------------------------------------------


class Health(Struct):
    status: str


# --- hosts --------------------------------------------------------------------------


class Host(Struct):
    id: uuid.UUID
    name: str
    vcpus: int
    ram: Annotated[int, Meta(description="RAM in MiB")]
    disk: Annotated[int, Meta(description="Disk in GiB")]
    vcpus_used: int
    ram_used: Annotated[int, Meta(description="RAM claimed by the instances on the host, MiB")]
    disk_used: Annotated[int, Meta(description="Disk claimed by the instances on the host, GiB")]
    instance_count: int
    status: Annotated[str, Meta(description="ENABLED or DISABLED (no new instances)")]


class HostList(Struct):
    hosts: list[Host]
    meta: PageMeta
    links: PageLinks


# --- volumes ------------------------------------------------------------------------

VolumeSize = Annotated[
    int,
    Meta(ge=volume_rules.MIN_SIZE_GB, le=volume_rules.MAX_SIZE_GB, description="Size in GiB"),
]


class InstanceAttachment(Struct):
    """The instance a volume is attached to, and the volume's device in that instance."""

    instance_id: uuid.UUID
    device: Annotated[str, Meta(examples=["/dev/vdb"])]


class Volume(Struct):
    id: uuid.UUID
    crn: str
    name: str
    size_gb: Annotated[int, Meta(description="Size in GiB")]
    status: Annotated[str, Meta(description="AVAILABLE, IN_USE or DELETED")]
    attachments: list[InstanceAttachment]
    created_at: Timestamp


class VolumeList(Struct):
    volumes: list[Volume]
    meta: PageMeta
    links: PageLinks


class VolumeCreate(Struct, forbid_unknown_fields=True):
    name: InstanceName
    size_gb: VolumeSize


class InstanceVolume(Struct, forbid_unknown_fields=True):
    """A volume for a new instance: exactly one of size_gb (create) and volume_id (attach)."""

    size_gb: VolumeSize | None = None
    volume_id: Annotated[
        uuid.UUID | None, Meta(description="An AVAILABLE volume of the organization")
    ] = None
    delete_on_termination: Annotated[
        bool, Meta(description="Delete the volume with the instance instead of making it AVAILABLE")
    ] = False


InstanceVolumeList = Annotated[
    list[InstanceVolume],
    Meta(
        max_length=volume_rules.MAX_VOLUMES_PER_INSTANCE,
        description="Volumes attached as /dev/vdb, /dev/vdc, ... in this order",
    ),
]


# --- key pairs ------------------------------------------------------------------------


class KeyPair(Struct):
    name: str
    public_key: Annotated[
        str, Meta(description="OpenSSH public key line: type, base64 key data, optional comment")
    ]
    fingerprint: Annotated[
        str, Meta(description="SHA256 fingerprint as `ssh-keygen -l` prints it: SHA256:<base64>")
    ]
    type: Annotated[
        str,
        Meta(description="OpenSSH key type: ssh-ed25519, ssh-rsa or ecdsa-sha2-nistp256/384/521"),
    ]
    created_at: Timestamp


class KeyPairPageMeta(Struct):
    total: int
    limit: int
    marker: Annotated[str | None, Meta(description="Name of the last key pair on this page")]
    has_more: bool


class KeyPairList(Struct):
    keypairs: list[KeyPair]
    meta: KeyPairPageMeta
    links: PageLinks


class KeyPairCreate(Struct, forbid_unknown_fields=True):
    name: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=255,
            description="Unique in the organization; no '/', not '.' or '..'",
            extra_json_schema={"pattern": KEYPAIR_NAME_PATTERN, "not": {"enum": [".", ".."]}},
        ),
    ]
    public_key: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=16384,
            description="OpenSSH public key: ssh-ed25519, ssh-rsa (2048 to 16384 bits) or "
            "ecdsa-sha2-nistp256/384/521",
        ),
    ]


# --- security groups ------------------------------------------------------------------

PortNumber = Annotated[int, Meta(ge=1, le=65535)]


class SecurityGroupRule(Struct):
    id: uuid.UUID
    direction: Literal["ingress", "egress"]
    protocol: Annotated[
        Literal["tcp", "udp", "icmp"] | None, Meta(description="null: any protocol")
    ]
    port_range_min: Annotated[int | None, Meta(description="null: any port, or not tcp/udp")]
    port_range_max: int | None
    remote_ip_prefix: Annotated[str | None, Meta(description="null: any address")]


class SecurityGroupRuleCreate(Struct, forbid_unknown_fields=True):
    direction: Literal["ingress", "egress"]
    protocol: Annotated[
        Literal["tcp", "udp", "icmp"] | None, Meta(description="null or absent: any protocol")
    ] = None
    port_range_min: (
        Annotated[
            int,
            Meta(ge=1, le=65535, description="tcp and udp only, given together with port_range_max"),
        ]
        | None
    ) = None
    port_range_max: PortNumber | None = None
    remote_ip_prefix: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=64,
                description="CIDR with the host bits zero; null or absent: any address",
                extra_json_schema={"pattern": CIDR_PATTERN},
            ),
        ]
        | None
    ) = None


class SecurityGroup(Struct):
    id: uuid.UUID
    name: str
    description: str
    rules: list[SecurityGroupRule]
    created_at: Timestamp


class SecurityGroupList(Struct):
    security_groups: list[SecurityGroup]
    meta: PageMeta
    links: PageLinks


class SecurityGroupCreate(Struct, forbid_unknown_fields=True):
    name: InstanceName
    description: Description = ""
    rules: Annotated[
        list[SecurityGroupRuleCreate],
        Meta(
            max_length=100,
            description="Unique rules; a rule that repeats another once null and absent "
            "fields and the CIDR are normalized is rejected too",
            extra_json_schema={"uniqueItems": True},
        ),
    ] = msgspec.field(default_factory=list)


# --- networks -------------------------------------------------------------------------


class Network(Struct):
    id: uuid.UUID
    crn: str
    name: str
    cidr: str
    ip_version: int
    created_at: Timestamp


class NetworkList(Struct):
    networks: list[Network]
    meta: PageMeta
    links: PageLinks


class NetworkCreate(Struct, forbid_unknown_fields=True):
    name: InstanceName
    cidr: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=64,
            description="IPv4 /8 to /29 or IPv6 /48 to /124, host bits zero, "
            "e.g. 10.0.0.0/24 or fd00::/64",
            extra_json_schema={"pattern": CIDR_PATTERN},
        ),
    ]


# --- instance actions ---------------------------------------------------------------


class InstanceAction(Struct):
    """One record of an instance's action history."""

    id: uuid.UUID
    instance_id: uuid.UUID
    action: Annotated[
        str,
        Meta(
            description="create, delete, start, stop, reboot, resize, confirm-resize or revert-resize"
        ),
    ]
    status: Annotated[str, Meta(description="RUNNING, SUCCEEDED or FAILED")]
    request_id: Annotated[
        str | None, Meta(description="X-Request-Id of the request that started the action")
    ]
    started_at: Timestamp
    finished_at: Timestamp | None
    message: Annotated[
        str | None,
        Meta(description="Why the action failed or was cancelled; null while it runs and after it succeeded"),
    ]
    token_name: Annotated[str | None, Meta(description="Name of the API token that requested the action")]


class InstanceActionList(Struct):
    actions: list[InstanceAction]
    meta: PageMeta
    links: PageLinks


class InstanceActionEmpty(Struct, forbid_unknown_fields=True):
    """Body of start, stop, confirm-resize and revert-resize: an empty object, or no body at all."""


class InstanceReboot(Struct, forbid_unknown_fields=True):
    type: Annotated[
        Literal["SOFT", "HARD"],
        Meta(description="SOFT restarts through the guest OS; HARD power-cycles the VM"),
    ] = "SOFT"


class InstanceResize(Struct, forbid_unknown_fields=True):
    flavor_id: Annotated[uuid.UUID, Meta(description="The flavor to resize the instance to")]
