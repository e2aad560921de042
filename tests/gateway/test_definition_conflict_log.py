"""A second gateway instance on one real redis-server whose config file defines 200 adapters
differently from the first says so in one ERROR line per claim round (the count and the first
five names; each conflict at DEBUG), not one line per adapter, and says nothing more while
the conflicts stay the same.

Before: 200 ERROR lines at once, one per adapter. Scripted replicas on loopback."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from gateway_harness import BASE, ScriptedReplica

from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from redis_fixture import RedisServer

ADAPTERS = 200
LOGGER = "loragate.gateway.shared"


def _doc(replicas: list[ScriptedReplica], redis_url: str, prefix: str, root: str) -> Any:
    return {
        "base_model": BASE,
        "replicas": [{"id": r.name, "url": r.url} for r in replicas],
        "adapters": [
            {"name": f"cust-{i:04}", "path": f"{root}/cust-{i:04}", "rank": 8}
            for i in range(ADAPTERS)
        ],
        "poller": {"interval_s": 3600},
        "state": {"backend": "redis", "redis_url": redis_url, "key_prefix": prefix},
    }


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


async def test_many_conflicts_make_one_error_line_and_no_more_while_they_stay(
    replicas: list[ScriptedReplica], redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"conflog-{uuid.uuid4().hex[:8]}:"
    doc_a = _doc(replicas, redis_server.url, prefix, "/loras/a")
    doc_b = _doc(replicas, redis_server.url, prefix, "/loras/b")
    async with running_gateway(config_from_mapping(doc_a), port=0):
        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            async with running_gateway(config_from_mapping(doc_b), port=0) as gw_b:
                shared = gw_b.gateway.shared
                assert len(shared.definition_conflicts()) == ADAPTERS
                errors = _records(caplog, logging.ERROR)
                assert len(errors) == 1, errors[:3]
                line = errors[0]
                assert line.startswith(f"{ADAPTERS} adapters of this instance's config file")
                assert "cust-0000, cust-0001, cust-0002, cust-0003, cust-0004 and 195 more" in line
                assert "cust-0005" not in line
                assert "path '/loras/b/cust-0000', rank 8" in line  # the first, both ways
                assert "path '/loras/a/cust-0000', rank 8" in line
                assert "claimed by instance" in line
                # Each conflict, in full, at DEBUG.
                debug = [m for m in _records(caplog, logging.DEBUG) if "config key adapters[" in m]
                assert len(debug) == ADAPTERS
                assert "adapter cust-0199 (config key adapters[199])" in debug[-1]

                # Later claim rounds that find the same conflicts log nothing.
                caplog.clear()
                for _ in range(3):
                    await shared.claim_definitions()
                assert len(shared.definition_conflicts()) == ADAPTERS
                assert _records(caplog, logging.ERROR) == []
                assert _records(caplog, logging.WARNING) == []
