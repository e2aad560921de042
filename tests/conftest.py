"""Shared pytest configuration."""

from __future__ import annotations

import pytest

pytest_plugins = ["redis_fixture", "resource_leaks"]

# Read by the gateway's config loading: a value in the developer's or CI's environment would
# change what every test's gateway config means (tests that need one set it themselves).
_GATEWAY_ENV = ("LORAGATE_ADMIN_TOKEN", "LORAGATE_METRICS_TOKEN")


@pytest.fixture(autouse=True)
def _no_gateway_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _GATEWAY_ENV:
        monkeypatch.delenv(name, raising=False)
