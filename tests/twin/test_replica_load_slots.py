"""Where the simulated replica puts an adapter it loads: as vLLM 0.32's ``add_lora`` does,
into the CPU cache and a GPU slot at once (``LRUCacheWorkerLoRAManager.add_adapter`` ends with
``activate_adapter``), whether it comes from ``--lora-modules`` at start-up (loaded through the
same ``load_lora_adapter``) or from ``POST /v1/load_lora_adapter``. So the first request of an
adapter loaded ahead of use pays no CPU->GPU load. (Real vLLM does not say which adapters sit in
its slots; the source says it: ``vllm/lora/worker_manager.py``.)"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import aiohttp

from loragate.twin.replica_config import LoraModule
from loragate.twin.server import RunningReplica

StartReplica = Callable[..., AbstractAsyncContextManager[RunningReplica]]  # (conftest's)
MakeAdapterDir = Callable[..., str]


async def test_start_up_adapters_take_the_slots_last_ones_last(
    start_replica: StartReplica, adapter_dir: MakeAdapterDir
) -> None:
    modules = tuple(LoraModule(name=n, path=adapter_dir(n)) for n in ("a", "b", "c"))
    async with start_replica(lora_modules=modules) as r:  # max_loras 2, max_cpu_loras 4
        assert r.state.engine.gpu_adapters() == ["b", "c"]
        assert r.state.engine.cpu_adapters() == ["a", "b", "c"]


async def test_an_admin_load_takes_a_slot_and_its_first_request_loads_nothing(
    start_replica: StartReplica, adapter_dir: MakeAdapterDir, http: aiohttp.ClientSession
) -> None:
    async with start_replica() as r:
        engine = r.state.engine
        body = {"lora_name": "a", "lora_path": adapter_dir("a")}
        async with http.post(r.url + "/v1/load_lora_adapter", json=body) as resp:
            assert resp.status == 200
        assert engine.gpu_adapters() == ["a"]
        loads = (engine.loads_from_disk, engine.loads_from_memory)
        assert loads == (1, 1)
        body = {"model": "a", "prompt": "hi", "max_tokens": 2}
        async with http.post(r.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
        assert (engine.loads_from_disk, engine.loads_from_memory) == loads
