"""The ``loragate`` scorer's fast path agrees with the cost model evaluated term by term.

``ExpectedTTFTScorer.costs`` keeps per-replica coefficients across decisions (``ReplicaTerms``)
to make a decision cheap. ``_TermByTermScorer`` below evaluates the module doc's formulas
directly, one replica at a time, with nothing kept: on randomised snapshot sequences both must
give the same costs (to 1e-12 relative: the coefficients sum the same terms in another order)
and the ``loragate`` profile built on either must pick the same replicas. The snapshots are
also changed the way the gateway changes them (``in_flight`` in place, a live
``adapter_in_flight``), so stale coefficients would show.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import pytest

from loragate.core.types import (
    ReplicaId,
    ReplicaSettings,
    ReplicaSnapshot,
    Residency,
    RoutingRequest,
)
from loragate.routing import (
    LinearStepTimeModel,
    RoutingContext,
    RoutingProfile,
    WeightedScorer,
    build_policy,
)
from loragate.routing.expected_ttft import (
    MAX_TIME_S,
    SCORE_TAU_S,
    CostParams,
    ExpectedTTFTPicker,
    ExpectedTTFTScorer,
)
from loragate.routing.pickers import EPSILON, TieBreak
from loragate.routing.step_time import StepTimeModel


def _sane(seconds: float) -> float:
    if not seconds >= 0.0:
        return 0.0
    return seconds if seconds < MAX_TIME_S else MAX_TIME_S


class _TermByTermScorer(ExpectedTTFTScorer):
    """The cost model of ``expected_ttft``'s module doc, term by term, nothing cached."""

    def costs(
        self, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot], now_s: float = 0.0
    ) -> list[float]:
        p = self.p
        adapter = req.adapter
        mean_out, mean_prompt = self._mean_out, self._mean_prompt
        prompt = req.prompt_tokens if req.prompt_tokens > 0 else mean_prompt
        own_out = float(req.max_tokens) if p.own_length and req.max_tokens > 0 else mean_out
        rank = req.adapter_rank if req.adapter_rank is not None else p.default_rank
        load_cpu = _sane(self.model.load_s(rank, False))
        load_disk = _sane(self.model.load_s(rank, True))
        ptok = self._ptok
        out = []
        for r in replicas:
            st = r.settings
            slots = max(st.max_loras, 1)
            seqs = max(st.max_num_seqs, 1)
            n = max(r.in_flight, r.num_running + r.num_waiting)
            n_eff = max(n - r.num_deferred, 0)
            batch = min(n_eff, seqs)
            aif = r.adapter_in_flight
            if aif:
                d = len(aif)
                deferred_ahead = max(d - slots, 0)
                in_flight_here = adapter is not None and adapter in aif
                running = in_flight_here and (d <= slots or adapter in r.active_adapters)
            else:
                d = len(r.active_adapters)
                deferred_ahead = r.num_deferred
                in_flight_here = adapter is not None and adapter in r.active_adapters
                running = in_flight_here
            new_slot = adapter is not None and not in_flight_here
            distinct = d + 1 if new_slot else d
            t_step = _sane(self.model.step_time_s(batch + 1, min(distinct, slots)))
            t_seq = mean_out * t_step
            # t_first
            waiting_ahead = r.num_waiting - r.num_deferred
            budget = max(st.max_num_batched_tokens - batch, 1)
            ahead_tokens = waiting_ahead * mean_prompt if waiting_ahead > 0 else 0.0
            cost = (1.0 + (ahead_tokens + prompt) // budget) * t_step
            if ptok > 0.0:
                ahead_s = ahead_tokens * ptok
                routed = self._backlog.get(r.replica_id) if p.prefill_memory else None
                if routed is not None:
                    elapsed = now_s - routed[1]
                    ahead_s = max(ahead_s, routed[0] - elapsed if elapsed > 0.0 else routed[0])
                cost += ahead_s + prompt * ptok
            # wait_seq and congestion
            cap = float(seqs)
            kv = r.kv_usage
            if kv >= p.kv_full:
                cap = min(cap, float(n_eff))
            elif kv > 0.0 and n_eff > 0:
                cap = min(cap, n_eff * p.kv_full / kv)
            cap = max(cap, 1.0)
            if n_eff + 1 - cap > 0.0:
                cost += (n_eff + 1 - cap) * t_seq / max(batch, 1)
            if p.congestion_weight > 0.0:
                rho = min((n_eff + 1) / cap, p.rho_max)
                cost += (
                    p.congestion_weight
                    * t_seq
                    * rho ** math.sqrt(2.0 * (cap + 1.0))
                    / (cap * (1.0 - rho))
                )
            if adapter is None:
                out.append(cost)
                continue
            t_hold = p.hold_factor * t_seq
            if not running:
                # wait_slot
                if in_flight_here:
                    cost += (deferred_ahead + 1) * 0.5 * t_hold / slots
                elif d >= slots or deferred_ahead > 0:
                    cost += (deferred_ahead + 1) * t_hold / slots
                # t_load and miss_penalty
                if d >= slots:
                    stall = 1.0 + p.load_stall_weight * n
                else:
                    occupancy = d / slots
                    stall = 1.0 + p.load_stall_weight * (
                        r.num_waiting + (n - r.num_waiting) * occupancy * occupancy
                    )
                res = r.residency
                miss_disk = p.gpu_miss_s + p.cpu_miss_s
                if adapter not in res.registered:
                    cost += load_disk * stall + p.register_s + miss_disk
                elif adapter not in res.gpu:
                    if adapter in res.cpu:
                        cost += load_cpu * stall + p.gpu_miss_s
                    else:
                        cost += load_disk * stall + miss_disk
            # slot_penalty
            if new_slot:
                occupancy = min((d + 1) / slots, 1.0)
                w = p.new_slot_weight
                cost += w * own_out * t_step * p.hold_factor / slots * occupancy * occupancy
            out.append(cost)
        return out


@dataclass(frozen=True)
class _PrefillModel:
    """The linear model plus a prefill cost per prompt token (the twin's profiles have one)."""

    def step_time_s(self, batch_size: int, distinct_adapters: int) -> float:
        return LinearStepTimeModel().step_time_s(batch_size, distinct_adapters)

    def load_s(self, rank: int, from_disk: bool) -> float:
        return LinearStepTimeModel().load_s(rank, from_disk)

    def prefill_token_s(self) -> float:
        return 70e-6


class _UnfusedPicker(ExpectedTTFTPicker):
    """``ExpectedTTFTPicker`` with ``pick`` overridden (to itself): the profile then scores
    and picks in two steps, as a composed profile does."""

    def pick(self, ctx: RoutingContext, scored: Mapping[ReplicaId, float]) -> ReplicaId:
        return super().pick(ctx, scored)


ADAPTERS = [f"a{i}" for i in range(12)]


def _random_snapshot(rng: random.Random, rid: str, settings: ReplicaSettings) -> ReplicaSnapshot:
    running = rng.choice((0, 1, 5, 40, 250, 300))
    waiting = rng.choice((0, 0, 3, 30))
    per_adapter = {a: rng.randint(1, 9) for a in rng.sample(ADAPTERS, rng.randint(0, 10))}
    if rng.random() < 0.2:
        per_adapter = {}  # metrics-only: no gateway bookkeeping per adapter
    registered = rng.sample(ADAPTERS, rng.randint(0, 10))
    cpu = tuple(registered[: rng.randint(0, len(registered))])
    gpu = cpu[len(cpu) - rng.randint(0, len(cpu)) :]
    return ReplicaSnapshot(
        replica_id=rid,
        url=f"http://127.0.0.1:1/{rid}",
        healthy=rng.random() > 0.05,
        settings=settings,
        num_running=running,
        num_waiting=waiting,
        num_deferred=rng.randint(0, waiting),
        kv_usage=rng.choice((0.0, rng.random(), 0.97, 1.0, math.nan)),
        active_adapters=frozenset(rng.sample(ADAPTERS, rng.randint(0, 6))),
        in_flight=rng.choice((0, running + waiting, rng.randint(0, 400))),
        adapter_in_flight=MappingProxyType(per_adapter),
        residency=Residency(registered=frozenset(registered), gpu=gpu, cpu=cpu),
    )


def _random_request(rng: random.Random, i: int) -> RoutingRequest:
    return RoutingRequest(
        request_id=f"q{i}",
        adapter=rng.choice([None, *ADAPTERS]),
        prompt_tokens=rng.choice((0, 1, 300, 5000)),
        max_tokens=rng.choice((0, 16, 700)),
        adapter_rank=rng.choice((None, 8, 64)),
    )


SETTINGS = [
    ReplicaSettings(max_loras=4, max_num_seqs=256),
    ReplicaSettings(max_loras=8, max_cpu_loras=32, max_num_seqs=64),
    ReplicaSettings(max_loras=0, max_num_seqs=0, max_num_batched_tokens=16),  # degenerate
    ReplicaSettings(max_loras=1, max_num_seqs=2, max_num_batched_tokens=1),
]

# name, step-time model, cost parameters
CASES: list[tuple[str, Callable[[], StepTimeModel], CostParams]] = [
    ("defaults", LinearStepTimeModel, CostParams()),
    ("prefill model and backlog", _PrefillModel, CostParams()),
    ("prefill model, no backlog", _PrefillModel, CostParams(prefill_memory=False)),
    (
        "own length, frozen means",
        LinearStepTimeModel,
        CostParams(own_length=True, length_ewma_alpha=0.0),
    ),
    (
        "no congestion, stall or hold",
        LinearStepTimeModel,
        CostParams(congestion_weight=0.0, load_stall_weight=0.0, hold_factor=0.0),
    ),
    (
        "heavy weights",
        _PrefillModel,
        CostParams(congestion_weight=3.0, new_slot_weight=2.0, hold_factor=1.5, rho_max=0.5),
    ),
]


def _assert_same_costs(fast: list[float], slow: list[float]) -> None:
    assert len(fast) == len(slow)
    for f, s in zip(fast, slow, strict=True):
        assert math.isclose(f, s, rel_tol=1e-12, abs_tol=1e-300), (fast, slow)


@pytest.mark.parametrize(("name", "model", "params"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_costs_and_picks_match_term_by_term(
    name: str, model: Callable[[], StepTimeModel], params: CostParams, seed: int
) -> None:
    rng = random.Random(seed)
    fast = ExpectedTTFTScorer(model(), params)
    slow = _TermByTermScorer(model(), params)
    fast_policy = RoutingProfile(
        name="fast", scorers=[WeightedScorer(1.0, fast)], picker=ExpectedTTFTPicker(fast), seed=seed
    )
    slow_policy = RoutingProfile(
        name="slow", scorers=[WeightedScorer(1.0, slow)], picker=ExpectedTTFTPicker(slow), seed=seed
    )
    # The same as ``fast_policy``, through the generic score-then-pick path.
    unfused = ExpectedTTFTScorer(model(), params)
    unfused_policy = RoutingProfile(
        name="unfused",
        scorers=[WeightedScorer(1.0, unfused)],
        picker=_UnfusedPicker(unfused),
        seed=seed,
    )
    assert fast_policy._fused is not None and unfused_policy._fused is None
    settings = [rng.choice(SETTINGS) for _ in range(6)]
    replicas = [_random_snapshot(rng, f"r{i}", settings[i]) for i in range(6)]
    for i in range(300):
        j = rng.randrange(len(replicas))
        change = rng.random()
        if change < 0.2:  # a poll: a new snapshot
            replicas[j] = _random_snapshot(rng, f"r{j}", settings[j])
        elif change < 0.4:  # the gateway's in-place update of the same snapshot
            object.__setattr__(replicas[j], "in_flight", rng.randint(0, 400))
        elif change < 0.6:  # its per-adapter counts change (a live view in the gateway)
            live = {a: 1 for a in rng.sample(ADAPTERS, rng.randint(0, 10))}
            object.__setattr__(replicas[j], "adapter_in_flight", MappingProxyType(live))
        elif change < 0.7:  # its shadow residency moves on, in place (gateway.proxy)
            res = _random_snapshot(rng, f"r{j}", settings[j]).residency
            object.__setattr__(replicas[j], "residency", res)
        req = _random_request(rng, i)
        now = i * 0.01
        _assert_same_costs(fast.costs(req, replicas, now), slow.costs(req, replicas, now))
        if any(r.healthy for r in replicas):
            picked = fast_policy.choose(req, replicas, fast_policy.context(now))
            assert picked == slow_policy.choose(req, replicas, slow_policy.context(now))
            assert picked == unfused_policy.choose(req, replicas, unfused_policy.context(now))


def test_in_place_updates_and_live_counts_are_seen(snap: Callable[..., ReplicaSnapshot]) -> None:
    """The gateway updates ``in_flight`` in place and ``adapter_in_flight`` is a live view:
    kept coefficients must follow both."""
    fast = ExpectedTTFTScorer(LinearStepTimeModel())
    slow = _TermByTermScorer(LinearStepTimeModel())
    per_adapter: dict[str, int] = {"b": 3}
    live = MappingProxyType(per_adapter)
    reps = [
        snap("r0", in_flight=3, running=3, active=["b"], gpu=["a"], cpu=["a"]),
        snap("r1", in_flight=200, running=200, per_adapter={"c": 200}),
    ]
    object.__setattr__(reps[0], "adapter_in_flight", live)
    req = RoutingRequest(request_id="q", adapter="a", prompt_tokens=100, max_tokens=100)
    first = fast.costs(req, reps)
    _assert_same_costs(first, slow.costs(req, reps))
    # More requests and adapters arrive on r0 (the same snapshot object, as in the gateway).
    for k, adapter in enumerate("cdefghij"):
        per_adapter[adapter] = 40
        object.__setattr__(reps[0], "in_flight", 3 + 40 * (k + 1))
        _assert_same_costs(fast.costs(req, reps), slow.costs(req, reps))
    assert fast.costs(req, reps)[0] > 10 * first[0]
    # A new snapshot object with the old values: the old costs again.
    reps[0] = snap("r0", in_flight=3, running=3, active=["b"], gpu=["a"], cpu=["a"])
    object.__setattr__(reps[0], "adapter_in_flight", MappingProxyType({"b": 3}))
    assert fast.costs(req, reps) == first


# Each field the kept coefficients depend on, changed alone (in place, as the gateway does for
# in_flight, or in a new snapshot): name, the snapshot's fields, the change.
ONE_FIELD: list[tuple[str, dict[str, object], dict[str, object]]] = [
    ("in_flight", {}, {"in_flight": 90}),
    ("num_running", {}, {"num_running": 120}),
    ("num_waiting", {}, {"num_waiting": 25}),
    ("num_waiting below in_flight", {"in_flight": 200}, {"num_waiting": 25}),
    ("num_deferred", {}, {"num_deferred": 1}),
    ("kv_usage", {}, {"kv_usage": 0.96}),
    ("settings", {}, {"settings": ReplicaSettings(max_loras=2, max_num_seqs=64)}),
    ("adapters in flight", {}, {"adapter_in_flight": MappingProxyType({"b": 1, "c": 1, "d": 1})}),
    (
        "active adapters (metrics only)",
        {"per_adapter": {}, "active": ["b", "c"]},
        {"active_adapters": frozenset({"b", "c", "d", "e", "f"})},
    ),
]


@pytest.mark.parametrize(
    ("fields", "change"), [c[1:] for c in ONE_FIELD], ids=[c[0] for c in ONE_FIELD]
)
@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "new snapshot"])
def test_a_change_of_one_field_is_seen(
    snap: Callable[..., ReplicaSnapshot],
    fields: dict[str, object],
    change: dict[str, object],
    in_place: bool,
) -> None:
    fast = ExpectedTTFTScorer(LinearStepTimeModel(), CostParams(length_ewma_alpha=0.0))
    slow = _TermByTermScorer(LinearStepTimeModel(), CostParams(length_ewma_alpha=0.0))
    busy: dict[str, object] = {
        "in_flight": 60,
        "running": 60,
        "waiting": 4,
        "deferred": 2,
        "kv": 0.5,
        "active": ["b", "c", "x", "y", "z"],
        "per_adapter": {"b": 30, "c": 30},
        "cpu": ["a"],
    }
    req = RoutingRequest(request_id="q", adapter="a", prompt_tokens=100, max_tokens=100)
    reps = [snap("r0", **{**busy, **fields}), snap("r1", in_flight=20, per_adapter={"e": 20})]
    before = fast.costs(req, reps)
    _assert_same_costs(before, slow.costs(req, reps))
    if in_place:
        for name, value in change.items():
            object.__setattr__(reps[0], name, value)
    else:
        reps[0] = dataclasses.replace(reps[0], **change)  # type: ignore[arg-type]
    after = fast.costs(req, reps)
    _assert_same_costs(after, slow.costs(req, reps))
    assert after[0] != before[0]
    assert after[1] == before[1]


def test_settings_are_compared_by_value(snap: Callable[..., ReplicaSnapshot]) -> None:
    fast = ExpectedTTFTScorer(LinearStepTimeModel())
    req = RoutingRequest(request_id="q", adapter="a", prompt_tokens=100, max_tokens=100)
    busy = {"in_flight": 30, "running": 30, "per_adapter": {x: 10 for x in "bcd"}}
    few_slots = fast.costs(req, [snap("r", max_loras=2, **busy)])
    many_slots = fast.costs(req, [snap("r", max_loras=8, **busy)])
    assert many_slots[0] < few_slots[0]
    assert fast.costs(req, [snap("r", max_loras=2, **busy)]) == few_slots


def test_replica_ids_are_what_is_kept(snap: Callable[..., ReplicaSnapshot]) -> None:
    fast = ExpectedTTFTScorer(LinearStepTimeModel())
    req = RoutingRequest(request_id="q", adapter=None, prompt_tokens=10, max_tokens=10)
    ids: list[ReplicaId] = [f"r{i}" for i in range(50)]
    for _ in range(3):
        fast.costs(req, [snap(rid, in_flight=i) for i, rid in enumerate(ids)])
    assert len(fast._terms) == len(ids)


class _GivenCosts(ExpectedTTFTScorer):
    """Costs given by the test, one list per decision (``score`` itself is not overridden)."""

    def __init__(self, costs: list[float]) -> None:
        super().__init__(LinearStepTimeModel())
        self.given = costs

    def costs(
        self, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot], now_s: float = 0.0
    ) -> list[float]:
        return list(self.given)


