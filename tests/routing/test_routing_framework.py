"""The framework, round_robin and least_loaded: table tests over explicit snapshots."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import pytest

from loragate.core.errors import NoReplicaAvailableError
from loragate.core.types import ReplicaId, ReplicaSnapshot, RoutingRequest
from loragate.routing import (
    NoCandidateError,
    RoutingContext,
    RoutingProfile,
    WeightedScorer,
    build_policy,
)
from loragate.routing.pickers import MaxScorePicker

Snap = Callable[..., ReplicaSnapshot]
Req = Callable[..., RoutingRequest]


def test_round_robin_cycles_in_candidate_order(snap: Snap, req: Req) -> None:
    policy = build_policy("round_robin")
    reps = [snap("r0", in_flight=9), snap("r1"), snap("r2")]
    got = [policy.choose(req(), reps, policy.context()) for _ in range(7)]
    assert got == ["r0", "r1", "r2", "r0", "r1", "r2", "r0"]


def test_round_robin_skips_unhealthy(snap: Snap, req: Req) -> None:
    policy = build_policy("round_robin")
    reps = [snap("r0"), snap("r1", healthy=False), snap("r2")]
    got = {policy.choose(req(), reps) for _ in range(6)}
    assert got == {"r0", "r2"}


def test_round_robin_state_is_per_policy_object(snap: Snap, req: Req) -> None:
    reps = [snap("r0"), snap("r1")]
    a, b = build_policy("round_robin"), build_policy("round_robin")
    assert a.choose(req(), reps) == "r0"
    assert a.choose(req(), reps) == "r1"
    assert b.choose(req(), reps) == "r0"  # b has its own counter


# (in_flight, waiting) per replica -> expected choice with tie_break=first
LEAST_LOADED_TABLE: list[tuple[list[tuple[int, int]], str]] = [
    ([(3, 0), (1, 0), (2, 0)], "r1"),
    ([(1, 3), (2, 0), (4, 0)], "r1"),  # 1 + 3 = 4 > 2
    ([(0, 0), (0, 0), (0, 0)], "r0"),  # tie -> first
    ([(5, 5), (5, 4), (5, 5)], "r1"),
    ([(0, 7), (6, 0), (7, 0)], "r1"),
]


@pytest.mark.parametrize(("loads", "expected"), LEAST_LOADED_TABLE)
def test_least_loaded_table(
    snap: Snap, req: Req, loads: list[tuple[int, int]], expected: str
) -> None:
    policy = build_policy({"policy": "least_loaded", "tie_break": "first"})
    reps = [snap(f"r{i}", in_flight=f, waiting=w) for i, (f, w) in enumerate(loads)]
    assert policy.choose(req(), reps, policy.context()) == expected


def test_least_loaded_random_ties_cover_all_tied_and_only_them(snap: Snap, req: Req) -> None:
    policy = build_policy("least_loaded", seed=7)
    reps = [snap("r0", in_flight=2), snap("r1", in_flight=1), snap("r2", in_flight=1)]
    got = Counter(policy.choose(req(), reps) for _ in range(200))
    assert set(got) == {"r1", "r2"}
    assert min(got.values()) > 50


def test_same_seed_same_decisions(snap: Snap, req: Req) -> None:
    reps = [snap(f"r{i}") for i in range(5)]
    runs = []
    for _ in range(2):
        policy = build_policy("least_loaded", seed=42)
        runs.append([policy.choose(req(), reps) for _ in range(30)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1


def test_context_rng_drives_tie_breaks(snap: Snap, req: Req) -> None:
    policy = build_policy("least_loaded")
    reps = [snap(f"r{i}") for i in range(8)]
    a = [policy.choose(req(), reps, RoutingContext(rng=random.Random(3))) for _ in range(5)]
    b = [policy.choose(req(), reps, RoutingContext(rng=random.Random(3))) for _ in range(5)]
    assert a == b  # fresh identical RNG each time -> same pick each time
    assert len(set(a)) == 1


def test_no_candidates_is_typed_error(snap: Snap, req: Req) -> None:
    policy = build_policy("least_loaded")
    with pytest.raises(NoCandidateError) as exc:
        policy.choose(req(), [snap("r0", healthy=False)])
    assert isinstance(exc.value, NoReplicaAvailableError)
    assert "no healthy replica" in str(exc.value)
    with pytest.raises(NoCandidateError):
        policy.choose(req(), [])


class _Fixed:
    def __init__(self, scores: Mapping[str, float]) -> None:
        self.scores = scores

    def score(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Mapping[ReplicaId, float]:
        return self.scores


class _DropAll:
    def filter(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Sequence[ReplicaSnapshot]:
        return []


def test_scores_are_clamped_and_weighted(snap: Snap, req: Req) -> None:
    reps = [snap("r0"), snap("r1"), snap("r2")]
    # r0: 5 -> 1.0 (clamped) * 1 + 0 = 1.0; r1: 0.9 + 2 * 0.3 = 1.5; r2: -3 -> 0 + 2 * 0.7 = 1.4
    profile = RoutingProfile(
        name="t",
        scorers=[
            WeightedScorer(1.0, _Fixed({"r0": 5.0, "r1": 0.9, "r2": -3.0})),
            WeightedScorer(2.0, _Fixed({"r0": 0.0, "r1": 0.3, "r2": 0.7})),
        ],
        picker=MaxScorePicker("first"),
    )
    assert profile.choose(req(), reps) == "r1"
    nan_profile = RoutingProfile(
        name="nan",
        scorers=[WeightedScorer(1.0, _Fixed({"r0": float("nan"), "r1": 0.1}))],
        picker=MaxScorePicker("first"),
    )
    assert nan_profile.choose(req(), reps) == "r1"  # NaN counts as 0; r2 missing counts as 0


def test_filter_that_drops_everything_raises(snap: Snap, req: Req) -> None:
    profile = RoutingProfile(name="t", filters=[_DropAll()], picker=MaxScorePicker())
    with pytest.raises(NoCandidateError, match="no replica can serve model 'a'"):
        profile.choose(req(), [snap("r0")])
