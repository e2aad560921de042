"""Shared pytest configuration."""

from __future__ import annotations

import pytest

pytest_plugins = ["redis_fixture", "resource_leaks"]

# Read by the gateway's config loading: a value in the developer's or CI's environment would
# change what every test's gateway config means (tests that need one set it themselves).
_GATEWAY_ENV = ("LORAGATE_ADMIN_TOKEN", "LORAGATE_METRICS_TOKEN")
# Read when a workload spec names a relative file: a copy of the traces set in the environment
# would change which files the tests' specs read and what their errors say.
_WORKLOAD_ENV = ("LORAGATE_TRACES_DIR",)


@pytest.fixture(autouse=True)
def _no_gateway_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*_GATEWAY_ENV, *_WORKLOAD_ENV):
        monkeypatch.delenv(name, raising=False)
