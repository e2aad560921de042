"""An adapter unloaded and loaded again under the same name, as vLLM 0.32 keeps it: unload only
forgets the name, so the engine keeps the copy under its old ``lora_int_id``; the new
registration gets a new id and is a new adapter to the engine, loaded from disk beside the old
copy, which holds a CPU cache entry (and its GPU slot) until the LRUs evict it. A load in place
keeps the id and replaces the copy. Real vLLM (dev mode's ``list_loras``) answered the sequence
below exactly: ``tests/e2e/test_vllm_reregister.py``. Before, the simulated replica dropped the
old copy on the new load, so the adapters loaded after it were evicted one load later."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp

from loragate.twin.server import RunningReplica

StartReplica = Callable[..., AbstractAsyncContextManager[RunningReplica]]  # (conftest's)
MakeAdapterDir = Callable[..., str]

# (admin call, lora_name, load_inplace) and vLLM's list_loras after it (max_cpu_loras 4)
STEPS: list[tuple[str, str, bool, set[int]]] = [
    ("load", "g", False, {1}),
    ("unload", "g", False, {1}),
    ("load", "g", False, {1, 2}),
    ("load", "g", True, {1, 2}),
    ("load", "h0", False, {1, 2, 3}),
    ("load", "h1", False, {1, 2, 3, 4}),
    ("load", "h2", False, {2, 3, 4, 5}),
]


async def test_a_name_loaded_again_is_a_new_adapter_beside_its_old_copy(
    start_replica: StartReplica, adapter_dir: MakeAdapterDir, http: aiohttp.ClientSession
) -> None:
    async with start_replica() as r:  # max_loras 2, max_cpu_loras 4
        seen = []
        for call, name, inplace, _ in STEPS:
            body: dict[str, object] = {"lora_name": name}
            if call == "load":
                body |= {"lora_path": adapter_dir(name), "load_inplace": inplace}
            async with http.post(f"{r.url}/v1/{call}_lora_adapter", json=body) as resp:
                assert resp.status == 200, await resp.text()
            seen.append(r.state.list_loras())
        assert seen == [ids for *_, ids in STEPS]
        # The old copy of g kept its GPU slot too: h0 took the other one, h1 and h2 the next.
        assert len(r.state.engine.gpu_adapters()) == 2
        assert sorted(r.state.engine.gpu_adapters()) == ["h1", "h2"]


async def test_the_old_copy_in_a_slot_costs_another_adapter_its_slot(
    start_replica: StartReplica, adapter_dir: MakeAdapterDir, http: aiohttp.ClientSession
) -> None:
    async with start_replica() as r:  # max_loras 2
        for name in ("a", "g"):
            body = {"lora_name": name, "lora_path": adapter_dir(name)}
            async with http.post(r.url + "/v1/load_lora_adapter", json=body) as resp:
                assert resp.status == 200
        async with http.post(r.url + "/v1/unload_lora_adapter", json={"lora_name": "g"}):
            pass
        body = {"lora_name": "g", "lora_path": adapter_dir("g")}
        async with http.post(r.url + "/v1/load_lora_adapter", json=body) as resp:
            assert resp.status == 200
        # vLLM: the slots hold g's old copy (id 2) and g (id 3): a (id 1) left its slot, so
        # its next request loads it back (before: a kept its slot, g's old copy was dropped).
        engine = r.state.engine
        assert len(engine.cpu_adapters()) == 3 and len(engine.gpu_adapters()) == 2
        assert "a" not in engine.gpu_adapters() and "g" in engine.gpu_adapters()


async def test_a_refused_load_of_a_new_name_uses_up_an_id(
    start_replica: StartReplica,
    adapter_dir: MakeAdapterDir,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """vLLM's load_lora_adapter takes the next lora_int_id before its add_lora, which may
    fail (here: no adapter at the path, 404): the next adapter gets the id after it."""
    async with start_replica() as r:
        bad = {"lora_name": "x", "lora_path": str(tmp_path / "missing")}
        async with http.post(r.url + "/v1/load_lora_adapter", json=bad) as resp:
            assert resp.status == 404
        good = {"lora_name": "y", "lora_path": adapter_dir("y")}
        async with http.post(r.url + "/v1/load_lora_adapter", json=good) as resp:
            assert resp.status == 200
        assert r.state.list_loras() == {2}
