"""``PUT``/``POST /admin/adapters`` against ``loragate replica --simulated`` processes that are
SIGSTOPped meanwhile (their loads hang until SIGCONT), over real loopback.

Before: a ``PUT`` whose client went away (a client or ingress timeout cancels the handler)
left the refused definition in force, every request for the name a 502 for good, with no log
line (the put-back ran in the handler); a ``POST`` whose client went away was not taken back
either. And while a ``PUT`` with a bad path ran, the catalog already had the new definition:
requests for the name joined the in-place reload and got its refusal as a 502, although the
replicas still held the old weights. Now the write runs to its end whatever the client does
(``admin_common.run_to_the_end``), and the catalog keeps the definition in force until a
replica took the new one. No timing is asserted; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_harness import gateway_config, openai_client
from paused_replicas import admin_call, paused_replicas, signal_all
from shared_cluster import AUTH, eventually

from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder

_BOUND_S = 30.0  # the longest a test waits for an answer (a hang guard)
_LEFT = "its client gone"  # the log line of a write that ended after its client left


async def _definition(http: aiohttp.ClientSession, url: str, name: str) -> str | None:
    status, listed = await admin_call(http, "GET", url + "/admin/adapters")
    assert status == 200, listed
    return next((a["path"] for a in listed["adapters"] if a["name"] == name), None)


def _config(urls: list[str]) -> Any:
    return gateway_config(urls, admin={"token": AUTH["Authorization"].split()[1]})


async def _left_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return any(_LEFT in r.getMessage() for r in caplog.records)


async def test_a_put_whose_client_left_still_leaves_the_old_definition_in_force(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.gateway.admin")
    good = str(tmp_path / "t-a")
    write_adapter_folder(good, rank=8)
    async with contextlib.AsyncExitStack() as stack:
        reps = await stack.enter_async_context(paused_replicas(tmp_path))
        gw = await stack.enter_async_context(
            running_gateway(_config([r.url for r in reps]), port=0)
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())
        client = await stack.enter_async_context(openai_client(gw.url))
        status, body = await admin_call(
            http, "POST", gw.url + "/admin/adapters", {"name": "t-a", "path": good, "rank": 8}
        )
        assert status == 201 and body["loaded_on"], body
        signal_all(reps, signal.SIGSTOP)
        with pytest.raises(asyncio.TimeoutError):  # the client leaves after 1 s
            await admin_call(
                http, "PUT", gw.url + "/admin/adapters/t-a",
                {"path": str(tmp_path / "nonexistent-t-b"), "rank": 8}, timeout_s=1,
            )  # fmt: skip
        signal_all(reps, signal.SIGCONT)
        assert await eventually(lambda: _left_logged(caplog), bool, timeout_s=_BOUND_S)
        assert await _definition(http, gw.url, "t-a") == good
        done = await client.completions.create(model="t-a", prompt="x", max_tokens=2)
        assert done.choices


async def test_a_post_whose_client_left_is_still_taken_back_if_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.gateway.admin")
    async with contextlib.AsyncExitStack() as stack:
        reps = await stack.enter_async_context(paused_replicas(tmp_path))
        gw = await stack.enter_async_context(
            running_gateway(_config([r.url for r in reps]), port=0)
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())
        signal_all(reps, signal.SIGSTOP)
        with pytest.raises(asyncio.TimeoutError):
            await admin_call(
                http, "POST", gw.url + "/admin/adapters",
                {"name": "t-x", "path": str(tmp_path / "nonexistent-t-x"), "rank": 8},
                timeout_s=1,
            )  # fmt: skip
        signal_all(reps, signal.SIGCONT)
        assert await eventually(lambda: _left_logged(caplog), bool, timeout_s=_BOUND_S)
        assert await _definition(http, gw.url, "t-x") is None  # taken back


async def test_requests_during_a_refused_put_are_served_by_the_old_definition(
    tmp_path: Path,
) -> None:
    good = str(tmp_path / "t-a")
    write_adapter_folder(good, rank=8)
    async with contextlib.AsyncExitStack() as stack:
        reps = await stack.enter_async_context(paused_replicas(tmp_path))
        gw = await stack.enter_async_context(
            running_gateway(_config([r.url for r in reps]), port=0)
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())
        client = await stack.enter_async_context(openai_client(gw.url))
        status, body = await admin_call(
            http, "POST", gw.url + "/admin/adapters", {"name": "t-a", "path": good, "rank": 8}
        )
        assert status == 201 and body["loaded_on"], body
        holder = body["loaded_on"][0]
        pool = gw.gateway.pool
        signal_all(reps, signal.SIGSTOP)
        put = asyncio.create_task(
            admin_call(
                http,
                "PUT",
                gw.url + "/admin/adapters/t-a",
                {"path": str(tmp_path / "nonexistent-t-c"), "rank": 8},
            )
        )

        async def reloading() -> bool:
            return "t-a" in pool.loading(holder)

        assert await eventually(reloading, bool, timeout_s=_BOUND_S)  # the reload is sent
        asked = asyncio.create_task(
            client.completions.create(model="t-a", prompt="x", max_tokens=2)
        )

        async def in_flight() -> int:
            return sum(gw.gateway.inflight.count(r) for r in ("r0", "r1"))

        assert await eventually(in_flight, lambda n: n >= 1, timeout_s=_BOUND_S) >= 1
        signal_all(reps, signal.SIGCONT)
        status, body = await asyncio.wait_for(put, _BOUND_S)
        assert status == 400 and body["error"]["param"] == "path", body
        done = await asyncio.wait_for(asked, _BOUND_S)  # before: a 502 (the reload's refusal)
        assert done.choices
        assert await _definition(http, gw.url, "t-a") == good
