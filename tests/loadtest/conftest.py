"""Fixtures of the loadtest tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica


@pytest.fixture
async def replica_url() -> AsyncIterator[str]:
    """A simulated replica serving ``tiny-llama`` on loopback."""
    async with run_replica(
        ReplicaConfig(served_model_name="tiny-llama"), host="127.0.0.1", port=0
    ) as replica:
        yield replica.url
