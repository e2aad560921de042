"""``Engine.reload_adapter``: vLLM 0.32's runtime ``add_lora`` reads the adapter from disk
whatever the caches hold (``LRUCacheWorkerLoRAManager.add_adapter``: ``load_inplace`` forces
``_load_adapter``, the new copy replaces the cached one; a name registered again gets a new
``lora_int_id``), so the engine charges the profile's disk->CPU cost as for a first load; and
``add_adapter`` activates it (``activate_adapter``), so it takes a GPU slot at once (CPU->GPU),
evicting the least recently used idle one, and its first request loads nothing."""

from __future__ import annotations

import pytest

from loragate.twin.engine import Engine, EngineConfig, EngineRequest
from loragate.twin.profile import load_profile

FAST = load_profile("fast")
CFG = EngineConfig(max_loras=2, max_cpu_loras=4)


def request(rid: str, adapter: str, out: int = 50) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        adapter=adapter,
        adapter_rank=8,
        prompt_tokens=10,
        max_tokens=out,
        arrival_s=0.0,
    )


def _load_s(rank: int) -> float:
    return FAST.disk_to_cpu_load_s(rank) + FAST.cpu_to_gpu_load_s(rank)


def test_a_cached_idle_adapter_is_read_from_disk_again() -> None:
    e = Engine(CFG, FAST)
    assert e.load_adapter("a", 8) == pytest.approx(FAST.disk_to_cpu_load_s(8))
    assert e.reload_adapter("a", 8) == pytest.approx(_load_s(8))
    assert e.loads_from_disk == 2 and e.cpu_adapters() == ["a"]
    # A name the engine never saw: a first load.
    assert e.reload_adapter("b", 16) == pytest.approx(_load_s(16))
    assert e.loads_from_disk == 3 and e.cpu_adapters() == ["a", "b"]


def test_a_runtime_load_takes_a_gpu_slot_and_its_first_request_loads_nothing() -> None:
    e = Engine(CFG, FAST)
    assert e.reload_adapter("a", 8) == pytest.approx(_load_s(8))
    assert e.gpu_adapters() == ["a"] and (e.loads_from_disk, e.loads_from_memory) == (1, 1)
    e.add_request(request("r", "a"))
    e.step(e.time_s)
    assert e.running_adapters == ["a"]
    assert (e.loads_from_disk, e.loads_from_memory) == (1, 1)  # no CPU->GPU for "r"


def test_a_runtime_load_evicts_the_least_recently_used_idle_slot() -> None:
    e = Engine(CFG, FAST)  # 2 slots, 4 CPU entries
    for name in ("a", "b", "c"):
        e.reload_adapter(name, 8)
    assert e.gpu_adapters() == ["b", "c"] and e.cpu_adapters() == ["a", "b", "c"]
    e.add_request(request("r", "a"))  # "a" left its slot: its request loads it back
    e.step(e.time_s)
    assert e.loads_from_memory == 4 and sorted(e.gpu_adapters()) == ["a", "c"]


def test_an_adapter_in_use_is_read_from_disk_and_its_slot_refilled() -> None:
    e, twin = Engine(CFG, FAST), Engine(CFG, FAST)
    for engine in (e, twin):
        engine.load_adapter("a", 8)
        engine.add_request(request("r", "a"))
        engine.step(0.0)  # "a" takes a slot: its request runs
        assert engine.running_adapters == ["a"]
    loads = (e.loads_from_disk, e.loads_from_memory)
    cost = e.reload_adapter("a", 8)
    assert cost == pytest.approx(FAST.disk_to_cpu_load_s(8) + FAST.cpu_to_gpu_load_s(8))
    assert (e.loads_from_disk, e.loads_from_memory) == (loads[0] + 1, loads[1] + 1)
    assert e.running_adapters == ["a"] and e.gpu_adapters() == ["a"]
    # The engine stalls for it: its next step is longer by exactly the load, in engine time.
    now = max(e.time_s, twin.time_s)
    reloaded, plain = e.step(now), twin.step(now)
    assert reloaded.duration_s - plain.duration_s == pytest.approx(cost, abs=1e-8)
    assert cost > 0


def test_a_runtime_load_with_every_slot_in_use_costs_the_batch_a_slot_copy() -> None:
    # vLLM activates the new adapter anyway, evicting one the batch uses; the batch's next step
    # copies that one back and evicts the new one.
    e, twin = Engine(CFG, FAST), Engine(CFG, FAST)  # 2 slots
    for engine in (e, twin):
        for name in ("a", "b"):
            engine.load_adapter(name, 8)
            engine.add_request(request(f"r-{name}", name))
        engine.step(0.0)
        assert sorted(engine.running_adapters) == ["a", "b"]
    loads = e.loads_from_memory
    cost = e.reload_adapter("c", 16)
    copies = FAST.cpu_to_gpu_load_s(16) + FAST.cpu_to_gpu_load_s(8)
    assert cost == pytest.approx(FAST.disk_to_cpu_load_s(16) + copies)
    assert e.loads_from_memory == loads + 2
    assert sorted(e.gpu_adapters()) == ["a", "b"] and "c" in e.cpu_adapters()
    now = max(e.time_s, twin.time_s)
    loaded, plain = e.step(now), twin.step(now)
    assert loaded.duration_s - plain.duration_s == pytest.approx(cost, abs=1e-8)
