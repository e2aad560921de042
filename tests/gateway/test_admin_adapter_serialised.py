"""Two ``PUT /admin/adapters/N`` of one name at once on one gateway instance, against
``loragate replica --simulated`` processes SIGSTOPped meanwhile (the first one's reload hangs
until SIGCONT), over real loopback.

Before: the two ran interleaved. The second read the definition the first was replacing,
overwrote the first's new path in the pool (``begin_replace``), and its swap found the
definition changed under it (the first's): a 409, the first's path in force, although the
second was the last write. Now the writes of a name run one after the other on an instance
(``admin_name_locks``): both answer 200, the definition in force and the replicas' weights are
the last ``PUT``'s, and no name lock is left behind. No timing is asserted; every wait is
bounded."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import aiohttp
from gateway_harness import gateway_config
from paused_replicas import adapter_roots, admin_call, paused_replicas, signal_all
from shared_cluster import AUTH, eventually

from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder

_BOUND_S = 30.0  # the longest a test waits for an answer (a hang guard)


async def test_two_puts_of_one_name_at_once_run_one_after_the_other(tmp_path: Path) -> None:
    first, a, b = (str(tmp_path / p) for p in ("t-a", "t-a-v2", "t-a-v3"))
    for path in (first, a, b):
        write_adapter_folder(path, rank=8)
    async with contextlib.AsyncExitStack() as stack:
        reps = await stack.enter_async_context(paused_replicas(tmp_path))
        config = gateway_config(
            [r.url for r in reps], admin={"token": AUTH["Authorization"].split()[1]}
        )
        gw = await stack.enter_async_context(running_gateway(config, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        url = gw.url + "/admin/adapters"
        status, body = await admin_call(
            http, "POST", url, {"name": "t-a", "path": first, "rank": 8}
        )
        assert status == 201 and body["loaded_on"], body
        holder = body["loaded_on"][0]
        pool = gw.gateway.pool
        signal_all(reps, signal.SIGSTOP)  # the first PUT's reload hangs
        put_a = asyncio.create_task(admin_call(http, "PUT", url + "/t-a", {"path": a, "rank": 8}))

        async def reloading() -> bool:
            return "t-a" in pool.loading(holder)

        assert await eventually(reloading, bool, timeout_s=_BOUND_S)
        put_b = asyncio.create_task(admin_call(http, "PUT", url + "/t-a", {"path": b, "rank": 8}))
        await asyncio.sleep(0.2)  # (the second PUT reaches its write; not asserted on)
        signal_all(reps, signal.SIGCONT)
        status_a, body_a = await asyncio.wait_for(put_a, _BOUND_S)
        status_b, body_b = await asyncio.wait_for(put_b, _BOUND_S)
        assert status_a == 200 and body_a["path"] == a, body_a
        # Before: a 409 (the first PUT's swap changed the definition under the second).
        assert status_b == 200 and body_b["path"] == b, body_b
        assert body_b["previous"]["path"] == a, body_b
        status, listed = await admin_call(http, "GET", url)
        assert status == 200
        assert [x["path"] for x in listed["adapters"] if x["name"] == "t-a"] == [b]
        stored = await gw.gateway.shared.store.get_adapter("t-a")
        assert stored is not None and stored.path == b
        held = await eventually(lambda: adapter_roots(http, reps, "t-a"), lambda r: r == {b})
        assert held == {b}
        # The name's lock is gone once no write holds or waits for it.
        assert len(gw.gateway.admin_names) == 0
