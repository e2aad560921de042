"""lora_affinity (Gateway API Inference Extension) and lru_multiplex (Ray Serve) table tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from loragate.core.types import ReplicaSnapshot, RoutingRequest
from loragate.routing import RoutingContext, build_policy
from loragate.routing.lora_affinity import LoraAffinityScorer

Snap = Callable[..., ReplicaSnapshot]
Req = Callable[..., RoutingRequest]

# (active, waiting, max_loras) -> score for adapter "a"
AFFINITY_TABLE: list[tuple[set[str], set[str], int, float]] = [
    ({"a"}, set(), 2, 1.0),  # active
    ({"a", "b"}, {"a", "b"}, 2, 1.0),  # active even when full
    ({"b"}, set(), 2, 0.8),  # free slot: 1 + 0 < 2
    ({"b"}, {"b"}, 2, 0.0),  # 0.32's duplicated list fills the slots: 1 + 1 = 2
    ({"b"}, {"a"}, 2, 0.6),  # no free slot, but "a" is queued there
    ({"b", "c"}, set(), 2, 0.0),  # full, not queued
    (set(), set(), 1, 0.8),  # idle replica
]


@pytest.mark.parametrize(("active", "waiting", "max_loras", "expected"), AFFINITY_TABLE)
def test_lora_affinity_scorer_table(
    snap: Snap, req: Req, active: set[str], waiting: set[str], max_loras: int, expected: float
) -> None:
    rep = snap("r0", active=active, max_loras=max_loras)
    rep = ReplicaSnapshot(**{**_fields(rep), "waiting_adapters": frozenset(waiting)})
    scores = LoraAffinityScorer().score(RoutingContext(), req("a"), [rep])
    assert scores == {"r0": expected}


def _fields(rep: ReplicaSnapshot) -> dict[str, object]:
    return {name: getattr(rep, name) for name in rep.__dataclass_fields__}


def test_lora_affinity_base_model_needs_no_slot(snap: Snap, req: Req) -> None:
    reps = [snap("r0", active=["x", "y"], max_loras=2)]
    assert LoraAffinityScorer().score(RoutingContext(), req(None), reps) == {"r0": 1.0}


# replicas as (active, waiting queue, kv usage) -> expected choice (affinity + queue + kv, w=1)
AFFINITY_POLICY_TABLE: list[tuple[list[tuple[set[str], int, float]], str]] = [
    # r1 has the adapter active: 1 + 1 + 1 vs 0.8 + 1 + 1
    ([({"b"}, 0, 0.0), ({"a"}, 0, 0.0)], "r1"),
    # r1 active but longest queue and fuller KV: 1 + 0 + 0.2 vs r0 free slot 0.8 + 1 + 1
    ([({"b"}, 0, 0.0), ({"a"}, 5, 0.8)], "r0"),
    # r0 slots full (max_loras 4): 0 + 1 + 1; r1 free slot, some queue: 0.8 + 0.5 + 1
    ([({"b", "c", "d", "e"}, 0, 0.0), ({"f"}, 2, 0.0), (set(), 4, 0.0)], "r1"),
]


@pytest.mark.parametrize(("reps_spec", "expected"), AFFINITY_POLICY_TABLE)
def test_lora_affinity_policy_table(
    snap: Snap, req: Req, reps_spec: list[tuple[set[str], int, float]], expected: str
) -> None:
    policy = build_policy("lora_affinity", seed=1)
    reps = [snap(f"r{i}", active=act, waiting=w, kv=kv) for i, (act, w, kv) in enumerate(reps_spec)]
    assert {policy.choose(req("a"), reps) for _ in range(5)} == {expected}


# replicas as (gpu, cpu, registered, in_flight) -> expected choice for adapter "a"
MULTIPLEX_TABLE: list[tuple[list[tuple[list[str], list[str], list[str], int]], str]] = [
    # holder in GPU wins even when busier
    ([([], [], [], 0), (["a"], ["a"], ["a"], 9)], "r1"),
    # CPU-cache holder counts as holding
    ([([], [], [], 0), ([], ["a"], ["a"], 5), ([], [], ["a"], 1)], "r1"),
    # among holders, the least loaded
    ([(["a"], ["a"], ["a"], 7), (["a"], ["a"], ["a"], 3), ([], [], [], 0)], "r1"),
    # no holder (registered only does not count by default): least loaded overall
    ([([], [], ["a"], 4), (["b"], ["b"], ["b"], 2), ([], [], [], 3)], "r1"),
]


@pytest.mark.parametrize(("reps_spec", "expected"), MULTIPLEX_TABLE)
def test_lru_multiplex_table(
    snap: Snap,
    req: Req,
    reps_spec: list[tuple[list[str], list[str], list[str], int]],
    expected: str,
) -> None:
    policy = build_policy("lru_multiplex", seed=3)
    reps = [
        snap(f"r{i}", gpu=g, cpu=c, registered=reg, in_flight=n)
        for i, (g, c, reg, n) in enumerate(reps_spec)
    ]
    assert {policy.choose(req("a"), reps) for _ in range(5)} == {expected}


def test_lru_multiplex_fewest_models_fallback(snap: Snap, req: Req) -> None:
    policy = build_policy({"policy": "lru_multiplex", "fallback": "fewest_models"})
    reps = [
        snap("r0", cpu=["b", "c"], in_flight=0),
        snap("r1", cpu=["d"], in_flight=5),  # fewest models, though busier
        snap("r2", cpu=["e", "f", "g"], in_flight=1),
    ]
    assert policy.choose(req("a"), reps) == "r1"


def test_lru_multiplex_max_ongoing_requests_spills(snap: Snap, req: Req) -> None:
    capped = build_policy({"policy": "lru_multiplex", "max_ongoing_requests": 8})
    uncapped = build_policy("lru_multiplex")
    reps = [snap("r0", gpu=["a"], cpu=["a"], in_flight=8), snap("r1", in_flight=2)]
    assert capped.choose(req("a"), reps) == "r1"
    assert uncapped.choose(req("a"), reps) == "r0"


def test_lru_multiplex_registered_option(snap: Snap, req: Req) -> None:
    policy = build_policy({"policy": "lru_multiplex", "include_registered": True})
    reps = [snap("r0", in_flight=0), snap("r1", registered=["a"], in_flight=4)]
    assert policy.choose(req("a"), reps) == "r1"
