"""A scorer is told each decision's choice, whatever the picker (``ChoiceObserver``).

The ``expected_ttft`` scorer's ``prefill_memory`` (the prefill work routed to each replica)
depends on it: composed with ``max_score`` it must decide as the ``loragate`` policy does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

import pytest

from loragate.core.types import ReplicaId, ReplicaSnapshot, RoutingRequest
from loragate.routing import (
    LinearStepTimeModel,
    RoutingContext,
    RoutingProfile,
    WeightedScorer,
    build_policy,
)
from loragate.routing.expected_ttft import ExpectedTTFTScorer
from loragate.routing.pickers import MaxScorePicker, RoundRobinPicker

Snap = Callable[..., ReplicaSnapshot]
Req = Callable[..., RoutingRequest]


class _CostlyPrefill:
    """The linear model plus 70 µs of prefill per prompt token (as the twin's profiles)."""

    def step_time_s(self, batch_size: int, distinct_adapters: int) -> float:
        return LinearStepTimeModel().step_time_s(batch_size, distinct_adapters)

    def load_s(self, rank: int, from_disk: bool) -> float:
        return LinearStepTimeModel().load_s(rank, from_disk)

    def prefill_token_s(self) -> float:
        return 70e-6


def _composed(picker: str, prefill_memory: bool, **picker_params: object) -> RoutingProfile:
    return build_policy(
        {
            "scorers": [{"name": "expected_ttft", "params": {"prefill_memory": prefill_memory}}],
            "picker": {"name": picker, "params": picker_params},
        },
        seed=3,
        step_time_model=_CostlyPrefill(),
    )


def _replicas(snap: Snap) -> list[ReplicaSnapshot]:
    return [
        snap("r0"),
        snap("r1", in_flight=2, running=2, per_adapter={"a": 2}, active=["a"], gpu=["a"]),
        snap("r2", in_flight=1, running=1, per_adapter={"b": 1}, active=["b"], cpu=["a", "b"]),
        snap("r3", waiting=1, in_flight=3, running=2, per_adapter={"c": 3}, gpu=["c"]),
    ]


def _decisions(policy: RoutingProfile, snap: Snap, req: Req) -> list[str]:
    """Long and short prompts of a few adapters, 50 ms apart: the prefill backlog a replica
    was sent (up to 0.42 s of 6,000 tokens) outlasts the gap."""
    rng = random.Random(11)
    reps = _replicas(snap)
    out = []
    for i in range(60):
        r = req(
            rng.choice([None, "a", "b", "c"]),
            prompt_tokens=rng.choice([50, 200, 3000, 6000]),
            max_tokens=rng.choice([16, 128]),
        )
        out.append(policy.choose(r, reps, policy.context(i * 0.05)))
    return out


def test_composed_max_score_remembers_prefill_as_loragate_does(snap: Snap, req: Req) -> None:
    fused = build_policy("loragate", seed=3, step_time_model=_CostlyPrefill())
    on = _composed("max_score", True)
    off = _composed("max_score", False)
    assert fused._fused is not None and on._fused is None
    want = _decisions(fused, snap, req)
    assert _decisions(on, snap, req) == want
    assert _decisions(off, snap, req) != want


def test_back_to_back_long_prompts_spread_with_prefill_memory(snap: Snap, req: Req) -> None:
    """Two idle identical replicas, ties to the first: the second long prompt goes where the
    first one's prefill is not, unless prefill_memory is off."""
    reps = [snap("r0"), snap("r1")]
    for memory, want in ((True, ["r0", "r1", "r0", "r1"]), (False, ["r0"] * 4)):
        policy = _composed("max_score", memory, tie_break="first")
        got = [
            policy.choose(req(None, prompt_tokens=4000, max_tokens=8), reps, policy.context(t))
            for t in (0.0, 0.0, 100.0, 100.0)
        ]
        assert got == want, memory


@pytest.mark.parametrize("picker", ["max_score", "weighted_random", "power_of_two"])
def test_every_score_picker_feeds_the_backlog(snap: Snap, req: Req, picker: str) -> None:
    policy = _composed(picker, True)
    scorer = policy.scorers[0].scorer
    assert isinstance(scorer, ExpectedTTFTScorer)
    reps = [snap("r0"), snap("r1"), snap("r2")]
    probe = req(None, prompt_tokens=10)
    before = scorer.costs(probe, reps, now_s=0.0)
    rid = policy.choose(req(None, prompt_tokens=4000), reps, policy.context(0.0))
    after = scorer.costs(probe, reps, now_s=0.0)
    for r, b, a in zip(reps, before, after, strict=True):
        if r.replica_id == rid:  # 4,000 tokens at 70 µs queued ahead there
            assert a - b == pytest.approx(4000 * 70e-6)
        else:
            assert a == b


class _Recording:
    """Scores every candidate 0.5 and records the choices it is told."""

    bounded_scores = True

    def __init__(self) -> None:
        self.told: list[tuple[float, ReplicaId]] = []

    def score(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Mapping[ReplicaId, float]:
        return {r.replica_id: 0.5 for r in replicas}

    def chosen(self, ctx: RoutingContext, replica_id: ReplicaId) -> None:
        self.told.append((ctx.now_s, replica_id))


def test_each_observing_scorer_is_told_once_per_decision(snap: Snap, req: Req) -> None:
    reps = [snap("r0"), snap("r1"), snap("r2")]
    alone, shared, unused = _Recording(), _Recording(), _Recording()
    profiles = [
        # one scorer at weight 1 (the scores are the totals)
        RoutingProfile(
            name="direct", scorers=[WeightedScorer(1.0, alone)], picker=MaxScorePicker()
        ),
        # weighted sums; the same object twice is told once; weight 0 is not scored nor told
        RoutingProfile(
            name="summed",
            scorers=[
                WeightedScorer(0.5, shared),
                WeightedScorer(2.0, shared),
                WeightedScorer(0.0, unused),
            ],
            picker=MaxScorePicker(),
        ),
    ]
    for policy, observer in zip(profiles, (alone, shared), strict=True):
        picked = [policy.choose(req(), reps, policy.context(float(t))) for t in range(5)]
        assert observer.told == list(zip(map(float, range(5)), picked, strict=True))
    assert unused.told == []
    assert RoutingProfile(name="rr", picker=RoundRobinPicker())._observers == ()


def test_two_expected_ttft_scorers_each_remember_their_own_estimate(snap: Snap, req: Req) -> None:
    """A request without a prompt length counts as each scorer's own mean prompt, and a
    choice told twice is added once."""
    policy = build_policy(
        {
            "scorers": [
                {"name": "expected_ttft", "params": {"mean_prompt_tokens": 100.0}},
                {"name": "expected_ttft", "params": {"mean_prompt_tokens": 4000.0}},
            ],
        },
        step_time_model=_CostlyPrefill(),
    )
    short, long = (ws.scorer for ws in policy.scorers)
    assert isinstance(short, ExpectedTTFTScorer) and isinstance(long, ExpectedTTFTScorer)
    reps = [snap("r0"), snap("r1")]
    probe = req(None, prompt_tokens=10)
    before = short.costs(probe, reps), long.costs(probe, reps)
    ctx = policy.context(0.0)
    rid = policy.choose(req(None, prompt_tokens=0), reps, ctx)
    short.chosen(ctx, rid)  # told again: nothing more
    i = [r.replica_id for r in reps].index(rid)
    for scorer, was, tokens in ((short, before[0], 100), (long, before[1], 4000)):
        assert scorer.costs(probe, reps)[i] - was[i] == pytest.approx(tokens * 70e-6)
