"""Client and AsyncClient: thin executors of the calls that _calls builds."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import httpx

from mycloud_compute.client._calls import (
    Call,
    CollectionCalls,
    RetryPolicy,
    action_call,
    decode_response,
    list_params,
    model_decoder,
    page_decoder,
    wait_result,
    without_none,
)
from mycloud_compute.client._exceptions import (
    ConfigurationError,
    ConnectionFailed,
    NotFound,
    WaitTimeout,
)
from mycloud_compute.client._models import (
    Action,
    Flavor,
    Host,
    Image,
    Instance,
    KeyPair,
    Network,
    Page,
    SecurityGroup,
    Volume,
)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

DEFAULT_TIMEOUT = 30.0
URL_VARIABLE = "MYCLOUD_URL"
TOKEN_VARIABLE = "MYCLOUD_TOKEN"
USER_AGENT = "mycloud-compute-sdk/0.1"

INSTANCES = CollectionCalls("/v1/instances", "instances", Instance, idempotent_create=True)
FLAVORS = CollectionCalls("/v1/flavors", "flavors", Flavor)
IMAGES = CollectionCalls("/v1/images", "images", Image)
NETWORKS = CollectionCalls("/v1/networks", "networks", Network)
KEYPAIRS = CollectionCalls("/v1/keypairs", "keypairs", KeyPair)
SECURITY_GROUPS = CollectionCalls("/v1/security-groups", "security_groups", SecurityGroup)
VOLUMES = CollectionCalls("/v1/volumes", "volumes", Volume, idempotent_create=True)
HOSTS = CollectionCalls("/v1/hosts", "hosts", Host)
INSTANCE_DECODER = model_decoder(Instance)


def resolve_settings(base_url: str | None, token: str | None) -> tuple[str, dict[str, str]]:
    """Return the base URL and default headers from the arguments or the environment."""
    base_url = base_url or os.environ.get(URL_VARIABLE)
    token = token or os.environ.get(TOKEN_VARIABLE)
    if not base_url:
        raise ConfigurationError(f"no API URL: pass base_url or set {URL_VARIABLE}")
    if not token:
        raise ConfigurationError(f"no API token: pass token or set {TOKEN_VARIABLE}")
    headers = {"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT}
    return base_url.rstrip("/"), headers


def instance_body(
    name: str,
    flavor_id: str,
    image_id: str,
    optional: Mapping[str, Any],
) -> dict[str, Any]:
    return {"name": name, "flavor_id": flavor_id, "image_id": image_id, **without_none(**optional)}


def image_body(name: str, os_distro: str, os_version: str, min_disk: int, min_ram: int) -> dict[str, Any]:
    return {"name": name, "os_distro": os_distro, "os_version": os_version, "min_disk": min_disk,
            "min_ram": min_ram}


def action_history_call(instance_id: str, limit: int | None, marker: str | None) -> Call[Page[Action]]:
    path = f"{INSTANCES.item_path(instance_id)}/actions"
    return Call("GET", path, page_decoder("actions", Action), params=list_params({}, limit, marker))


def connection_failed(call: Call[Any], error: httpx.TransportError) -> ConnectionFailed:
    return ConnectionFailed(f"{call.method} {call.path} failed: {type(error).__name__}: {error}")


# --- synchronous -----------------------------------------------------------------------


class SyncSender:
    """Sends calls with an httpx.Client and retries them by the RetryPolicy."""

    def __init__(self, http: httpx.Client, retry: RetryPolicy) -> None:
        self.http = http
        self.retry = retry

    def send(self, call: Call[ResultT]) -> ResultT:
        attempt = 0
        while True:
            try:
                response = self.http.request(
                    call.method, call.path, params=call.params, json=call.json, headers=call.headers
                )
            except httpx.TransportError as error:
                delay = self.retry.delay_after_error(attempt, call)
                if delay is None:
                    raise connection_failed(call, error) from error
            else:
                delay = self.retry.delay_after_response(attempt, response)
                if delay is None:
                    return decode_response(call, response)
            time.sleep(delay)
            attempt += 1


class ReadOnlyCollection(Generic[ItemT]):
    """List and show one kind of resource."""

    def __init__(self, sender: SyncSender, calls: CollectionCalls[ItemT]) -> None:
        self._sender = sender
        self._calls = calls

    def list_page(self, *, limit: int | None = None, marker: str | None = None, **filters: Any) -> Page[ItemT]:
        """Fetch one page. List filter values are joined with commas."""
        return self._sender.send(self._calls.list_page(filters, limit, marker))

    def iter(self, *, page_size: int | None = None, **filters: Any) -> Iterator[ItemT]:
        """Yield every matching item, fetching the next page only when it is needed."""
        page = self.list_page(limit=page_size, **filters)
        while True:
            yield from page.items
            call = self._calls.next_page(page)
            if call is None:
                return
            page = self._sender.send(call)

    def get(self, item_id: str) -> ItemT:
        return self._sender.send(self._calls.get(item_id))


class Collection(ReadOnlyCollection[ItemT]):
    """List, show and delete one kind of resource; subclasses add a typed create."""

    def delete(self, item_id: str) -> None:
        self._sender.send(self._calls.delete(item_id))

    def _create(self, body: Mapping[str, Any], idempotency_key: str | None = None) -> ItemT:
        return self._sender.send(self._calls.create(body, idempotency_key))


class Flavors(Collection[Flavor]):
    def create(self, name: str, *, vcpus: int, ram: int, disk: int, is_public: bool = True) -> Flavor:
        """Create a flavor (admin scope); ``ram`` in MiB, ``disk`` in GiB."""
        return self._create({"name": name, "vcpus": vcpus, "ram": ram, "disk": disk, "is_public": is_public})


class Images(Collection[Image]):
    def create(self, name: str, *, os_distro: str, os_version: str, min_disk: int = 0, min_ram: int = 0) -> Image:
        """Create an image entry (admin scope); ``min_disk`` in GiB, ``min_ram`` in MiB."""
        return self._create(image_body(name, os_distro, os_version, min_disk, min_ram))


class Networks(Collection[Network]):
    def create(self, name: str, cidr: str) -> Network:
        return self._create({"name": name, "cidr": cidr})


class KeyPairs(Collection[KeyPair]):
    """Key pairs, named by their name in place of an id."""

    def create(self, name: str, public_key: str) -> KeyPair:
        """Import an OpenSSH public key line as key pair ``name``."""
        return self._create({"name": name, "public_key": public_key})


class SecurityGroups(Collection[SecurityGroup]):
    def create(
        self, name: str, *, description: str = "", rules: Sequence[Mapping[str, Any]] = ()
    ) -> SecurityGroup:
        """Create a group; each rule is a mapping of the API's rule fields (direction, protocol, ...)."""
        return self._create({"name": name, "description": description, "rules": [dict(rule) for rule in rules]})


