"""Shadow residency transitions (pure functions)."""

from __future__ import annotations

import random

import pytest

from loragate.core.types import ReplicaSettings, Residency
from loragate.state import residency as rz

S22 = ReplicaSettings(max_loras=2, max_cpu_loras=3)


def run(ops: list[str], settings: ReplicaSettings = S22) -> Residency:
    res = rz.EMPTY
    for a in ops:
        res = rz.touch(res, a, settings)
    return res


@pytest.mark.parametrize(
    ("ops", "gpu", "cpu"),
    [
        (["a"], ("a",), ("a",)),
        (["a", "b"], ("a", "b"), ("a", "b")),
        # third distinct adapter: GPU evicts its LRU (a), which stays in the CPU cache
        (["a", "b", "c"], ("b", "c"), ("a", "b", "c")),
        # touching a again brings it back to a slot, b is now LRU in GPU
        (["a", "b", "c", "a"], ("c", "a"), ("b", "c", "a")),
        # fourth distinct adapter: the CPU cache (3) evicts its LRU out entirely
        (["a", "b", "c", "d"], ("c", "d"), ("b", "c", "d")),
        # repeated touches do not duplicate
        (["a", "a", "a"], ("a",), ("a",)),
    ],
)
def test_touch_lru_order(ops: list[str], gpu: tuple[str, ...], cpu: tuple[str, ...]) -> None:
    res = run(ops)
    assert res.gpu == gpu
    assert res.cpu == cpu
    assert res.registered == frozenset(ops)


def test_cpu_eviction_frees_the_gpu_slot() -> None:
    # With as many slots as CPU entries, every cached adapter is active: a load that evicts
    # the CPU cache's LRU (a) takes its slot away too, as vLLM's deactivate callback does.
    s22 = ReplicaSettings(max_loras=2, max_cpu_loras=2)
    res = rz.touch(rz.EMPTY, "a", s22)
    for name in ("b", "c"):
        res = rz.load(res, name, s22)
    assert res.gpu == ("b", "c")
    assert res.cpu == ("b", "c")
    assert res.registered == {"a", "b", "c"}  # still registered (reloads from disk)
    assert rz.tier(res, "a") == "registered"


def test_a_load_takes_a_gpu_slot() -> None:
    # vLLM's add_adapter ends with activate_adapter: a loaded adapter is active at once.
    res = rz.load(rz.EMPTY, "lora-4", S22)
    assert res.gpu == ("lora-4",)
    assert res.cpu == ("lora-4",)
    assert rz.tier(res, "lora-4") == "gpu"
    # a request for another adapter then takes the second slot: both are active
    res = rz.touch(res, "lora-0", S22)
    assert res.gpu == ("lora-4", "lora-0")
    assert res.cpu == ("lora-4", "lora-0")


def test_a_load_evicts_the_least_recently_used_slot() -> None:
    res = run(["a", "b"])  # both slots taken, a the older
    res = rz.load(res, "c", S22)
    assert res.gpu == ("b", "c")
    assert res.cpu == ("a", "b", "c")
    assert rz.tier(res, "a") == "cpu"  # left its slot, still cached


def test_an_in_place_reload_of_a_cached_adapter_activates_it() -> None:
    res = run(["a", "b", "c"])  # a cached, not in a slot
    res = rz.load(res, "a", S22)  # load_inplace: read again, then activated
    assert res.gpu == ("c", "a")
    assert res.cpu == ("b", "c", "a")


def test_a_load_moves_the_residency_as_a_routed_request_does() -> None:
    rng = random.Random(11)
    names = [f"a{i}" for i in range(6)]
    res = rz.EMPTY
    for _ in range(300):
        a = rng.choice(names)
        if rng.random() < 0.2:
            res = rz.reconcile(res, set(rng.sample(names, 4)))
        assert rz.load(res, a, S22) == rz.touch(res, a, S22)
        res = rz.touch(res, a, S22)


def test_unload_removes_everywhere() -> None:
    res = run(["a", "b"])
    res = rz.unload(res, "a")
    assert res == Residency(registered=frozenset({"b"}), gpu=("b",), cpu=("b",))
    assert rz.tier(res, "a") == "absent"


def test_reconcile_trusts_v1_models() -> None:
    res = run(["a", "b", "c"])
    res = rz.reconcile(res, {"b", "x"})
    assert res.registered == {"b", "x"}
    assert res.gpu == ("b",)
    assert res.cpu == ("b",)
    assert rz.tier(res, "x") == "registered"


def test_capacities_normalised() -> None:
    assert rz.capacities(ReplicaSettings(max_loras=4, max_cpu_loras=2)) == (4, 4)
    assert rz.capacities(ReplicaSettings(max_loras=0, max_cpu_loras=0)) == (1, 1)


def test_invariants_on_random_sequences() -> None:
    rng = random.Random(7)
    names = [f"a{i}" for i in range(9)]
    for _ in range(20):
        settings = ReplicaSettings(max_loras=rng.randint(1, 4), max_cpu_loras=rng.randint(1, 6))
        gpu_cap, cpu_cap = rz.capacities(settings)
        res = rz.EMPTY
        for _ in range(200):
            op = rng.random()
            a = rng.choice(names)
            if op < 0.7:
                res = rz.touch(res, a, settings)
            elif op < 0.85:
                res = rz.load(res, a, settings)
            elif op < 0.95:
                res = rz.unload(res, a)
            else:
                res = rz.reconcile(res, set(rng.sample(names, 5)))
            assert len(res.gpu) <= gpu_cap
            assert len(res.cpu) <= cpu_cap
            assert set(res.gpu) <= set(res.cpu) <= res.registered
            assert len(set(res.gpu)) == len(res.gpu)
            if op < 0.85:  # the adapter just routed or loaded is the most recent in both
                assert res.gpu[-1] == a
                assert res.cpu[-1] == a
