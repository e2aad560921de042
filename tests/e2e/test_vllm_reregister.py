"""An adapter unloaded and loaded again under its name: real vLLM 0.32 and the simulated replica
keep the same adapters in the engine's CPU cache, step by step.

vLLM 0.32's unload only forgets the name (``models/serving.py`` ``unload_lora_adapter``); a new
registration gets the next ``lora_int_id`` (``lora_id_counter``), so the engine loads it from
disk beside the old copy, which stays in the CPU cache (and its GPU slot) until the LRU evicts
it. The engine's cache is read through dev mode's ``/collective_rpc`` (``list_loras``), so this
test starts its own real replica with ``VLLM_SERVER_DEV_MODE=1``. Measured on 2026-11-28
(``max_cpu_loras`` 4): load g, unload g, load g, load g in place, load h0, h1, h2 gave
``[1] [1] [1,2] [1,2] [1,2,3] [1,2,3,4] [2,3,4,5]``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from vllm_e2e import BASE, REAL_CONFIG

from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica
from vllm_cpu.replica import Replica, start_replica

pytestmark = pytest.mark.vllm

DEV_MODE = "VLLM_SERVER_DEV_MODE"
# (admin call, adapter, load_inplace)
STEPS = [("load", "g", False), ("unload", "g", False), ("load", "g", False),
         ("load", "g", True), ("load", "h0", False), ("load", "h1", False),
         ("load", "h2", False)]  # fmt: skip
EXPECTED = [{1}, {1}, {1, 2}, {1, 2}, {1, 2, 3}, {1, 2, 3, 4}, {2, 3, 4, 5}]


@pytest.fixture(scope="module")
def dev_vllm(vllm_work_dir: Path) -> Iterator[Replica]:
    """A fresh real replica (its ids start at 1) with the dev-mode endpoints."""
    before = os.environ.get(DEV_MODE)
    os.environ[DEV_MODE] = "1"  # read when the server's environment is built
    try:
        config = dataclasses.replace(REAL_CONFIG, omp_bind="1")
        rep = start_replica(config, work_dir=vllm_work_dir, log_name="e2e-dev-replica.log")
    finally:
        if before is None:
            del os.environ[DEV_MODE]
        else:
            os.environ[DEV_MODE] = before
    try:
        yield rep
    finally:
        rep.stop()


async def test_a_name_loaded_again_is_a_new_adapter_beside_its_old_copy(
    dev_vllm: Replica, http: aiohttp.ClientSession, lora_paths: dict[int, list[str]]
) -> None:
    paths = {"g": lora_paths[8][0], "h0": lora_paths[16][0], "h1": lora_paths[8][1],
             "h2": lora_paths[16][1]}  # fmt: skip
    c = REAL_CONFIG
    twin_cfg = ReplicaConfig(
        model=str(dev_vllm.model_dir), served_model_name=BASE, enable_lora=True,
        max_loras=c.max_loras, max_cpu_loras=c.max_cpu_loras, max_lora_rank=c.max_lora_rank,
        max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len, profile="fast",
        time_scale=10.0,
    )  # fmt: skip
    real: list[set[int]] = []
    sim: list[set[int]] = []
    async with run_replica(twin_cfg, host="127.0.0.1", port=0) as twin:
        for call, name, inplace in STEPS:
            body: dict[str, Any] = {"lora_name": name}
            if call == "load":
                body |= {"lora_path": paths[name], "load_inplace": inplace}
            for base in (dev_vllm.base_url, twin.url):
                async with http.post(f"{base}/v1/{call}_lora_adapter", json=body) as r:
                    assert r.status == 200, await r.text()
            rpc = {"method": "list_loras"}
            async with http.post(dev_vllm.base_url + "/collective_rpc", json=rpc) as r:
                assert r.status == 200, await r.text()
                (ids,) = (await r.json())["results"]
            real.append(set(ids))
            sim.append(twin.state.list_loras())
    assert real == EXPECTED
    assert sim == EXPECTED


async def test_a_refused_load_of_a_new_name_uses_up_an_id(
    dev_vllm: Replica, http: aiohttp.ClientSession, lora_paths: dict[int, list[str]]
) -> None:
    """A load refused by the engine (404, no adapter at the path) still took an id: the next
    new name's id is two past the last one (relative: the module's replica is shared)."""

    async def ids() -> set[int]:
        async with http.post(dev_vllm.base_url + "/collective_rpc",
                             json={"method": "list_loras"}) as r:  # fmt: skip
            assert r.status == 200, await r.text()
            (found,) = (await r.json())["results"]
        return set(found)

    good = {"lora_name": "z-good", "lora_path": lora_paths[8][0]}
    async with http.post(dev_vllm.base_url + "/v1/load_lora_adapter", json=good) as r:
        assert r.status == 200, await r.text()
    last = max(await ids())
    bad = {"lora_name": "z-bad", "lora_path": lora_paths[8][0] + "-missing"}
    async with http.post(dev_vllm.base_url + "/v1/load_lora_adapter", json=bad) as r:
        assert r.status == 404, await r.text()
    again = {"lora_name": "z-next", "lora_path": lora_paths[16][0]}
    async with http.post(dev_vllm.base_url + "/v1/load_lora_adapter", json=again) as r:
        assert r.status == 200, await r.text()
    assert max(await ids()) == last + 2
