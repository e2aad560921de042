"""A gateway instance on Redis renews its config file's adapter definitions without sending
them again: one small script (its lease key, ``P deflease:I|G``) every ``lease_renew_s``,
whatever the number of adapters, and the definitions stay in force past ``lease_ttl_s``.

Before, every renewal sent every claim (one EVALSHA whose argument held every adapter's
name, path and rank: 168 KB with 1,200 adapters) and the script rewrote every entry, every
10 s, on every instance: 19-81 ms each in Redis's slowlog, in front of every routing call.
Counted here with Redis's SLOWLOG at 0 µs (every command, with its argument sizes)."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from gateway_harness import BASE, ScriptedReplica

from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from redis_fixture import RedisServer

ADAPTERS = 200
LEASE_TTL_S = 1.0
RENEW_S = 0.1


def _doc(replicas: list[ScriptedReplica], redis_url: str, prefix: str, root: str) -> Any:
    return {
        "base_model": BASE,
        "replicas": [{"id": r.name, "url": r.url} for r in replicas],
        "adapters": [
            {"name": f"cust-{i:04}", "path": f"{root}/cust-{i:04}", "rank": 8}
            for i in range(ADAPTERS)
        ],
        "poller": {"interval_s": 3600},
        "state": {
            "backend": "redis",
            "redis_url": redis_url,
            "key_prefix": prefix,
            "lease_ttl_s": LEASE_TTL_S,
            "lease_renew_s": RENEW_S,
            "maintenance_interval_s": 0.02,
        },
    }


def _sent_bytes(entry: dict[str, Any]) -> int:
    """The bytes of a SLOWLOG entry's command and arguments (Redis keeps 128 of each
    argument and says how many more it had)."""
    command = entry["command"]
    more = sum(int(n) for n in re.findall(rb"\.\.\. \((\d+) more bytes\)", command))
    return len(command) + more


async def test_renewals_send_no_claims_and_the_definitions_stay_in_force(
    replicas: list[ScriptedReplica], redis_server: RedisServer, tmp_path: Path
) -> None:
    prefix = f"renew-{uuid.uuid4().hex[:8]}:"
    client = aioredis.Redis.from_url(redis_server.url)
    doc_a = _doc(replicas, redis_server.url, prefix, "/loras/a")
    try:
        async with running_gateway(config_from_mapping(doc_a), port=0) as gw_a:
            assert len(gw_a.gateway.shared.config_adapters()) == ADAPTERS
            await client.config_set("slowlog-max-len", 100_000)
            await client.config_set("slowlog-log-slower-than", 0)
            await client.slowlog_reset()
            # Two claim lifetimes: without renewals the claims would have lapsed twice.
            await asyncio.sleep(2 * LEASE_TTL_S + 0.5)
            await client.config_set("slowlog-log-slower-than", 10_000)
            log = await client.slowlog_get(100_000)
            # Another instance, whose file defines every adapter elsewhere, finds A's in force.
            doc_b = _doc(replicas, redis_server.url, prefix, "/loras/b")
            async with running_gateway(config_from_mapping(doc_b), port=0) as gw_b:
                served = {a.name: a.path for a in gw_b.gateway.shared.config_adapters()}
                conflicts = gw_b.gateway.shared.definition_conflicts()
    finally:
        await client.aclose()
    assert served == {f"cust-{i:04}": f"/loras/a/cust-{i:04}" for i in range(ADAPTERS)}
    assert len(conflicts) == ADAPTERS
    # (SLOWLOG GET lists the newest first)
    scripts = [e for e in reversed(log) if e["command"].upper().startswith(b"EVALSHA")]
    lease = re.compile(re.escape(prefix.encode()) + rb"deflease:\S+\|\d+ ")  # its first key

    def claims(e: dict[str, Any]) -> bool:
        return b'"name": "cust-' in e["command"]

    def renews(e: dict[str, Any]) -> bool:
        return not claims(e) and lease.search(e["command"]) is not None

    # The claims of the start-up settle first (each move of the store's version, which the
    # first claims make, claims again); then only renewals, each a few bytes.
    last_claim = max((i for i, e in enumerate(scripts) if claims(e)), default=-1)
    renewals = [e for e in scripts[last_claim + 1 :] if renews(e)]
    assert sum(claims(e) for e in scripts) <= 3
    assert len(renewals) >= 5, f"{len(renewals)} renewals after the last claim"
    assert max(_sent_bytes(e) for e in renewals) < 300
