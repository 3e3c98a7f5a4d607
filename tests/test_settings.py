"""Settings: every option is documented, and bad values stop the process."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mycloud_compute.settings import Settings

CONFIGURATION_PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_setting_documented(field: str) -> None:
    assert f"`MYCLOUD_{field.upper()}`" in CONFIGURATION_PAGE.read_text()


def test_database_url_rejects_other_databases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYCLOUD_DATABASE_URL", "mysql://root@localhost/compute")
    with pytest.raises(ValidationError, match="unsupported database"):
        Settings()


def test_public_url_needs_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYCLOUD_PUBLIC_URL", "api.example.com")
    with pytest.raises(ValidationError, match="http"):
        Settings()


def test_public_url_trailing_slash_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYCLOUD_PUBLIC_URL", "https://api.spo1.mycloud.com/")
    assert Settings().public_url == "https://api.spo1.mycloud.com"


def test_trusted_proxies_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYCLOUD_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8")
    networks = Settings().trusted_proxy_networks
    assert [str(network) for network in networks] == ["127.0.0.1/32", "10.0.0.0/8"]


def test_worker_in_api_follows_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYCLOUD_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/x")
    assert Settings().worker_in_api is False
    monkeypatch.setenv("MYCLOUD_DATABASE_URL", "sqlite:///x.db")
    assert Settings().worker_in_api is True


def test_trusted_proxies_rejects_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYCLOUD_TRUSTED_PROXIES", "127.0.0.1,proxy.local")
    with pytest.raises(ValidationError, match="proxy.local"):
        Settings()


def test_simulated_hosts_rejects_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad inventory used to start the service and then kill its embedded worker."""
    monkeypatch.setenv("MYCLOUD_SIMULATED_HOSTS", "bad")
    with pytest.raises(ValidationError, match="invalid simulated host 'bad'"):
        Settings()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("inf", "finite number"),
        ("nan", "finite number"),
        ("1e400", "finite number"),
        ("2000000", "less than or equal to 1000000"),
        ("0.0000001", "at least 0.01"),
        ("-1", "greater than or equal to 0"),
    ],
)
def test_rate_limit_rejects_extremes(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv("MYCLOUD_RATE_LIMIT_PER_SECOND", value)
    with pytest.raises(ValidationError, match=message):
        Settings()


@pytest.mark.parametrize("value", ["0", "0.01", "0.5", "1000000"])
def test_rate_limit_accepts_range(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MYCLOUD_RATE_LIMIT_PER_SECOND", value)
    assert Settings().rate_limit_per_second == float(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("50", "at least 100"),
        ("-1", "greater than or equal to 0"),
        ("20000000", "less than or equal to 10000000"),
        ("1.5", "valid integer"),
    ],
)
def test_gc_threshold_rejects_out_of_range(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv("MYCLOUD_GC_GEN0_THRESHOLD", value)
    with pytest.raises(ValidationError, match=message):
        Settings()


@pytest.mark.parametrize("value", ["0", "100", "50000", "10000000"])
def test_gc_threshold_accepts_range(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MYCLOUD_GC_GEN0_THRESHOLD", value)
    assert Settings().gc_gen0_threshold == int(value)