_BASE = 0.25
_ULP = math.ulp(_BASE + SCORE_TAU_S)
# The score threshold of a tie sits between 1 - EPSILON and the next scores: a cost one part in
# 1e9 (of c_min + tau) above the cheapest ties or not depending on the last bits.
_EDGE = (_BASE + SCORE_TAU_S) / (1.0 - EPSILON) - SCORE_TAU_S
COST_LISTS: list[tuple[str, list[float]]] = [
    ("one replica", [_BASE]),
    ("distinct", [0.3, _BASE, 0.9, 0.26]),
    ("exact tie", [0.3, _BASE, 0.9, _BASE, _BASE]),
    ("tie within epsilon", [_BASE + 1e-10, 0.4, _BASE, _BASE + 2e-10]),
    ("just past epsilon", [_BASE, _BASE * (1 + 3e-9), 1.0]),
    *[(f"at the tie edge {k:+d} ulp", [_BASE, _EDGE + k * _ULP, 0.7]) for k in range(-3, 4)],
    ("all zero", [0.0, 0.0, 0.0]),
    ("zero and tau", [0.0, SCORE_TAU_S * EPSILON * 0.5, SCORE_TAU_S]),
    ("huge", [1e300, 1e300 * (1 + 1e-10), 2e300]),
    ("one inf", [math.inf, _BASE, 0.5]),
    ("all inf", [math.inf, math.inf]),
    ("nan after", [_BASE, math.nan, _BASE]),
    ("nan first", [math.nan, _BASE]),
]


