"""Two reloads run one after the other, from the file read to the apply, so the later one
applies last. Before, the read ran in a worker thread outside any lock: a first reload whose
read was slow (a big file) applied the OLDER file after a second reload had applied the newer
one, and the older file stayed in force (both answered ``reloaded``).

The first reload reads a named pipe the test writes only once the second reload is done or
is waiting for the first: no timing. The second reload reads the regular file put in the
pipe's place meanwhile (the newer text)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import aiohttp
import yaml
from gateway_harness import BASE, ScriptedReplica

from loragate.gateway import load_config, running_gateway

TOKEN = "reload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HANG_GUARD_S = 20.0


def _text(replicas: list[ScriptedReplica], adapter: str) -> str:
    return yaml.safe_dump(
        {
            "base_model": BASE,
            "replicas": [{"id": r.name, "url": r.url} for r in replicas],
            "adapters": [{"name": adapter, "path": f"/loras/{adapter}"}],
            "poller": {"interval_s": 3600},
            "admin": {"token": TOKEN},
        }
    )


async def test_the_later_reload_applies_last(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    start = tmp_path / "start.yaml"
    start.write_text(_text(replicas, "lora-start"), encoding="utf-8")
    path = tmp_path / "gw.yaml"
    os.mkfifo(path)
    opened, go = threading.Event(), threading.Event()

    def feed() -> None:  # the first reload's read: the older text, once released
        with open(path, "w", encoding="utf-8") as f:  # returns once the reload opens it
            opened.set()
            go.wait(HANG_GUARD_S)
            f.write(_text(replicas, "old-v1"))

    async with (
        running_gateway(load_config(start), port=0, config_path=path) as gw,
        aiohttp.ClientSession() as http,
    ):
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()

        async def reload() -> tuple[int, object]:
            async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
                return resp.status, await resp.json()

        first = asyncio.create_task(reload())
        assert await asyncio.to_thread(opened.wait, HANG_GUARD_S)  # the first is reading
        newer = tmp_path / "new.yaml"
        newer.write_text(_text(replicas, "new-v2"), encoding="utf-8")
        os.replace(newer, path)  # the file is the newer one now
        second = asyncio.create_task(reload())
        lock = getattr(gw.gateway, "reload_lock", None)
        for _ in range(int(HANG_GUARD_S / 0.01)):  # done, or waiting for the first
            if second.done() or (lock is not None and getattr(lock, "_waiters", None)):
                break
            await asyncio.sleep(0.01)
        go.set()
        results = await asyncio.gather(first, second)
        await asyncio.to_thread(feeder.join, HANG_GUARD_S)
        assert [status for status, _ in results] == [200, 200], results
        assert [a.name for a in gw.gateway.config.adapters] == ["new-v2"]
