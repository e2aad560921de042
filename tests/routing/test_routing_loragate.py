"""The loragate policy: expected-TTFT cost model, table-tested on explicit snapshots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from loragate.core.types import ReplicaSnapshot, RoutingRequest
from loragate.routing import LinearStepTimeModel, RoutingContext, build_policy
from loragate.routing.expected_ttft import CostParams, ExpectedTTFTScorer

Snap = Callable[..., ReplicaSnapshot]
Req = Callable[..., RoutingRequest]


def _holding(adapter: str, n: int, **kw: object) -> dict[str, object]:
    """Snapshot kwargs for a replica running ``n`` requests of ``adapter``."""
    return {
        "in_flight": n,
        "running": n,
        "per_adapter": {adapter: n},
        "active": [adapter],
        "gpu": [adapter],
        "cpu": [adapter],
        **kw,
    }


# name, replicas (kwargs of snap), expected choice for adapter "a"
TABLE: list[tuple[str, list[dict[str, object]], str]] = [
    ("running adapter beats idle replica", [{}, _holding("a", 1)], "r1"),
    (
        "concentrate while there is headroom",
        [{"in_flight": 10, "per_adapter": {"b": 10}}, _holding("a", 60)],
        "r1",
    ),
    (
        "spread when the replica running it is saturated",
        [
            {"in_flight": 20, "per_adapter": {"b": 20}, "cpu": ["a"]},
            _holding("a", 300, max_num_seqs=256),
        ],
        "r0",
    ),
    ("GPU-resident beats disk", [{}, {"gpu": ["a"], "cpu": ["a"]}], "r1"),
    ("CPU cache beats disk", [{"registered": ["a"]}, {"cpu": ["a"]}], "r1"),
    (
        "free LoRA slot beats full slots",
        [
            {"in_flight": 4, "per_adapter": {"b": 1, "c": 1, "d": 1, "e": 1}, "cpu": ["a"]},
            {"in_flight": 30, "per_adapter": {"f": 30}, "cpu": ["a"]},
        ],
        "r1",
    ),
    (
        "shorter deferred backlog when every replica is full",
        [
            {"in_flight": 6, "per_adapter": {x: 1 for x in "bcdefg"}},  # 2 adapters deferred
            {"in_flight": 5, "per_adapter": {x: 1 for x in "hijkl"}},  # 1 adapter deferred
        ],
        "r1",
    ),
    (
        "fewer distinct adapters (slot pressure) at equal load",
        [
            {"in_flight": 6, "per_adapter": {"b": 2, "c": 2, "d": 2}},
            {"in_flight": 6, "per_adapter": {"e": 6}},
        ],
        "r1",
    ),
    (
        "metrics-only snapshot: deferred requests count against a replica",
        [
            {"waiting": 3, "deferred": 3, "running": 4, "active": ["b", "c", "d", "e"]},
            {"running": 8, "active": ["f", "g"]},
        ],
        "r1",
    ),
    (
        "KV memory nearly full counts as saturated",
        [{"in_flight": 40, "per_adapter": {"b": 40}, "cpu": ["a"]}, _holding("a", 40, kv=0.99)],
        "r0",
    ),
]


@pytest.mark.parametrize(("name", "spec", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_loragate_table(
    snap: Snap, req: Req, name: str, spec: list[dict[str, object]], expected: str
) -> None:
    policy = build_policy("loragate", seed=5)
    reps = [snap(f"r{i}", **kw) for i, kw in enumerate(spec)]
    picks = {policy.choose(req("a", max_tokens=256, prompt_tokens=512), reps) for _ in range(5)}
    assert picks == {expected}


def test_base_model_request_goes_to_least_busy(snap: Snap, req: Req) -> None:
    policy = build_policy("loragate")
    reps = [
        snap("r0", **_holding("b", 200)),
        snap("r1", in_flight=250, running=250, per_adapter={"c": 250}),
        snap("r2", in_flight=20, running=20, per_adapter={x: 4 for x in "defgh"}),
    ]
    # Slots are irrelevant for the base model: r2 is the least loaded despite its adapters.
    assert policy.choose(req(None), reps) == "r2"


def _cost(scorer: ExpectedTTFTScorer, rep: ReplicaSnapshot, req: RoutingRequest) -> float:
    return scorer.costs(req, [rep])[0]


def test_cost_grows_with_queue_and_deferral(snap: Snap, req: Req) -> None:
    scorer = ExpectedTTFTScorer(LinearStepTimeModel())
    r = req("a", max_tokens=128, prompt_tokens=256)
    by_load = [_cost(scorer, snap("r", **_holding("a", n)), r) for n in (0, 50, 200, 255, 400)]
    assert by_load == sorted(by_load)
    assert by_load[-1] > 2 * by_load[0]
    by_adapters = [
        _cost(scorer, snap("r", in_flight=k, per_adapter={f"x{i}": 1 for i in range(k)}), r)
        for k in (0, 2, 3, 4, 6)
    ]
    assert by_adapters == sorted(by_adapters)


def test_running_mean_of_lengths_is_learned_and_deterministic(snap: Snap, req: Req) -> None:
    scorer = ExpectedTTFTScorer(LinearStepTimeModel(), CostParams(mean_output_tokens=10.0))
    rep = snap("r", in_flight=4, per_adapter={x: 1 for x in "bcde"})
    r = req("a", max_tokens=1000)
    before = _cost(scorer, rep, r)
    for _ in range(200):
        scorer.score(RoutingContext(), r, [rep])
    after = _cost(scorer, rep, r)
    # Longer requests hold slots longer: waiting for a LoRA slot costs more.
    assert after > 5 * before
    frozen = ExpectedTTFTScorer(
        LinearStepTimeModel(), CostParams(mean_output_tokens=10.0, length_ewma_alpha=0.0)
    )
    for _ in range(50):
        frozen.score(RoutingContext(), r, [rep])
    assert _cost(frozen, rep, r) == pytest.approx(before)


@dataclass(frozen=True)
class _SlowDisk:
    """A step-time model whose disk loads are very slow (like a cold object store)."""

    def step_time_s(self, batch_size: int, distinct_adapters: int) -> float:
        return 0.02

    def load_s(self, rank: int, from_disk: bool) -> float:
        return 30.0 if from_disk else 0.001


def test_injected_step_time_model_is_used(snap: Snap, req: Req) -> None:
    reps = [
        snap("r0", in_flight=1, per_adapter={"b": 1}),  # idle-ish, adapter on disk
        snap("r1", in_flight=260, per_adapter={"c": 260}, cpu=["a"]),  # full, adapter in CPU
    ]
    no_stickiness = {"policy": "loragate", "gpu_miss_s": 0, "cpu_miss_s": 0}
    default = build_policy(no_stickiness)
    slow_disk = build_policy(no_stickiness, step_time_model=_SlowDisk())
    r = req("a", max_tokens=64, prompt_tokens=64)
    assert default.choose(r, reps) == "r0"
    assert slow_disk.choose(r, reps) == "r1"


def test_scores_rank_by_cost_and_are_exposed(snap: Snap, req: Req) -> None:
    scorer = ExpectedTTFTScorer(LinearStepTimeModel())
    reps = [snap("r0"), snap("r1", **_holding("a", 1)), snap("r2", in_flight=300, running=256)]
    ctx = RoutingContext()
    scores = scorer.score(ctx, req("a"), reps)
    costs = ctx.scratch["expected_ttft_s"]
    assert isinstance(costs, list)
    assert scores["r1"] == 1.0
    order_by_score = sorted(scores, key=lambda k: -scores[k])
    order_by_cost = [reps[i].replica_id for i in sorted(range(3), key=lambda i: costs[i])]
    assert order_by_score == order_by_cost
    assert all(0.0 < v <= 1.0 for v in scores.values())


def test_loragate_params_validate() -> None:
    from loragate.core.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        build_policy({"policy": "loragate", "new_slot_weight": -1})
    assert exc.value.key == "routing.new_slot_weight"
    p = build_policy({"policy": "loragate", "params": {"hold_factor": 2, "default_rank": 32}})
    assert p.name == "loragate"


def test_miss_penalty_brings_idle_adapters_home(snap: Snap, req: Req) -> None:
    reps = [
        snap("r0", in_flight=2, per_adapter={"b": 2}),  # slots free, adapter only on disk
        # holds "a" in GPU, but the last free LoRA slot would go to it
        snap("r1", in_flight=30, per_adapter={"c": 10, "d": 10, "e": 10}, gpu=["a"], cpu=["a"]),
    ]
    r = req("a", max_tokens=256, prompt_tokens=512)
    sticky = build_policy("loragate")
    loose = build_policy(
        {"policy": "loragate", "gpu_miss_s": 0, "cpu_miss_s": 0, "load_stall_weight": 0}
    )
    assert sticky.choose(r, reps) == "r1"
    assert loose.choose(r, reps) == "r0"


@dataclass(frozen=True)
class _CostlyPrefill:
    """The linear model plus a prefill cost per prompt token (optional protocol method)."""

    per_token_s: float = 70e-6

    def step_time_s(self, batch_size: int, distinct_adapters: int) -> float:
        return LinearStepTimeModel().step_time_s(batch_size, distinct_adapters)

    def load_s(self, rank: int, from_disk: bool) -> float:
        return LinearStepTimeModel().load_s(rank, from_disk)

    def prefill_token_s(self) -> float:
        return self.per_token_s


def test_prefill_time_prices_the_prompts_ahead(snap: Snap, req: Req) -> None:
    reps = [snap("r0", **_holding("a", 1, waiting=3)), snap("r1", **_holding("a", 1))]
    flat = ExpectedTTFTScorer(LinearStepTimeModel(), CostParams(length_ewma_alpha=0.0))
    costly = ExpectedTTFTScorer(_CostlyPrefill(), CostParams(length_ewma_alpha=0.0))
    r = req("a", max_tokens=64, prompt_tokens=2000)
    gap_flat = flat.costs(r, reps)[0] - flat.costs(r, reps)[1]
    gap_costly = costly.costs(r, reps)[0] - costly.costs(r, reps)[1]
    # three waiting prompts of the mean length (512 tokens) at 70 us per token
    assert gap_costly - gap_flat == pytest.approx(3 * 512 * 70e-6, rel=1e-6)
    # and the request's own prompt is charged on every replica
    assert costly.costs(r, reps)[1] - flat.costs(r, reps)[1] == pytest.approx(2000 * 70e-6)


def test_prefill_memory_spreads_back_to_back_long_prompts(snap: Snap, req: Req) -> None:
    reps = [snap("r0"), snap("r1")]  # identical and idle: the engines show nothing yet
    policy = build_policy(
        {"policy": "loragate", "gpu_miss_s": 0, "cpu_miss_s": 0}, step_time_model=_CostlyPrefill()
    )
    for t in (0.0, 100.0, 200.0):  # the second long prompt avoids the first one's prefill
        a = policy.choose(req(None, prompt_tokens=4000, max_tokens=8), reps, policy.context(t))
        b = policy.choose(req(None, prompt_tokens=4000, max_tokens=8), reps, policy.context(t))
        assert a != b
    # the remembered work drains at one second per second
    scorer = ExpectedTTFTScorer(_CostlyPrefill())
    ctx = RoutingContext(now_s=0.0)
    scorer.score(ctx, req(None, prompt_tokens=4000), reps)
    scorer.chosen(ctx, "r0")
    busy = scorer.costs(req(None, prompt_tokens=10), reps, now_s=0.1)
    drained = scorer.costs(req(None, prompt_tokens=10), reps, now_s=10.0)
    assert busy[0] - busy[1] == pytest.approx(4000 * 70e-6 - 0.1)
    assert drained[0] == pytest.approx(drained[1])
    # switched off, nothing is remembered
    off = ExpectedTTFTScorer(_CostlyPrefill(), CostParams(prefill_memory=False))
    ctx = RoutingContext(now_s=0.0)
    off.score(ctx, req(None, prompt_tokens=4000), reps)
    off.chosen(ctx, "r0")
    assert off.costs(req(None, prompt_tokens=10), reps)[0] == pytest.approx(
        off.costs(req(None, prompt_tokens=10), reps)[1]
    )


def test_adapter_load_stalls_the_requests_it_delays(snap: Snap, req: Req) -> None:
    model = LinearStepTimeModel()
    r = req("a", max_tokens=64, prompt_tokens=64, adapter_rank=16)
    stalled = ExpectedTTFTScorer(model, CostParams(length_ewma_alpha=0.0))
    alone = ExpectedTTFTScorer(model, CostParams(length_ewma_alpha=0.0, load_stall_weight=0.0))

    def extra(busy: dict[str, object]) -> float:
        """What the stall adds to a disk load over a GPU-resident adapter on that replica."""
        reps = [snap("r0", **busy, registered=["a"]), snap("r1", **busy, gpu=["a"], cpu=["a"])]
        with_stall, without = stalled.costs(r, reps), alone.costs(r, reps)
        return (with_stall[0] - with_stall[1]) - (without[0] - without[1])

    disk = model.load_s(16, True)
    # LoRA slots full (4 of 4): the load delays all 60 requests there (and the deferred behind)
    full = {"in_flight": 60, "running": 60, "per_adapter": {x: 15 for x in "bcde"}}
    assert extra(full) == pytest.approx(60 * disk)
    # two of four slots taken: the 10 waiting requests, and the running ones weighted by 1/4
    half = {"in_flight": 50, "running": 40, "waiting": 10, "per_adapter": {"b": 25, "c": 25}}
    assert extra(half) == pytest.approx((10 + 40 * 0.25) * disk)
    # on an empty replica the load costs this request alone
    assert extra({}) == pytest.approx(0.0)