@pytest.mark.parametrize("tie_break", ["random", "first"])
@pytest.mark.parametrize("costs", [c[1] for c in COST_LISTS], ids=[c[0] for c in COST_LISTS])
def test_fused_pick_is_pick_of_scores(
    snap: Callable[..., ReplicaSnapshot], costs: list[float], tie_break: TieBreak
) -> None:
    """``score_and_pick`` = ``pick(score(...))``: same replica, same random draws, same
    scratch, on cost lists with exact ties, ties within EPSILON and ties on its edge."""
    replicas = [snap(f"r{i}") for i in range(len(costs))]
    req = RoutingRequest(request_id="q", adapter="a", prompt_tokens=10, max_tokens=10)
    fused, plain = _GivenCosts(costs), _GivenCosts(costs)
    fused_picker = ExpectedTTFTPicker(fused, tie_break)
    plain_picker = ExpectedTTFTPicker(plain, tie_break)
    assert fused_picker.fuses_with(fused) and not fused_picker.fuses_with(plain)
    for seed in range(20):  # the random tie-break draws differ by seed
        fused_ctx = RoutingContext(now_s=1.0, rng=random.Random(seed))
        plain_ctx = RoutingContext(now_s=1.0, rng=random.Random(seed))
        try:
            want = plain_picker.pick(plain_ctx, plain.score(plain_ctx, req, replicas))
        except ValueError:  # no maximum (all inf): both fail alike
            with pytest.raises(ValueError):
                fused_picker.score_and_pick(fused_ctx, req, replicas)
            continue
        assert fused_picker.score_and_pick(fused_ctx, req, replicas) == want
        assert fused_ctx.rng.getstate() == plain_ctx.rng.getstate()
        assert fused_ctx.scratch == plain_ctx.scratch