class Volumes(Collection[Volume]):
    def create(self, name: str, size_gb: int, *, idempotency_key: str | None = None) -> Volume:
        """Create an AVAILABLE volume; a random Idempotency-Key is sent unless one is given."""
        return self._create({"name": name, "size_gb": size_gb}, idempotency_key)


class Instances(Collection[Instance]):
    """Instances: the collection calls, plus update, actions and waiting."""

    def create(
        self,
        name: str,
        flavor_id: str,
        image_id: str,
        *,
        idempotency_key: str | None = None,
        **optional: Any,
    ) -> Instance:
        """Create an instance (202, status BUILD).

        ``optional`` takes the other body fields: description, networks, key_names,
        security_groups, metadata, tags and volumes. A random Idempotency-Key is
        sent unless one is given, so a retry never creates a second instance.
        """
        body = instance_body(name, flavor_id, image_id, optional)
        return self._create(body, idempotency_key)

    def update(self, instance_id: str, **changes: Any) -> Instance:
        """Change name, description, metadata or tags (metadata and tags are replaced)."""
        call = Call("PATCH", INSTANCES.item_path(instance_id), INSTANCE_DECODER, json=changes)
        return self._sender.send(call)

    def start(self, instance_id: str) -> Action:
        return self._sender.send(action_call(instance_id, "start"))

    def stop(self, instance_id: str) -> Action:
        return self._sender.send(action_call(instance_id, "stop"))

    def reboot(self, instance_id: str, *, hard: bool = False) -> Action:
        return self._sender.send(action_call(instance_id, "reboot", {"type": "HARD" if hard else "SOFT"}))

    def resize(self, instance_id: str, flavor_id: str) -> Action:
        return self._sender.send(action_call(instance_id, "resize", {"flavor_id": flavor_id}))

    def confirm_resize(self, instance_id: str) -> Action:
        return self._sender.send(action_call(instance_id, "confirm-resize"))

    def revert_resize(self, instance_id: str) -> Action:
        return self._sender.send(action_call(instance_id, "revert-resize"))

    def actions(self, instance_id: str, *, limit: int | None = None, marker: str | None = None) -> Page[Action]:
        """Fetch one page of the instance's action history, newest first."""
        return self._sender.send(action_history_call(instance_id, limit, marker))

    def wait_for_status(
        self,
        instance_id: str,
        status: str,
        *,
        timeout: float = 300.0,
        interval: float = 1.0,
        on_poll: Callable[[Instance], None] | None = None,
    ) -> Instance | None:
        """Poll until the instance is in ``status`` with no task running.

        Returns the instance, or None when waiting for DELETED and the instance is
        no longer found. Raises WaitTimeout after ``timeout`` seconds and
        InstanceFailed when the instance goes to ERROR instead.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                instance = self.get(instance_id)
            except NotFound:
                if status == "DELETED":
                    return None
                raise
            if on_poll is not None:
                on_poll(instance)
            if wait_result(instance, status) is not None:
                return instance
            if time.monotonic() + interval > deadline:
                raise WaitTimeout(f"instance {instance_id} is {instance.status}, not {status}, after {timeout} s")
            time.sleep(interval)


class Client:
    """Synchronous client of the Compute API.

    ``base_url`` and ``token`` default to MYCLOUD_URL and MYCLOUD_TOKEN. Pass an
    httpx transport (for example ``httpx.MockTransport``) to serve requests
    without a network.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        url, headers = resolve_settings(base_url, token)
        self.base_url = url
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)
        sender = SyncSender(self._http, retry or RetryPolicy())
        self.instances = Instances(sender, INSTANCES)
        self.flavors = Flavors(sender, FLAVORS)
        self.images = Images(sender, IMAGES)
        self.networks = Networks(sender, NETWORKS)
        self.keypairs = KeyPairs(sender, KEYPAIRS)
        self.security_groups = SecurityGroups(sender, SECURITY_GROUPS)
        self.volumes = Volumes(sender, VOLUMES)
        self.hosts = ReadOnlyCollection(sender, HOSTS)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# --- asynchronous ----------------------------------------------------------------------


