"""The Python SDK (mycloud_compute.client) against the real API on SQLite and PostgreSQL.

The retry tests serve requests from an httpx.MockTransport passed to the client,
so they need no server and patch nothing.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import msgspec
import pytest
from conftest import ApiServer, Org, free_port
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import CIRROS_IMAGE, MEDIUM_FLAVOR, SMALL_FLAVOR, TINY_FLAVOR, UBUNTU_IMAGE

import mycloud_compute.client as sdk
from mycloud_compute.client import (
    APIError,
    AsyncClient,
    Client,
    ConfigurationError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    Instance,
    InvalidRequest,
    MycloudError,
    NotFound,
    RetryPolicy,
    ServiceUnavailable,
    Unauthorized,
)

PUBLIC_NAMES = {
    # clients and resources
    "Client", "AsyncClient", "RetryPolicy",
    "ReadOnlyCollection", "Collection", "Instances", "Flavors", "Images", "Networks", "KeyPairs",
    "SecurityGroups", "Volumes",
    "AsyncReadOnlyCollection", "AsyncCollection", "AsyncInstances", "AsyncFlavors", "AsyncImages",
    "AsyncNetworks", "AsyncKeyPairs", "AsyncSecurityGroups", "AsyncVolumes",
    # models
    "Action", "Address", "Fault", "Flavor", "FlavorRef", "Host", "Image", "ImageRef",
    "Instance", "KeyPair", "Network", "Page", "PageLinks", "PageMeta", "SecurityGroup",
    "SecurityGroupRef", "SecurityGroupRule", "Volume", "VolumeAttachment", "VolumeRef",
    # exceptions
    "MycloudError", "APIError", "ConfigurationError", "ConnectionFailed", "WaitTimeout",
    "InstanceFailed", "InvalidRequest", "Unauthorized", "Forbidden", "NotFound", "Conflict",
    "RateLimited", "ServiceUnavailable",
}
EMPTY_PAGE = {
    "flavors": [],
    "meta": {"total": 0, "limit": 20, "marker": None, "has_more": False},
    "links": {"self": "http://api.test/v1/flavors", "next": None, "previous": None},
}
NO_WAIT = RetryPolicy(max_retries=3, backoff=0.0, max_backoff=0.0)


def sdk_client(org: Org, scopes: str = "rw", **options: Any) -> Client:
    return Client(org.api.base_url, org.tokens[scopes], **options)


def error_response(status: int, error_type: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"code": status, "type": error_type, "message": f"{error_type} now",
                      "details": None, "request_id": "req-test"}}
    return httpx.Response(status, json=body, headers=headers or {})


def mock_client(handler: Any, retry: RetryPolicy = NO_WAIT) -> Client:
    return Client("http://api.test", "token", transport=httpx.MockTransport(handler), retry=retry)


def new_public_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


# --- public surface and configuration ---------------------------------------------------


def test_public_surface_is_explicit() -> None:
    assert set(sdk.__all__) == PUBLIC_NAMES
    assert len(sdk.__all__) == len(set(sdk.__all__))
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None


def test_exception_hierarchy() -> None:
    for error_class in (InvalidRequest, Unauthorized, Forbidden, NotFound, Conflict, ServiceUnavailable):
        assert issubclass(error_class, APIError)
    assert issubclass(APIError, MycloudError)
    assert issubclass(ConnectionFailed, MycloudError)
    assert issubclass(ConfigurationError, MycloudError)


def test_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=EMPTY_PAGE)

    monkeypatch.setenv("MYCLOUD_URL", "http://env.test/")
    monkeypatch.setenv("MYCLOUD_TOKEN", "env-token")
    with Client(transport=httpx.MockTransport(handler)) as client:
        client.flavors.list_page()
    assert str(seen[0].url) == "http://env.test/v1/flavors"
    assert seen[0].headers["Authorization"] == "Bearer env-token"


def test_config_missing_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MYCLOUD_URL", raising=False)
    monkeypatch.delenv("MYCLOUD_TOKEN", raising=False)
    with pytest.raises(ConfigurationError, match="MYCLOUD_URL"):
        Client(token="token")
    with pytest.raises(ConfigurationError, match="MYCLOUD_TOKEN"):
        Client("http://api.test")


# --- retries (mock transport) -----------------------------------------------------------


def test_retry_honours_retry_after() -> None:
    sent: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(time.monotonic())
        if len(sent) == 1:
            return error_response(503, "service_unavailable", {"Retry-After": "1"})
        return httpx.Response(200, json=EMPTY_PAGE)

    with mock_client(handler) as client:
        page = client.flavors.list_page()
    assert page.items == []
    assert len(sent) == 2
    assert sent[1] - sent[0] >= 0.95


def test_retry_on_429_then_success() -> None:
    statuses = iter([429, 429, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(statuses)
        if status == 429:
            return error_response(429, "rate_limited", {"Retry-After": "0"})
        return httpx.Response(200, json=EMPTY_PAGE)

    with mock_client(handler) as client:
        assert client.flavors.list_page().meta.total == 0


def test_retry_budget_exhausted_raises() -> None:
    count = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal count
        count += 1
        return error_response(503, "service_unavailable", {"Retry-After": "0"})

    with mock_client(handler) as client, pytest.raises(ServiceUnavailable) as caught:
        client.flavors.list_page()
    assert count == 1 + NO_WAIT.max_retries
    assert caught.value.status == 503
    assert caught.value.request_id == "req-test"


def test_get_retried_after_connection_error() -> None:
    count = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal count
        count += 1
        if count == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=EMPTY_PAGE)

    with mock_client(handler) as client:
        client.flavors.list_page()
    assert count == 2


def test_create_without_key_not_retried() -> None:
    count = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal count
        count += 1
        raise httpx.ReadTimeout("timed out", request=request)

    with mock_client(handler) as client, pytest.raises(ConnectionFailed):
        client.networks.create("net", "10.0.0.0/24")
    assert count == 1


def test_instance_create_retried_with_same_key() -> None:
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        raise httpx.ReadTimeout("timed out", request=request)

    with mock_client(handler) as client, pytest.raises(ConnectionFailed):
        client.instances.create("web-1", SMALL_FLAVOR, UBUNTU_IMAGE)
    assert len(keys) == 1 + NO_WAIT.max_retries
    assert len(set(keys)) == 1
    assert uuid.UUID(keys[0])


def test_retry_after_http_date_and_garbage() -> None:
    from mycloud_compute.client._calls import parse_retry_after

    assert parse_retry_after("5") == 5.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_error_without_envelope() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, text="Invalid HTTP request received.")

    with mock_client(handler) as client, pytest.raises(InvalidRequest) as caught:
        client.flavors.list_page()
    assert caught.value.type == "unknown"
    assert "Invalid HTTP request" in caught.value.message


# --- against the real API ---------------------------------------------------------------


def test_instance_create_show_wait_delete(org: Org) -> None:
    with sdk_client(org) as client:
        created = client.instances.create("sdk-web-1", SMALL_FLAVOR, UBUNTU_IMAGE, tags=["web"],
                                          metadata={"role": "web"})
        assert isinstance(created, Instance)
        assert created.status == "BUILD"
        assert created.tags == ["web"]

        active = client.instances.wait_for_status(created.id, "ACTIVE", timeout=30, interval=0.05)
        assert active is not None
        assert active.power_state == "RUNNING"
        assert client.instances.get(created.id).addresses

        updated = client.instances.update(created.id, name="sdk-web-2", tags=["web", "blue"])
        assert updated.name == "sdk-web-2"
        assert updated.tags == ["web", "blue"]

        client.instances.delete(created.id)
        assert client.instances.wait_for_status(created.id, "DELETED", timeout=30, interval=0.05) is None
        with pytest.raises(NotFound):
            client.instances.get(created.id)


def test_instance_list_filters(org: Org) -> None:
    prefix = f"flt-{uuid.uuid4().hex[:6]}"
    with sdk_client(org) as client:
        small = client.instances.create(f"{prefix}-a", SMALL_FLAVOR, UBUNTU_IMAGE, tags=["web", "prod"])
        tiny = client.instances.create(f"{prefix}-b", TINY_FLAVOR, CIRROS_IMAGE, tags=["db"])
        for instance in (small, tiny):
            client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)
        client.instances.stop(tiny.id)
        client.instances.wait_for_status(tiny.id, "SHUTOFF", timeout=30, interval=0.05)

        def names(**filters: Any) -> list[str]:
            return [item.name for item in client.instances.list_page(**filters).items]

        assert names(name=f"{prefix}-*") == [f"{prefix}-b", f"{prefix}-a"]
        assert names(name=f"{prefix}-a") == [f"{prefix}-a"]
        assert names(name=f"{prefix}-*", status="shutoff") == [f"{prefix}-b"]
        assert names(name=f"{prefix}-*", status=["ACTIVE", "SHUTOFF"]) == [f"{prefix}-b", f"{prefix}-a"]
        assert names(name=f"{prefix}-*", tags=["web", "prod"]) == [f"{prefix}-a"]
        assert names(name=f"{prefix}-*", flavor_id=TINY_FLAVOR) == [f"{prefix}-b"]
        assert names(name=f"{prefix}-*", image_id=UBUNTU_IMAGE) == [f"{prefix}-a"]
        assert names(name=f"{prefix}-*", flavor_id=MEDIUM_FLAVOR) == []


def test_instance_iter_follows_pages(org: Org) -> None:
    prefix = f"page-{uuid.uuid4().hex[:6]}"
    with sdk_client(org) as client:
        created = [client.instances.create(f"{prefix}-{index}", SMALL_FLAVOR, UBUNTU_IMAGE)
                   for index in range(5)]
        first = client.instances.list_page(name=f"{prefix}-*", limit=2)
        assert first.meta.total == 5
        assert first.meta.has_more is True
        assert first.links.next is not None

        second = client.instances.list_page(name=f"{prefix}-*", limit=2, marker=first.meta.marker)
        assert [item.id for item in second.items] == [created[2].id, created[1].id]

        walked = [item.id for item in client.instances.iter(name=f"{prefix}-*", page_size=2)]
        assert walked == [instance.id for instance in reversed(created)]


def test_instance_actions_and_history(org: Org) -> None:
    with sdk_client(org) as client:
        instance = client.instances.create("sdk-act", SMALL_FLAVOR, UBUNTU_IMAGE)
        client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)

        stop = client.instances.stop(instance.id)
        assert stop.action == "stop"
        assert stop.instance_id == instance.id
        client.instances.wait_for_status(instance.id, "SHUTOFF", timeout=30, interval=0.05)
        client.instances.start(instance.id)
        client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)
        client.instances.reboot(instance.id, hard=True)
        client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)
        client.instances.reboot(instance.id)
        client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)

        client.instances.resize(instance.id, MEDIUM_FLAVOR)
        resized = client.instances.wait_for_status(instance.id, "VERIFY_RESIZE", timeout=30, interval=0.05)
        assert resized is not None
        assert resized.flavor.id == MEDIUM_FLAVOR
        client.instances.revert_resize(instance.id)
        reverted = client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)
        assert reverted is not None
        assert reverted.flavor.id == SMALL_FLAVOR
        client.instances.resize(instance.id, MEDIUM_FLAVOR)
        client.instances.wait_for_status(instance.id, "VERIFY_RESIZE", timeout=30, interval=0.05)
        client.instances.confirm_resize(instance.id)
        confirmed = client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)
        assert confirmed is not None
        assert confirmed.flavor.id == MEDIUM_FLAVOR

        history = client.instances.actions(instance.id, limit=100)
        assert [record.action for record in history.items] == [
            "confirm-resize", "resize", "revert-resize", "resize", "reboot", "reboot", "start",
            "stop", "create",
        ]


def test_catalog_and_organization_resources(org: Org) -> None:
    with sdk_client(org) as client:
        flavors = list(client.flavors.iter())
        assert "m1.small" in [flavor.name for flavor in flavors]
        assert client.flavors.get(SMALL_FLAVOR).name == "m1.small"
        assert client.images.get(UBUNTU_IMAGE).name == "Ubuntu 22.04 LTS"
        assert client.images.list_page(limit=1).meta.has_more is True

        network = client.networks.create(name="sdk-net", cidr="10.20.0.0/24")
        assert client.networks.get(network.id).cidr == "10.20.0.0/24"
        assert network.id in [item.id for item in client.networks.iter()]
        client.networks.delete(network.id)

        keypair = client.keypairs.create(name="sdk-key-1", public_key=new_public_key())
        assert client.keypairs.get(keypair.name).fingerprint.startswith("SHA256:")
        client.keypairs.delete(keypair.name)

        group = client.security_groups.create("sdk-web", rules=[
            {"direction": "ingress", "protocol": "tcp", "port_range_min": 22, "port_range_max": 22}])
        assert client.security_groups.get(group.id).rules[0].port_range_min == 22
        client.security_groups.delete(group.id)

        volume = client.volumes.create(name="sdk-vol", size_gb=10)
        assert client.volumes.get(volume.id).status == "AVAILABLE"
        client.volumes.delete(volume.id)
        with pytest.raises(NotFound):
            client.volumes.get(volume.id)


def test_admin_catalog_and_hosts(org: Org) -> None:
    suffix = uuid.uuid4().hex[:6]
    with sdk_client(org, "admin") as admin:
        flavor = admin.flavors.create(f"sdk.f-{suffix}", vcpus=1, ram=512, disk=5, is_public=False)
        assert admin.flavors.get(flavor.id).is_public is False
        admin.flavors.delete(flavor.id)

        image = admin.images.create(f"sdk-i-{suffix}", os_distro="ubuntu", os_version="24.04", min_disk=3)
        assert admin.images.get(image.id).min_disk == 3
        admin.images.delete(image.id)

        hosts = list(admin.hosts.iter())
        assert hosts
        assert admin.hosts.get(hosts[0].id).name == hosts[0].name


def test_volume_create_sends_idempotency_key() -> None:
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("Idempotency-Key"))
        raise httpx.ConnectError("connection refused", request=request)

    with mock_client(handler) as client, pytest.raises(ConnectionFailed):
        client.volumes.create("data", 10, idempotency_key="my-key")
    assert keys == ["my-key"] * (1 + NO_WAIT.max_retries)


def test_error_classes_from_server(org: Org, api: ApiServer) -> None:
    with sdk_client(org) as client:
        with pytest.raises(NotFound) as not_found:
            client.instances.get(str(uuid.uuid4()))
        assert not_found.value.status == 404
        assert not_found.value.type == "not_found"
        assert not_found.value.request_id

        with pytest.raises(InvalidRequest) as invalid:
            client.instances.list_page(status="SLEEPING")
        assert invalid.value.type == "invalid_parameter"
        assert invalid.value.details is not None
        assert invalid.value.details["parameter"] == "status"

        instance = client.instances.create("sdk-conflict", SMALL_FLAVOR, UBUNTU_IMAGE)
        client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)
        with pytest.raises(Conflict) as conflict:
            client.instances.start(instance.id)
        assert conflict.value.type == "conflict"

    with sdk_client(org, "read") as reader, pytest.raises(Forbidden) as forbidden:
        reader.volumes.create(name="nope", size_gb=1)
    assert forbidden.value.type == "forbidden"

    with Client(api.base_url, "mcp_not-a-token") as stranger, pytest.raises(Unauthorized) as denied:
        stranger.instances.list_page()
    assert denied.value.status == 401
    assert denied.value.request_id


def test_server_down_raises_connection_failed() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, "token", retry=NO_WAIT) as client, pytest.raises(ConnectionFailed) as caught:
        client.flavors.list_page()
    assert "GET /v1/flavors" in str(caught.value)


async def test_async_client(org: Org) -> None:
    async with AsyncClient(org.api.base_url, org.tokens["rw"]) as client:
        instance = await client.instances.create("sdk-async", SMALL_FLAVOR, UBUNTU_IMAGE)
        active = await client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)
        assert active is not None
        names = [item.name async for item in client.instances.iter(name="sdk-async", page_size=1)]
        assert names == ["sdk-async"]
        await client.instances.delete(instance.id)
        network = await client.networks.create("sdk-async-net", "10.40.0.0/24")
        assert (await client.networks.get(network.id)).name == "sdk-async-net"
        await client.networks.delete(network.id)
        with pytest.raises(NotFound):
            await client.flavors.get(str(uuid.uuid4()))


def test_models_round_trip_json(org: Org) -> None:
    with sdk_client(org) as client:
        instance = client.instances.create("sdk-json", SMALL_FLAVOR, UBUNTU_IMAGE)
    encoded = msgspec.json.encode(instance)
    assert msgspec.json.decode(encoded, type=Instance) == instance