def test_only_the_plain_loragate_profile_is_fused(snap: Callable[..., ReplicaSnapshot]) -> None:
    """The built-in ``loragate`` profile and an equal composition take the fused path; other
    compositions with the ``expected_ttft`` scorer score and pick as before, and a
    composition of it with ``max_score`` picks what the fused profile picks, with a prefill
    term, so the prefill backlog counts (the profile tells the scorer each choice, whatever the
    picker)."""
    model = _PrefillModel()
    fused = build_policy("loragate", seed=4, step_time_model=model)
    assert fused._fused is not None
    composed = build_policy(
        {"scorers": ["expected_ttft"], "picker": {"name": "max_score"}},
        seed=4,
        step_time_model=model,
    )
    weighted = build_policy(
        {"scorers": [{"name": "expected_ttft", "weight": 2.0}, {"name": "queue", "weight": 0.1}]},
        seed=4,
        step_time_model=model,
    )
    assert composed._fused is None and weighted._fused is None
    rng = random.Random(9)
    settings = [rng.choice(SETTINGS[:2]) for _ in range(5)]
    replicas = [_random_snapshot(rng, f"r{i}", settings[i]) for i in range(5)]
    picks = []
    for i in range(400):
        j = rng.randrange(len(replicas))
        replicas[j] = _random_snapshot(rng, f"r{j}", settings[j])
        if not any(r.healthy for r in replicas):
            continue
        req = _random_request(rng, i)
        now = i * 0.01
        picked = fused.choose(req, replicas, fused.context(now))
        assert picked == composed.choose(req, replicas, composed.context(now))
        picks.append(weighted.choose(req, replicas, weighted.context(now)))
    assert len(set(picks)) > 1