class AsyncSender:
    """Sends calls with an httpx.AsyncClient and retries them by the RetryPolicy."""

    def __init__(self, http: httpx.AsyncClient, retry: RetryPolicy) -> None:
        self.http = http
        self.retry = retry

    async def send(self, call: Call[ResultT]) -> ResultT:
        attempt = 0
        while True:
            try:
                response = await self.http.request(
                    call.method, call.path, params=call.params, json=call.json, headers=call.headers
                )
            except httpx.TransportError as error:
                delay = self.retry.delay_after_error(attempt, call)
                if delay is None:
                    raise connection_failed(call, error) from error
            else:
                delay = self.retry.delay_after_response(attempt, response)
                if delay is None:
                    return decode_response(call, response)
            await asyncio.sleep(delay)
            attempt += 1


class AsyncReadOnlyCollection(Generic[ItemT]):
    """List and show one kind of resource (async)."""

    def __init__(self, sender: AsyncSender, calls: CollectionCalls[ItemT]) -> None:
        self._sender = sender
        self._calls = calls

    async def list_page(
        self, *, limit: int | None = None, marker: str | None = None, **filters: Any
    ) -> Page[ItemT]:
        return await self._sender.send(self._calls.list_page(filters, limit, marker))

    async def iter(self, *, page_size: int | None = None, **filters: Any) -> AsyncIterator[ItemT]:
        page = await self.list_page(limit=page_size, **filters)
        while True:
            for item in page.items:
                yield item
            call = self._calls.next_page(page)
            if call is None:
                return
            page = await self._sender.send(call)

    async def get(self, item_id: str) -> ItemT:
        return await self._sender.send(self._calls.get(item_id))


class AsyncCollection(AsyncReadOnlyCollection[ItemT]):
    """List, show and delete one kind of resource (async); subclasses add a typed create."""

    async def delete(self, item_id: str) -> None:
        await self._sender.send(self._calls.delete(item_id))

    async def _create(self, body: Mapping[str, Any], idempotency_key: str | None = None) -> ItemT:
        return await self._sender.send(self._calls.create(body, idempotency_key))


class AsyncFlavors(AsyncCollection[Flavor]):
    async def create(self, name: str, *, vcpus: int, ram: int, disk: int, is_public: bool = True) -> Flavor:
        return await self._create({"name": name, "vcpus": vcpus, "ram": ram, "disk": disk, "is_public": is_public})


