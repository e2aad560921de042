"""``POST /admin/reload`` (and SIGHUP: the same ``reload_from_file``) reads the new file in a
worker thread, so the gateway answers meanwhile. Before, ``load_config`` ran on the event loop:
a 1,200-adapter file held it for seconds (``/livez`` went unanswered 5 s in a fleet
walk-through).

The file here is a named pipe the test writes only once ``/livez`` has answered, so the reload
is reading (blocked in ``open``/``read``) exactly while ``/livez`` is asked: no timing. With the
read on the loop, ``/livez`` could not be answered before the file was written; the writer
gives up waiting after a hang guard, writes, and records that ``/livez`` had not answered."""

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


def _text(replicas: list[ScriptedReplica], adapters: int) -> str:
    return yaml.safe_dump(
        {
            "base_model": BASE,
            "replicas": [{"id": r.name, "url": r.url} for r in replicas],
            "adapters": [
                {"name": f"lora-{i}", "path": f"/loras/lora-{i}"} for i in range(adapters)
            ],
            "poller": {"interval_s": 3600},
            "admin": {"token": TOKEN},
        }
    )


async def test_livez_answers_while_a_reload_reads_the_file(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    start = tmp_path / "gw.yaml"
    start.write_text(_text(replicas, 1), encoding="utf-8")
    fifo = tmp_path / "gw-fifo.yaml"
    os.mkfifo(fifo)
    opened, answered = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def feed() -> None:
        with open(fifo, "w", encoding="utf-8") as f:  # returns once the reload opens it
            opened.set()
            seen["livez_before_the_file"] = answered.wait(HANG_GUARD_S)
            f.write(_text(replicas, 3))

    async with (
        running_gateway(load_config(start), port=0, config_path=fifo) as gw,
        aiohttp.ClientSession() as http,
    ):
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()

        async def reload() -> tuple[int, object]:
            async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
                return resp.status, await resp.json()

        reloading = asyncio.create_task(reload())
        assert await asyncio.to_thread(opened.wait, HANG_GUARD_S)  # the reload is reading
        async with http.get(gw.url + "/livez") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        answered.set()
        status, body = await reloading
        await asyncio.to_thread(feeder.join, HANG_GUARD_S)
        assert status == 200, body
        assert sorted(a.name for a in gw.gateway.config.adapters) == [
            "lora-0",
            "lora-1",
            "lora-2",
        ]
    assert seen == {"livez_before_the_file": True}
