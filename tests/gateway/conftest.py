"""Fixtures: scripted replicas (``gateway_harness.ScriptedReplica``) on loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from gateway_harness import ScriptedReplica, serving_replicas


@pytest.fixture
async def replicas() -> AsyncIterator[list[ScriptedReplica]]:
    """Two scripted replicas, r0 and r1; ``replica.runner`` stops one (a dead replica)."""
    async with serving_replicas(ScriptedReplica) as out:
        yield out
