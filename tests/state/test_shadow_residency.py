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
    # a is in a GPU slot; admin loads of b, c, d push it out of the CPU cache (3),
    # which in vLLM deactivates it too.
    res = rz.touch(rz.EMPTY, "a", S22)
    for name in ("b", "c", "d"):
        res = rz.load(res, name, S22)
    assert "a" not in res.cpu
    assert res.gpu == ()
    assert res.cpu == ("b", "c", "d")
    assert res.registered == {"a", "b", "c", "d"}  # still registered (reloads from disk)
    assert rz.tier(res, "a") == "registered"


def test_load_does_not_take_a_slot() -> None:
    res = rz.load(rz.EMPTY, "a", S22)
    assert res.gpu == ()
    assert res.cpu == ("a",)
    assert rz.tier(res, "a") == "cpu"


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
            if op < 0.7:  # the adapter just routed is the most recent in both tiers
                assert res.gpu[-1] == a
                assert res.cpu[-1] == a
