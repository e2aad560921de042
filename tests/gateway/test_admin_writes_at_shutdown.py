"""The gateway's shutdown waits for the admin writes still running (a ``PUT /admin/adapters/N``
whose client left), within the drain period, against ``loragate replica --simulated``
processes SIGSTOPped meanwhile (the reload hangs until SIGCONT), over real loopback.

Before: the drain saw no request in flight (the client had left), the app cleanup closed the
pool's sessions under the write, which ended in a failure or a cancellation, the definition in
force unchanged. Now the shutdown waits for it up to the drain period's end, and cancels what
is left then, each logged. No timing is asserted; every wait is bounded."""

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


@pytest.mark.parametrize("resume", [True, False], ids=["finishes", "cut-at-the-period-end"])
async def test_the_shutdown_waits_for_a_put_whose_client_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, resume: bool
) -> None:
    caplog.set_level(logging.INFO, logger="loragate")
    old, new = str(tmp_path / "t-a"), str(tmp_path / "t-a-v2")
    for path in (old, new):
        write_adapter_folder(path, rank=8)
    async with contextlib.AsyncExitStack() as stack:
        reps = await stack.enter_async_context(paused_replicas(tmp_path))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        config = gateway_config(
            [r.url for r in reps], admin={"token": AUTH["Authorization"].split()[1]}
        )
        period = 20.0 if resume else 0.5
        running = running_gateway(config, port=0, shutdown_timeout_s=period)
        gw = await running.__aenter__()
        stop: asyncio.Task[Any] | None = None
        try:
            url = gw.url + "/admin/adapters"
            status, body = await admin_call(
                http, "POST", url, {"name": "t-a", "path": old, "rank": 8}
            )
            assert status == 201 and body["loaded_on"], body
            signal_all(reps, signal.SIGSTOP)
            with pytest.raises(asyncio.TimeoutError):  # the client leaves after 1 s
                await admin_call(http, "PUT", url + "/t-a", {"path": new, "rank": 8}, timeout_s=1)
            assert gw.gateway.admin_writes  # the write goes on
            stop = asyncio.create_task(running.__aexit__(None, None, None))

            async def waiting() -> bool:
                return _logged(caplog, "admin write(s) running, waiting up to")

            assert await eventually(waiting, bool, timeout_s=_BOUND_S)
            if resume:
                signal_all(reps, signal.SIGCONT)
            await asyncio.wait_for(stop, _BOUND_S)  # the gateway exits, within the bound
        finally:
            signal_all(reps, signal.SIGCONT)
            if stop is None:
                await running.__aexit__(None, None, None)
        if resume:
            # Before: the write ended in a failure (its sessions closed under it).
            assert _logged(caplog, "ended, its client gone: 200")
            stored = await gw.gateway.shared.store.get_adapter("t-a")
            assert stored is not None and stored.path == new
            held = await eventually(lambda: adapter_roots(http, reps, "t-a"), lambda r: new in r)
            assert new in held
        else:
            assert _logged(caplog, "still running at the end of the drain period: cancelled")
            stored = await gw.gateway.shared.store.get_adapter("t-a")
            assert stored is not None and stored.path == old
        assert not any(not t.done() for t in gw.gateway.admin_writes)
