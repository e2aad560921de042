"""Gateway instances on one real redis-server whose config files define one adapter name
differently (another path) agree on one definition, and it stays.

Before: each instance expected its own path on the replicas and reloaded the adapter in place
whenever a replica held the other one, so the replicas flipped between the two paths at every
poll, for good, and a request met either. Now the first instance to claim the name defines it
for all (``state.definitions``); the other serves that definition and says so (an ERROR naming
both, ``GET /admin/adapters``, ``/health``). A reload that changes the definition in the file
of an instance that has it in force replaces it for every instance. Twin replicas on
loopback; requests through the ``openai`` SDK.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from shared_cluster import AUTH, BASE, TOKEN, eventually, sdk, twin_replicas

from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from loragate.gateway.runner import RunningGateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.server import RunningReplica
from redis_fixture import RedisServer

POLL_S = 0.1


def _doc(
    replicas: list[RunningReplica], redis_url: str, prefix: str, path: Path, **state: Any
) -> dict[str, Any]:
    return {
        "base_model": BASE,
        "replicas": [{"id": f"r{i}", "url": r.url} for i, r in enumerate(replicas)],
        "adapters": [{"name": "x", "path": str(path)}],
        "routing": "round_robin",
        "poller": {"interval_s": POLL_S},
        "admin": {"token": TOKEN},
        "state": {
            "backend": "redis",
            "redis_url": redis_url,
            "key_prefix": prefix,
            "refresh_s": 0.05,
            "maintenance_interval_s": 0.02,
            **state,
        },
    }


async def _roots(http: aiohttp.ClientSession, replicas: list[RunningReplica]) -> set[str | None]:
    """The paths the replicas hold adapter ``x`` from (None: a replica does not hold it)."""
    out: set[str | None] = set()
    for replica in replicas:
        async with http.get(replica.url + "/v1/models") as resp:
            cards = (await resp.json())["data"]
        out.add(next((c["root"] for c in cards if c["id"] == "x"), None))
    return out


async def _admin_adapter(http: aiohttp.ClientSession, gw: RunningGateway) -> dict[str, Any]:
    async with http.get(gw.url + "/admin/adapters", headers=AUTH) as resp:
        assert resp.status == 200
        body = await resp.json()
    return next(a for a in body["adapters"] if a["name"] == "x")


async def _serve_x_through(gws: list[RunningGateway], rounds: int) -> None:
    """Requests for ``x`` through every instance, round robin over the replicas."""
    for _ in range(rounds):
        for gw in gws:
            async with sdk(gw.url) as client:
                done = await client.completions.create(model="x", prompt="hi", max_tokens=2)
            assert done.usage is not None


def _scrapes(gws: list[RunningGateway]) -> list[float]:
    return [s.scraped_at_s for gw in gws for s in gw.gateway.pool.snapshots()]


async def _polls(gws: list[RunningGateway], n: int) -> None:
    """Wait (bounded) until every instance polled every replica ``n`` more times."""
    for _ in range(n):
        before = _scrapes(gws)

        async def probe() -> list[float]:
            return _scrapes(gws)

        def done(now: list[float], before: list[float] = before) -> bool:
            return all(x > y for x, y in zip(now, before, strict=True))

        assert done(await eventually(probe, done)), "an instance stopped polling"


@contextlib.asynccontextmanager
async def _cluster(tmp: Path) -> AsyncIterator[list[RunningReplica]]:
    async with twin_replicas(tmp, 2, 0) as replicas:
        for name in ("x-a", "x-b"):
            write_adapter_folder(str(tmp / name), rank=8)
        yield replicas


async def test_the_first_instance_defines_the_adapter_for_all_and_it_stays(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"defs-{uuid.uuid4().hex[:8]}:"
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(_cluster(tmp_path))
        doc_a = _doc(replicas, redis_server.url, prefix, tmp_path / "x-a")
        doc_b = _doc(replicas, redis_server.url, prefix, tmp_path / "x-b")
        gw_a = await stack.enter_async_context(running_gateway(config_from_mapping(doc_a), port=0))
        with caplog.at_level(logging.ERROR, logger="loragate.gateway.shared"):
            gw_b = await stack.enter_async_context(
                running_gateway(config_from_mapping(doc_b), port=0)
            )
        http = await stack.enter_async_context(aiohttp.ClientSession())
        a_path, b_path = str(tmp_path / "x-a"), str(tmp_path / "x-b")

        # Several poll rounds of both instances with requests through both: the replicas hold
        # A's path, every time we look (before: they flipped to B's and back at every poll).
        seen: set[str | None] = set()
        for _ in range(6):
            await _serve_x_through([gw_a, gw_b], 2)
            seen |= await _roots(http, replicas)
            await _polls([gw_a, gw_b], 1)
            seen |= await _roots(http, replicas)
        assert seen <= {a_path, None}, seen
        assert a_path in seen
        for gw in (gw_a, gw_b):  # routing is the same on both
            assert gw.gateway.catalog.adapters["x"].path == a_path

        # B says so: one ERROR naming both definitions and the config key, and its admin API
        # and /health show the conflict; A has none.
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert "adapter x (config key adapters[0])" in errors[0]
        assert f"path '{b_path}', rank 8" in errors[0] and f"path '{a_path}', rank 8" in errors[0]
        b_view = await _admin_adapter(http, gw_b)
        assert b_view["path"] == a_path
        assert b_view["definition_conflict"]["configured"] == {"path": b_path, "rank": 8}
        assert b_view["definition_conflict"]["in_force"]["path"] == a_path
        assert "definition_conflict" not in await _admin_adapter(http, gw_a)
        async with http.get(gw_b.url + "/health") as resp:
            health = await resp.json()
        assert health["state"]["definition_conflicts"] == ["x"]


async def test_a_reload_that_changes_the_definition_replaces_it_for_every_instance(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"defs-{uuid.uuid4().hex[:8]}:"
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(_cluster(tmp_path))
        a_path, b_path = tmp_path / "x-a", tmp_path / "x-b"
        file_a = tmp_path / "a.yaml"
        file_a.write_text(yaml.safe_dump(_doc(replicas, redis_server.url, prefix, a_path)))
        doc_b = _doc(replicas, redis_server.url, prefix, a_path)
        gw_a = await stack.enter_async_context(
            running_gateway(config_from_mapping(yaml.safe_load(file_a.read_text())), port=0,
                            config_path=file_a)
        )  # fmt: skip
        gw_b = await stack.enter_async_context(running_gateway(config_from_mapping(doc_b), port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        await _serve_x_through([gw_a, gw_b], 2)
        assert await _roots(http, replicas) <= {str(a_path), None}

        # The operator moves x to x-b in A's file and reloads A; B's file still says x-a.
        file_a.write_text(yaml.safe_dump(_doc(replicas, redis_server.url, prefix, b_path)))
        with caplog.at_level(logging.ERROR, logger="loragate.gateway.shared"):
            async with http.post(gw_a.url + "/admin/reload", headers=AUTH) as resp:
                assert resp.status == 200, await resp.text()

            async def paths() -> set[str]:
                return {gw.gateway.catalog.adapters["x"].path for gw in (gw_a, gw_b)}

            assert await eventually(paths, lambda p: p == {str(b_path)}) == {str(b_path)}
        assert any("claimed by instance" in r.getMessage() for r in caplog.records)  # B's
        # And it stays: the replicas end up on x-b and do not go back.
        seen: set[str | None] = set()
        for _ in range(4):
            await _serve_x_through([gw_a, gw_b], 2)
            await _polls([gw_a, gw_b], 1)
            seen |= await _roots(http, replicas)
        assert seen <= {str(b_path), None}, seen


async def test_a_definition_lapses_when_no_instance_whose_file_has_it_is_left(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    prefix = f"defs-{uuid.uuid4().hex[:8]}:"
    short = {"lease_ttl_s": 1.0, "lease_renew_s": 0.2}
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(_cluster(tmp_path))
        a_path, b_path = str(tmp_path / "x-a"), str(tmp_path / "x-b")
        cfg_a = config_from_mapping(_doc(replicas, redis_server.url, prefix, Path(a_path), **short))
        cfg_b = config_from_mapping(_doc(replicas, redis_server.url, prefix, Path(b_path), **short))
        async with running_gateway(cfg_a, port=0):
            gw_b = await stack.enter_async_context(running_gateway(cfg_b, port=0))
            assert gw_b.gateway.catalog.adapters["x"].path == a_path
        # A stopped (or was restarted with another file): nobody renews x-a; B's claim wins.

        async def path() -> str:
            return gw_b.gateway.catalog.adapters["x"].path

        assert await eventually(path, lambda p: p == b_path) == b_path
        assert gw_b.gateway.shared.definition_conflicts() == {}


async def test_a_name_another_instance_s_file_defines_is_a_409_in_the_admin_api(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    prefix = f"defs-{uuid.uuid4().hex[:8]}:"
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(_cluster(tmp_path))
        doc_a = _doc(replicas, redis_server.url, prefix, tmp_path / "x-a")
        doc_b = {**_doc(replicas, redis_server.url, prefix, tmp_path / "x-b"), "adapters": []}
        await stack.enter_async_context(running_gateway(config_from_mapping(doc_a), port=0))
        gw_b = await stack.enter_async_context(running_gateway(config_from_mapping(doc_b), port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        body = {"name": "x", "path": str(tmp_path / "x-b")}
        async with http.post(gw_b.url + "/admin/adapters", json=body, headers=AUTH) as resp:
            assert resp.status == 409, await resp.text()
            error = (await resp.json())["error"]
        assert "defined in the config file of a gateway instance" in error["message"]
        assert "x" not in gw_b.gateway.shared.shared_adapters()


async def _conflicts_gauge(http: aiohttp.ClientSession, gw: RunningGateway) -> float:
    """``loragate_adapter_definition_conflicts`` as ``/metrics`` shows it (it must be there)."""
    async with http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "loragate_adapter_definition_conflicts"
    ]
    assert len(values) == 1, values
    return values[0]


async def test_the_definition_conflicts_gauge_counts_the_adapters_served_otherwise(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    prefix = f"defs-{uuid.uuid4().hex[:8]}:"
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(_cluster(tmp_path))
        a_path, b_path = tmp_path / "x-a", tmp_path / "x-b"
        gw_a = await stack.enter_async_context(
            running_gateway(
                config_from_mapping(_doc(replicas, redis_server.url, prefix, a_path)), port=0
            )
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())
        assert await _conflicts_gauge(http, gw_a) == 0  # exported from 0

        file_b = tmp_path / "b.yaml"
        file_b.write_text(yaml.safe_dump(_doc(replicas, redis_server.url, prefix, b_path)))
        gw_b = await stack.enter_async_context(
            running_gateway(config_from_mapping(yaml.safe_load(file_b.read_text())), port=0,
                            config_path=file_b)
        )  # fmt: skip
        assert gw_b.gateway.catalog.adapters["x"].path == str(a_path)  # A's is in force
        assert await _conflicts_gauge(http, gw_b) == 1
        assert await _conflicts_gauge(http, gw_a) == 0

        # B's file made to agree and reloaded: no conflict left.
        file_b.write_text(yaml.safe_dump(_doc(replicas, redis_server.url, prefix, a_path)))
        async with http.post(gw_b.url + "/admin/reload", headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()

        async def gauge() -> float:
            return await _conflicts_gauge(http, gw_b)

        assert await eventually(gauge, lambda n: n == 0) == 0


async def test_a_name_registered_before_a_config_file_defines_it_stays_the_registration(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reverse case: x registered through the admin API, then defined in A's file (a
    reload). Before, A served its file's definition (its file won in its catalog) and B the
    registration, and the replicas flipped between the two paths. Now the registration is in
    force for both (A says so, as for a conflict between files) until it is deleted, which
    puts A's file's definition in force."""
    prefix = f"defs-{uuid.uuid4().hex[:8]}:"
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(_cluster(tmp_path))
        a_path, b_path = str(tmp_path / "x-a"), str(tmp_path / "x-b")
        file_a = tmp_path / "a.yaml"
        doc_a = {**_doc(replicas, redis_server.url, prefix, Path(a_path)), "adapters": []}
        file_a.write_text(yaml.safe_dump(doc_a))
        gw_a = await stack.enter_async_context(
            running_gateway(config_from_mapping(doc_a), port=0, config_path=file_a)
        )
        doc_b = {**_doc(replicas, redis_server.url, prefix, Path(b_path)), "adapters": []}
        gw_b = await stack.enter_async_context(running_gateway(config_from_mapping(doc_b), port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        body = {"name": "x", "path": b_path}
        async with http.post(gw_b.url + "/admin/adapters", json=body, headers=AUTH) as resp:
            assert resp.status == 201, await resp.text()

        # The operator adds x to A's file, with another path, and reloads A.
        file_a.write_text(yaml.safe_dump(_doc(replicas, redis_server.url, prefix, Path(a_path))))
        with caplog.at_level(logging.ERROR, logger="loragate.gateway.shared"):
            async with http.post(gw_a.url + "/admin/reload", headers=AUTH) as resp:
                assert resp.status == 200, await resp.text()

            async def conflicts() -> float:
                return await _conflicts_gauge(http, gw_a)

            assert await eventually(conflicts, lambda n: n == 1) == 1
        for gw in (gw_a, gw_b):  # one definition: the registration
            assert gw.gateway.catalog.adapters["x"].path == b_path
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert "adapter x (config key adapters[0])" in errors[0]
        assert "registered through the admin API first" in errors[0]
        assert "DELETE /admin/adapters/x" in errors[0]
        a_view = await _admin_adapter(http, gw_a)
        assert a_view["path"] == b_path
        assert a_view["definition_conflict"]["configured"] == {"path": a_path, "rank": 8}
        assert a_view["definition_conflict"]["in_force"]["instance"] == "admin API"
        seen: set[str | None] = set()
        for _ in range(4):
            await _serve_x_through([gw_a, gw_b], 2)
            await _polls([gw_a, gw_b], 1)
            seen |= await _roots(http, replicas)
        assert seen <= {b_path, None}, seen  # no flipping between the two paths
        assert b_path in seen

        # The registration deleted (on A, whose file defines x: not a 409 any more while the
        # registration holds it): A's file's definition is in force; B no longer serves x.
        async with http.delete(gw_a.url + "/admin/adapters/x", headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()

        async def a_serves() -> str:
            return gw_a.gateway.catalog.adapters["x"].path

        assert await eventually(a_serves, lambda p: p == a_path) == a_path
        assert await _conflicts_gauge(http, gw_a) == 0

        async def b_serves() -> bool:  # B learns of the deletion at its next state refresh
            return "x" in gw_b.gateway.catalog.adapters

        assert await eventually(b_serves, lambda served: not served) is False
        async with http.delete(gw_a.url + "/admin/adapters/x", headers=AUTH) as resp:
            assert resp.status == 409  # the file's now: edit the file instead