class AsyncImages(AsyncCollection[Image]):
    async def create(
        self, name: str, *, os_distro: str, os_version: str, min_disk: int = 0, min_ram: int = 0
    ) -> Image:
        return await self._create(image_body(name, os_distro, os_version, min_disk, min_ram))


class AsyncNetworks(AsyncCollection[Network]):
    async def create(self, name: str, cidr: str) -> Network:
        return await self._create({"name": name, "cidr": cidr})


class AsyncKeyPairs(AsyncCollection[KeyPair]):
    async def create(self, name: str, public_key: str) -> KeyPair:
        return await self._create({"name": name, "public_key": public_key})


class AsyncSecurityGroups(AsyncCollection[SecurityGroup]):
    async def create(
        self, name: str, *, description: str = "", rules: Sequence[Mapping[str, Any]] = ()
    ) -> SecurityGroup:
        return await self._create(
            {"name": name, "description": description, "rules": [dict(rule) for rule in rules]}
        )


class AsyncVolumes(AsyncCollection[Volume]):
    async def create(self, name: str, size_gb: int, *, idempotency_key: str | None = None) -> Volume:
        return await self._create({"name": name, "size_gb": size_gb}, idempotency_key)


class AsyncInstances(AsyncCollection[Instance]):
    """Instances (async); see Instances for the behaviour of each method."""

    async def create(
        self,
        name: str,
        flavor_id: str,
        image_id: str,
        *,
        idempotency_key: str | None = None,
        **optional: Any,
    ) -> Instance:
        body = instance_body(name, flavor_id, image_id, optional)
        return await self._create(body, idempotency_key)

    async def update(self, instance_id: str, **changes: Any) -> Instance:
        call = Call("PATCH", INSTANCES.item_path(instance_id), INSTANCE_DECODER, json=changes)
        return await self._sender.send(call)

    async def start(self, instance_id: str) -> Action:
        return await self._sender.send(action_call(instance_id, "start"))

    async def stop(self, instance_id: str) -> Action:
        return await self._sender.send(action_call(instance_id, "stop"))

    async def reboot(self, instance_id: str, *, hard: bool = False) -> Action:
        return await self._sender.send(action_call(instance_id, "reboot", {"type": "HARD" if hard else "SOFT"}))

    async def resize(self, instance_id: str, flavor_id: str) -> Action:
        return await self._sender.send(action_call(instance_id, "resize", {"flavor_id": flavor_id}))

    async def confirm_resize(self, instance_id: str) -> Action:
        return await self._sender.send(action_call(instance_id, "confirm-resize"))

    async def revert_resize(self, instance_id: str) -> Action:
        return await self._sender.send(action_call(instance_id, "revert-resize"))

    async def actions(
        self, instance_id: str, *, limit: int | None = None, marker: str | None = None
    ) -> Page[Action]:
        return await self._sender.send(action_history_call(instance_id, limit, marker))

    async def wait_for_status(
        self,
        instance_id: str,
        status: str,
        *,
        # The same signature as Instances.wait_for_status, so code moves between the two.
        timeout: float = 300.0,  # noqa: ASYNC109
        interval: float = 1.0,
        on_poll: Callable[[Instance], None] | None = None,
    ) -> Instance | None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                instance = await self.get(instance_id)
            except NotFound:
                if status == "DELETED":
                    return None
                raise
            if on_poll is not None:
                on_poll(instance)
            if wait_result(instance, status) is not None:
                return instance
            if time.monotonic() + interval > deadline:
                raise WaitTimeout(f"instance {instance_id} is {instance.status}, not {status}, after {timeout} s")
            await asyncio.sleep(interval)


class AsyncClient:
    """Asynchronous client of the Compute API; the same surface as Client, awaited."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url, headers = resolve_settings(base_url, token)
        self.base_url = url
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, transport=transport)
        sender = AsyncSender(self._http, retry or RetryPolicy())
        self.instances = AsyncInstances(sender, INSTANCES)
        self.flavors = AsyncFlavors(sender, FLAVORS)
        self.images = AsyncImages(sender, IMAGES)
        self.networks = AsyncNetworks(sender, NETWORKS)
        self.keypairs = AsyncKeyPairs(sender, KEYPAIRS)
        self.security_groups = AsyncSecurityGroups(sender, SECURITY_GROUPS)
        self.volumes = AsyncVolumes(sender, VOLUMES)
        self.hosts = AsyncReadOnlyCollection(sender, HOSTS)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