def test_residency_tiers_are_seen_when_they_change(snap: Callable[..., ReplicaSnapshot]) -> None:
    """The tiers' sets are kept while the same tuples come back; new tuples (a new
    ``Residency``, or one set in place on the snapshot) are looked at afresh."""
    fast = ExpectedTTFTScorer(LinearStepTimeModel(), CostParams(length_ewma_alpha=0.0))
    slow = _TermByTermScorer(LinearStepTimeModel(), CostParams(length_ewma_alpha=0.0))
    req = RoutingRequest(request_id="q", adapter="a", prompt_tokens=100, max_tokens=100)
    reps = [snap("r0", in_flight=5, per_adapter={"b": 5}, cpu=["a", "b"], gpu=["b"])]
    costs = [fast.costs(req, reps)[0] for _ in range(3)]  # first sight, second, from sets
    assert costs[0] == costs[1] == costs[2]
    _assert_same_costs(costs[:1], slow.costs(req, reps))
    for gpu, cpu, registered in [
        (("a",), ("b", "a"), {"a", "b"}),  # loaded into a GPU slot
        ((), ("b",), {"a", "b"}),  # evicted from both tiers, still registered
        ((), (), {"b"}),  # unregistered
        (("a",), ("a",), {"a"}),
    ]:
        res = Residency(registered=frozenset(registered), gpu=gpu, cpu=cpu)
        object.__setattr__(reps[0], "residency", res)
        for _ in range(3):
            _assert_same_costs(fast.costs(req, reps), slow.costs(req, reps))


