"""``DELETE /admin/adapters/N`` runs to its end whatever its client does, and the shutdown waits
for it, like ``POST`` and ``PUT``: against ``loragate replica --simulated`` processes
SIGSTOPped meanwhile (the unload hangs until SIGCONT), over real loopback.

Before: a client (or ingress) timeout cancelled the handler in the middle of its unloads: the
replicas not unloaded yet kept the adapter (until some poller acted on the tombstone), with no
log line saying the deletion stopped halfway; and a shutdown did not wait for a deletion whose
client had left. Now the deletion is one of ``Gateway.admin_writes``
(``admin_common.run_to_the_end``). No timing is asserted; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_harness import gateway_config
from paused_replicas import adapter_roots, admin_call, paused_replicas, signal_all
from shared_cluster import AUTH, eventually

from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder

_BOUND_S = 30.0  # the longest a test waits for anything (a hang guard)


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


def _config(urls: list[str]) -> Any:
    return gateway_config(urls, admin={"token": AUTH["Authorization"].split()[1]})


async def test_a_delete_whose_client_left_still_unloads_the_adapter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.gateway.admin")
    path = str(tmp_path / "t-a")
    write_adapter_folder(path, rank=8)
    async with contextlib.AsyncExitStack() as stack:
        reps = await stack.enter_async_context(paused_replicas(tmp_path))
        gw = await stack.enter_async_context(
            running_gateway(_config([r.url for r in reps]), port=0)
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())
        url = gw.url + "/admin/adapters"
        status, body = await admin_call(http, "POST", url, {"name": "t-a", "path": path, "rank": 8})
        assert status == 201 and body["loaded_on"], body
        signal_all(reps, signal.SIGSTOP)
        with pytest.raises(asyncio.TimeoutError):  # the client leaves after 1 s
            await admin_call(http, "DELETE", url + "/t-a", timeout_s=1)
        assert gw.gateway.admin_writes  # the deletion goes on
        signal_all(reps, signal.SIGCONT)

        async def ended() -> bool:
            return _logged(caplog, "the deletion of adapter 't-a' ended, its client gone: 200")

        assert await eventually(ended, bool, timeout_s=_BOUND_S)
        assert _logged(caplog, "deleted adapter t-a (unloaded from ['")
        assert await adapter_roots(http, reps, "t-a") == set()
        status, listed = await admin_call(http, "GET", url)
        assert status == 200 and "t-a" not in {a["name"] for a in listed["adapters"]}


async def test_the_shutdown_waits_for_a_delete_whose_client_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loragate")
    path = str(tmp_path / "t-a")
    write_adapter_folder(path, rank=8)
    async with contextlib.AsyncExitStack() as stack:
        reps = await stack.enter_async_context(paused_replicas(tmp_path))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        running = running_gateway(_config([r.url for r in reps]), port=0, shutdown_timeout_s=20.0)
        gw = await running.__aenter__()
        stop: asyncio.Task[Any] | None = None
        try:
            url = gw.url + "/admin/adapters"
            status, body = await admin_call(
                http, "POST", url, {"name": "t-a", "path": path, "rank": 8}
            )
            assert status == 201 and body["loaded_on"], body
            signal_all(reps, signal.SIGSTOP)
            with pytest.raises(asyncio.TimeoutError):  # the client leaves after 1 s
                await admin_call(http, "DELETE", url + "/t-a", timeout_s=1)
            stop = asyncio.create_task(running.__aexit__(None, None, None))

            async def waiting() -> bool:
                return _logged(caplog, "admin write(s) running, waiting up to")

            assert await eventually(waiting, bool, timeout_s=_BOUND_S)
            assert _logged(caplog, "the deletion of adapter 't-a'")
            signal_all(reps, signal.SIGCONT)
            await asyncio.wait_for(stop, _BOUND_S)  # the gateway exits, within the bound
        finally:
            signal_all(reps, signal.SIGCONT)
            if stop is None:
                await running.__aexit__(None, None, None)
        assert _logged(caplog, "the deletion of adapter 't-a' ended, its client gone: 200")
        assert await adapter_roots(http, reps, "t-a") == set()
        assert not any(not t.done() for t in gw.gateway.admin_writes)
