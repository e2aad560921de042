"""Fixtures: scripted replicas (``gateway_harness.ScriptedReplica``) on loopback sockets."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from gateway_harness import ScriptedReplica, serving


@pytest.fixture
async def replicas() -> AsyncIterator[list[ScriptedReplica]]:
    """Two scripted replicas, r0 and r1; ``replica.runner`` stops one (a dead replica)."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i in range(2):
            rep = ScriptedReplica(f"r{i}")
            rep.url, rep.runner = await stack.enter_async_context(serving(rep.app))  # type: ignore[attr-defined]
            out.append(rep)
        yield out