def test_memoised_parts_are_shared_only_where_they_agree(
    snap: Callable[..., ReplicaSnapshot],
) -> None:
    """Replicas with the same (n_eff, adapters, max_loras, max_num_seqs) share the memoised
    parts of their terms; what else differs (KV memory binding or not, the requests behind
    n_eff, the token budget) still gives each its own cost."""
    fast = ExpectedTTFTScorer(LinearStepTimeModel(), CostParams(length_ewma_alpha=0.0))
    slow = _TermByTermScorer(LinearStepTimeModel(), CostParams(length_ewma_alpha=0.0))
    per_adapter = {"b": 20, "c": 20, "d": 20}
    same = {"max_loras": 4, "max_num_seqs": 64, "per_adapter": per_adapter}
    reps = [
        snap("r0", in_flight=60, running=60, kv=0.2, **same),  # KV memory leaves all 64
        snap("r1", in_flight=60, running=60, kv=0.9, **same),  # KV memory binds (63.3)
        snap("r2", in_flight=60, running=60, kv=0.99, **same),  # KV memory full
        snap("r3", in_flight=70, running=60, waiting=10, deferred=10, **same),  # n 70, n_eff 60
        snap("r4", in_flight=61, running=61, deferred=1, **same),
    ]
    object.__setattr__(
        reps[4],
        "settings",
        ReplicaSettings(max_loras=4, max_num_seqs=64, max_num_batched_tokens=100),
    )
    for adapter in ("a", "b", None):
        req = RoutingRequest(request_id="q", adapter=adapter, prompt_tokens=500, max_tokens=50)
        for _ in range(2):  # computed, then from the kept terms
            costs = fast.costs(req, reps)
            _assert_same_costs(costs, slow.costs(req, reps))
        if adapter == "a":  # a new adapter: every difference above shows
            assert len(set(costs)) == len(costs), costs
