"""The cache-model bounds of ``bench/routing_bounds.py`` (issue 4 item 8's evidence)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import routing_bounds as rb


@pytest.mark.parametrize(
    ("seq", "cap", "misses"),
    [
        ([], 3, 0),
        ([0, 1, 0, 1, 0], 3, 2),  # both pinned (cap - 1 = 2): first uses only
        ([0, 2, 3, 2, 3], 2, 5),  # 0 pinned; 2 and 3 share the one free entry
        ([0, 2, 2, 2, 0], 2, 2),  # a repeat of the free entry's adapter hits
        ([5, 5, 6, 5], 1, 3),  # cap 1: nothing pinned, one entry
    ],
)
def test_a0_pins_the_most_requested_and_keeps_one_entry(
    seq: list[int], cap: int, misses: int
) -> None:
    assert rb.a0_misses(seq, cap) == misses


def test_belady_is_below_a0_and_lru_on_random_streams() -> None:
    rng = random.Random(7)
    for _ in range(50):
        n, cap = rng.randint(3, 12), rng.randint(1, 5)
        weights = [1.0 / (i + 1) for i in range(n)]
        seq = rng.choices(range(n), weights=weights, k=200)
        lru = rb.Lru(cap)
        lru_misses = sum(lru.touch(a)[0] for a in seq)
        optimum = rb.belady(seq, cap)
        assert optimum <= lru_misses
        assert optimum <= rb.a0_misses(seq, cap)
        assert optimum >= len(set(seq))  # every adapter's first use is a miss


def test_pooled_a0_is_below_the_per_replica_strategies_on_a_zipf_stream() -> None:
    rng = random.Random(3)
    n = 40
    seq = rng.choices(range(n), weights=[1.0 / (i + 1) for i in range(n)], k=3000)
    counts = sorted(range(n), key=lambda a: -seq.count(a))
    rank = {a: i for i, a in enumerate(counts)}
    seq = [rank[a] for a in seq]  # named by popularity, as adapter_stream does
    bounds = rb.load_bounds(seq, n, replicas=2, gpu=2, cpu=6)
    a0_disk, a0_gpu = bounds["pooled_a0"]
    assert a0_disk == rb.a0_misses(seq, 12) and a0_gpu == rb.a0_misses(seq, 4)
    for name in ("round_robin", "partition", "holders+lru", "holders+lfu"):
        disk, gpu = bounds[name]
        assert disk + gpu >= a0_disk + a0_gpu, name
    b_disk, b_gpu = bounds["belady"]
    assert b_disk <= a0_disk and b_gpu <= a0_gpu


def _stream(counts: dict[int, int], colds: dict[int, float]) -> tuple[np.ndarray, ...]:
    adapter = np.array([a for a, n in counts.items() for _ in range(n)])
    floor = np.ones(len(adapter))
    cold = np.array([colds[a] for a in adapter])
    return floor, adapter, cold


def test_cold_floor_leaves_out_the_adapter_whose_cold_starts_cost_the_p99_least() -> None:
    # 3 adapters, room for 2: leaving one out puts its requests at floor + cold.
    floor, adapter, cold = _stream({0: 50, 1: 30, 2: 20}, {0: 5.0, 1: 5.0, 2: 5.0})
    # Every choice leaves >= 20% of the requests cold: the p99 is a cold one.
    assert rb.cold_floor_p99(floor, adapter, cold, 3, 2) == pytest.approx(6.0)
    # All fit: nothing is cold.
    assert rb.cold_floor_p99(floor, adapter, cold, 3, 3) == pytest.approx(1.0)
    # The rarest adapter is under 1% of the requests: leaving it out costs the p99 nothing.
    floor, adapter, cold = _stream({0: 150, 1: 50, 2: 1}, {0: 5.0, 1: 5.0, 2: 5.0})
    assert rb.cold_floor_p99(floor, adapter, cold, 3, 2) == pytest.approx(1.0)
    # A popular adapter that is cheap to load cold is left out rather than a rare dear one.
    floor, adapter, cold = _stream({0: 50, 1: 30, 2: 20}, {0: 0.5, 1: 5.0, 2: 5.0})
    assert rb.cold_floor_p99(floor, adapter, cold, 3, 2) == pytest.approx(1.5)


def test_cold_floor_is_between_the_floor_and_the_floor_with_every_load_cold() -> None:
    rng = np.random.default_rng(7)
    n = 5000
    adapter = np.minimum(rng.zipf(1.3, n) - 1, 49)
    floor = rng.lognormal(-3.5, 0.8, n)
    cold = 0.05 + 0.002 * rng.choice([8, 16, 32], n)
    got = rb.cold_floor_p99(floor, adapter, cold, 50, 20)
    assert np.quantile(floor, 0.99) - 1e-9 <= got <= np.quantile(floor + cold, 0.99) + 1e-9
    assert got > np.quantile(floor, 0.99) + 0.01  # the Zipf tail is well over 1% of requests
    more_room = rb.cold_floor_p99(floor, adapter, cold, 50, 40)
    assert more_room <= got
