"""Service settings, read once from the environment (prefix ``MYCLOUD_``)."""

from __future__ import annotations

import ipaddress
from functools import cached_property
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mycloud_compute.persistence.urls import DatabaseUrlError, to_async_url


class Settings(BaseSettings):
    """Every option of the service, documented with its unit."""

    model_config = SettingsConfigDict(env_prefix="MYCLOUD_", extra="ignore", frozen=True)

    database_url: str = Field(
        "sqlite:///mycloud.db",
        description="Database in its plain form: sqlite:///path or postgresql://user@host:port/db.",
    )
    database_read_url: str | None = Field(
        None,
        description="Optional PostgreSQL read replica used for list and show requests.",
    )
    database_pool_size: int = Field(10, ge=1, le=500, description="Connections per process.")
    region: str = Field("spo1", pattern=r"^[a-z0-9-]{1,32}$", description="Region in CRNs.")
    public_url: str | None = Field(
        None,
        description="Origin of pagination links, e.g. https://api.spo1.mycloud.com. "
        "Unset: the request's own scheme and host.",
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated IP addresses or networks whose X-Forwarded-Proto and "
        "X-Forwarded-Host headers are honoured.",
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest request body, bytes.")
    max_query_bytes: int = Field(
        8192, ge=256, le=65536, description="Maximum query string length (after `?`) in bytes; a longer one is a 414."
    )
    max_header_bytes: int = Field(
        16384,
        ge=1024,
        le=1024 * 1024,
        description="Largest total size of the request headers (names and values), bytes; "
        "larger is a 431.",
    )
    rate_limit_per_second: float = Field(
        20,
        ge=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="Requests per second that each token (or, without a token, each client "
        "address) may make on average, per API process: 0, or 0.01 to 1,000,000. "
        "0 turns rate limiting off.",
    )
    rate_limit_burst: int = Field(
        100,
        ge=1,
        le=1_000_000,
        description="Requests a token or client address may make at once after being idle.",
    )
    gc_gen0_threshold: int = Field(
        50_000,
        ge=0,
        le=10_000_000,
        description="Allocations that start a young-generation garbage collection in an API "
        "process, 100 to 10,000,000; the process also freezes the objects built at startup "
        "so that later collections skip them. 0 leaves Python's garbage collector as it is "
        "(threshold 700, nothing frozen).",
    )
    run_worker: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="Run the lifecycle worker inside the API process. auto: yes on SQLite, "
        "no on PostgreSQL (run `mycloud-compute worker` instead).",
    )
    driver_step_delay: float = Field(
        0.5, ge=0, le=60, description="Seconds the simulated driver spends on each step."
    )
    simulated_hosts: str = Field(
        "sim-compute-1:128:524288:4000,sim-compute-2:128:524288:4000,"
        "sim-compute-3:128:524288:4000,sim-compute-4:128:524288:4000",
        description="Simulated inventory: comma-separated NAME:VCPUS:RAM_MIB:DISK_GIB entries.",
    )
    simulated_fail_spawn: str = Field(
        "",
        description="Instance-name prefix for which the simulated driver fails the spawn step, "
        "so the error path can be tried by hand. Empty: spawn never fails.",
    )
    simulated_pause_prefix: str = Field(
        "",
        description="Instance-name prefix that makes the simulated driver pause for an hour in "
        "one operation, for fault tests: with 'pause-', an instance named 'pause-spawn-web' "
        "pauses in spawn. Empty: the driver never pauses.",
    )
    task_lease_seconds: float = Field(
        30, gt=0, le=3600, description="How long a worker owns a task without renewing it."
    )
    worker_poll_interval: float = Field(
        0.2, gt=0, le=60, description="Seconds an idle worker waits before polling again."
    )
    worker_concurrency: int = Field(8, ge=1, le=256, description="Tasks one worker runs at once.")
    log_level: str = Field("INFO", description="Root log level.")

    @field_validator("rate_limit_per_second")
    @classmethod
    def _check_rate_limit(cls, value: float) -> float:
        # Below one request per 100 s, a limited client would get a Retry-After of days.
        if 0 < value < 0.01:
            raise ValueError("must be 0 (off) or at least 0.01 requests per second")
        return value

    @field_validator("gc_gen0_threshold")
    @classmethod
    def _check_gc_threshold(cls, value: int) -> int:
        if 0 < value < 100:
            raise ValueError("must be 0 (leave the garbage collector as it is) or at least 100")
        return value

    @field_validator("database_url", "database_read_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                to_async_url(value)
            except DatabaseUrlError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @field_validator("simulated_hosts")
    @classmethod
    def _check_simulated_hosts(cls, value: str) -> str:
        # Imported here: the driver module itself imports Settings.
        from mycloud_compute.drivers.simulated import parse_host_inventory

        parse_host_inventory(value)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, value: str) -> str:
        for item in value.split(","):
            if item.strip():
                try:
                    ipaddress.ip_network(item.strip(), strict=False)
                except ValueError as exc:
                    raise ValueError(f"invalid proxy address or network {item.strip()!r}") from exc
        return value

    @field_validator("public_url")
    @classmethod
    def _strip_public_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("public_url must start with http:// or https://")
        return value.rstrip("/")

    @cached_property
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(
            ipaddress.ip_network(item.strip(), strict=False)
            for item in self.trusted_proxies.split(",")
            if item.strip()
        )

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def worker_in_api(self) -> bool:
        if self.run_worker == "auto":
            return self.is_sqlite
        return self.run_worker == "yes"


def load_settings() -> Settings:
    return Settings()
