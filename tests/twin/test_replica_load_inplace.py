"""``load_inplace`` on the simulated replica, as vLLM 0.32 does it: the name stays, its card's
``root`` becomes the new path, and the folder is read again (its cached copy is dropped)."""

from __future__ import annotations

import aiohttp

from conftest import MakeAdapterDir, StartReplica

BASE = "tiny-llama"
LOAD = "/v1/load_lora_adapter"


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, object]) -> int:
    async with http.post(url, json=body) as resp:
        await resp.read()
        return resp.status


async def _roots(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    async with http.get(url + "/v1/models") as resp:
        data = (await resp.json())["data"]
    return {m["id"]: m["root"] for m in data if m["parent"] is not None}


async def test_an_in_place_load_switches_the_path_and_reads_the_folder_again(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    old, new = adapter_dir("v1", 8), adapter_dir("v2", 8)
    async with start_replica() as r:
        engine = r.state.engine
        assert await _post(http, r.url + LOAD, {"lora_name": "lora-0", "lora_path": old}) == 200
        assert engine.loads_from_disk == 1
        # The same name from another path without load_inplace: refused, nothing changes.
        assert await _post(http, r.url + LOAD, {"lora_name": "lora-0", "lora_path": new}) == 400
        assert await _roots(http, r.url) == {"lora-0": old}
        body = {"lora_name": "lora-0", "lora_path": new, "load_inplace": True}
        assert await _post(http, r.url + LOAD, body) == 200
        assert await _roots(http, r.url) == {"lora-0": new}
        assert engine.loads_from_disk == 2  # the new weights were read, not the cached copy
