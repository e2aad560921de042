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


async def test_an_in_place_reload_of_an_adapter_in_use_reads_the_folder_again(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    """vLLM reloads an adapter in place whether requests use it or not (its worker reads the
    folder and puts the new weights in the adapter's slot): the twin charges that read too."""
    old, new = adapter_dir("v1", 8), adapter_dir("v2", 8)
    async with start_replica(time_scale=1.0) as r:  # ~3 ms a token: the stream outlasts the call
        engine = r.state.engine
        assert await _post(http, r.url + LOAD, {"lora_name": "lora-0", "lora_path": old}) == 200
        body = {"model": "lora-0", "prompt": "x", "max_tokens": 500, "ignore_eos": True}
        async with http.post(r.url + "/v1/completions", json={**body, "stream": True}) as stream:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")  # its first token: lora-0 holds a slot
            assert engine.running_adapters == ["lora-0"]
            disk, memory = engine.loads_from_disk, engine.loads_from_memory
            inplace = {"lora_name": "lora-0", "lora_path": new, "load_inplace": True}
            assert await _post(http, r.url + LOAD, inplace) == 200
            assert engine.loads_from_disk == disk + 1  # read from disk, as a first load
            assert engine.loads_from_memory == memory + 1  # and copied into its slot
            stream.close()
        assert await _roots(http, r.url) == {"lora-0": new}


async def test_a_name_loaded_again_after_an_unload_is_read_from_disk(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    """vLLM 0.32's unload forgets the name only (the engine keeps its copy), and loading the
    name again gives it a new ``lora_int_id``: the worker reads the folder again."""
    path = adapter_dir("v1", 8)
    async with start_replica() as r:
        engine = r.state.engine
        load = {"lora_name": "lora-0", "lora_path": path}
        assert await _post(http, r.url + LOAD, load) == 200
        assert await _post(http, r.url + "/v1/unload_lora_adapter", {"lora_name": "lora-0"}) == 200
        assert engine.cpu_adapters() == ["lora-0"]  # still cached
        assert await _post(http, r.url + LOAD, load) == 200
        assert engine.loads_from_disk == 2
