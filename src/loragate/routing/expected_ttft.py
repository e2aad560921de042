"""loragate's own policy: route to the replica with the lowest expected time to first token.

Cost model (seconds, per candidate replica ``r``, for a request of adapter ``a``)::

    cost = t_first + wait_seq + congestion + wait_slot + t_load + miss_penalty + slot_penalty

with, from the snapshot of ``r`` and a ``StepTimeModel`` (the twin's profile, or the linear
default of ``step_time.LinearStepTimeModel``):

* ``n``  requests in the replica: ``max(in_flight, num_running + num_waiting)``; ``n_eff =
  n - num_deferred`` of them hold a sequence slot; ``B = min(n_eff, max_num_seqs)`` run.
* ``D``  adapters with requests in flight there (``adapter_in_flight`` keys — fresh gateway
  bookkeeping — else the metrics' ``active_adapters``), ``d = |D|``; ``L = max_loras``.
  Deferred adapters ahead: ``k = max(d - L, 0)`` (or ``num_deferred`` without per-adapter
  counts).
* ``t_step = step_time_s(B + 1, min(d + new, L))``, ``new`` = 1 if ``a`` would take a new slot.
  ``T_seq = E[out] * t_step`` is how long a request holds a sequence slot; ``T_hold =
  hold_factor * T_seq`` how long an adapter holds a LoRA slot. ``E[out]`` and ``E[prompt]`` are
  running means (EWMA) of the requests' ``max_tokens`` / ``prompt_tokens`` seen by the policy.

Terms:

* ``t_first``: the prefill of the waiting requests ahead (``num_waiting - num_deferred``, each
  ``E[prompt]`` tokens) and of this prompt, under the step token budget left by the running
  decodes (``max_num_batched_tokens - B``), in steps of ``t_step``; at least one step. Plus,
  when the model has ``prefill_token_s()`` (the twin's profiles: ~70 µs a token for Llama-8B
  with LoRA on an H100, so a 2048-token chunk makes a step ~10x a decode step), the prompt
  tokens' own time: this prompt's, and the larger of the waiting prompts' and the *prefill
  backlog* this policy itself sent there (with ``prefill_memory``: every routed prompt's
  prefill seconds, drained at one second per second of ``ctx.now_s``). The backlog sees the
  prompts the engine metrics cannot: those just routed, and the one being prefilled in chunks
  (it counts as running). The ``loragate`` profile's picker (``ExpectedTTFTPicker``) reports
  each choice back to the scorer for this.
* ``wait_seq``: if the replica is full (``n_eff + 1 > S_eff``, where ``S_eff`` is
  ``max_num_seqs`` or lower when KV usage says memory runs out first), the excess must wait
  for completions, which come at rate ``B / T_seq``: work ahead / service rate.
* ``congestion``: the mean wait of an M/M/c queue at utilisation ``rho = (n_eff + 1) / S_eff``
  (capped at ``rho_max``) with ``c = S_eff`` servers of service time ``T_seq``, in Sakasegawa's
  approximation ``T_seq * rho^(sqrt(2(c+1))) / (c (1 - rho))`` (Sakasegawa 1977; Hopp &
  Spearman, *Factory Physics*). FCFS means later arrivals do not delay this request, so this
  is the price of pushing a replica towards saturation for the requests after it: near zero at
  moderate load, steep close to the limit, so a replica is relieved before it really queues.
* ``wait_slot`` (LoRA slot pressure, vLLM defers a request whose adapter would exceed
  ``max_loras`` distinct adapters in the batch): 0 if ``a`` runs there; if ``a`` is itself
  deferred there, half the deferred queue; otherwise 0 with a free slot, else ``(k + 1)``
  slot turnovers, which come at rate ``L / T_hold``: ``(k + 1) * T_hold / L``.
* ``t_load``: 0 if ``a`` is in a GPU slot or running; else ``load_s(rank, from_disk) * (1 +
  load_stall_weight * m)`` with ``from_disk`` unless ``a`` is in the CPU cache, plus
  ``register_s`` (our admin load call) if it is not registered there (the GPU and CPU tiers are
  taken to be subsets of the registered set, as ``state.residency`` maintains them). vLLM loads
  an adapter inside an engine step, so the load stalls the whole batch, and ``m`` counts the
  requests whose first token it delays: the waiting ones, plus the running ones when their slot
  releases are what deferred requests wait for -- all ``n`` when the slots are full (``d >=
  L``), else the running ones weighted by ``min(1, d / L)^2`` (the chance that the slots fill
  up, as in ``slot_penalty``). A disk load (~70-120 ms for Llama-8B on an H100) on a
  slot-bound replica holding 60 requests thus costs ~6 request-seconds: these stalls lengthen
  every slot's hold and every deferred request's wait (in our 4-replica twin runs at 21 req/s:
  TTFT p99 -9%, disk loads -26% against charging the load to this request alone, with no
  change at 7.4 req/s). On a nearly idle replica it is just this request's load time.
* ``miss_penalty``: ``gpu_miss_s`` when ``a`` is not in a GPU slot there, plus ``cpu_miss_s``
  when it is not in the CPU cache either (and not running). Not part of this request's TTFT:
  the price of the eviction it causes (another adapter's later reload) and of scattering an
  adapter's residency. It makes idle adapters return to the replica that still holds them,
  cutting adapter loads (in our 4-replica twin runs: ~45% fewer than ``round_robin``, and a
  lower TTFT p99 than without it), while seconds of slot wait still outweigh it.
* ``slot_penalty``: taking a new LoRA slot is not free for the *next* requests — it holds the
  slot for ``T_hold`` while other adapters may need it. Charged as ``new_slot_weight * T_hold /
  L * min(1, (d + 1) / L)^2`` (with ``own_length``, ``T_hold`` uses this request's
  ``max_tokens`` instead of the mean): cheap on an empty replica, dear on one whose slots are nearly
  full (the chance that a later adapter finds no free slot grows with the occupancy).
  This is what keeps an adapter's traffic concentrated on the replicas already running it while
  they have headroom; when ``wait_seq + congestion`` there grows beyond the penalty (one replica
  cannot keep up), the adapter spreads to the next cheapest replica.

Base-model requests need no slot: no ``wait_slot``, ``t_load``, ``miss_penalty`` or
``slot_penalty``.

The scorer turns costs into scores ``(c_min + tau) / (c + tau)`` (the cheapest replica 1.0, one
twice as slow ~0.5), and the ``loragate`` profile picks the maximum (random among ties).
Cost of a decision (issue 4 item 9: at most 50 µs p50 with 16 replicas): the terms that do not
depend on the request are linear in the running means, so per replica the scorer keeps them as
coefficients (``ReplicaTerms``) for the three situations an adapter can be in there (running,
in flight but deferred, needing a new slot), and recomputes them only when the replica's state
(its metrics, in-flight counts and settings) differs from the previous decision's. A decision
then costs a few lookups and a handful of arithmetic per replica. The coefficients sum the same
terms in another order than the formulas above: costs agree with the term-by-term evaluation to
within a few units in the last place (``tests/routing/test_routing_cost_equivalence.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import sqrt

from loragate.core.types import ReplicaId, ReplicaSettings, ReplicaSnapshot, RoutingRequest
from loragate.routing.framework import RoutingContext
from loragate.routing.pickers import MaxScorePicker, TieBreak
from loragate.routing.step_time import StepTimeModel, prefill_token_s

SCORE_TAU_S = 0.001
# Any single time from the step-time model is clipped to this (keeps costs finite).
MAX_TIME_S = 1.0e6
# Bound on memoised (batch, adapters) step times; cleared when exceeded.
MAX_MEMO = 65_536


@dataclass(frozen=True, slots=True, kw_only=True)
class CostParams:
    """Tunables of the cost model (config: the ``loragate`` policy's parameters)."""

    default_rank: int = 16
    mean_output_tokens: float = 256.0
    mean_prompt_tokens: float = 512.0
    # Weight of each new observation in the running means; 0 keeps the initial values.
    length_ewma_alpha: float = 0.02
    hold_factor: float = 1.0
    new_slot_weight: float = 0.5
    congestion_weight: float = 1.0
    # Utilisation at which the congestion term stops growing (the backlog term takes over).
    rho_max: float = 0.95
    register_s: float = 0.005
    own_length: bool = False
    # Requests delayed by an adapter load, per request in the replica (the load stalls the
    # engine's whole batch); 0 charges the load to this request only.
    load_stall_weight: float = 1.0
    gpu_miss_s: float = 0.2
    cpu_miss_s: float = 0.5
    kv_full: float = 0.95
    # Remember the prefill work this policy sent to each replica (drained in real time).
    prefill_memory: bool = True


def _sane(seconds: float) -> float:
    """A model's time clipped to [0, MAX_TIME_S] (NaN -> 0), so scores stay in [0, 1]."""
    if not seconds >= 0.0:
        return 0.0
    return seconds if seconds < MAX_TIME_S else MAX_TIME_S


# What of a replica's snapshot its request-independent cost terms depend on:
#   (n = max(in_flight, num_running + num_waiting), len(adapter_in_flight), num_waiting,
#    num_deferred, kv_usage, len(active_adapters), settings)
# and those terms, computed from it alone (``ExpectedTTFTScorer._new_terms``; plain tuples, as
# cheap to build, compare and unpack as it gets):
#   (state, t_step, t_step_new, waiting_ahead, budget,
#    per_out_running, per_out_queued, per_out_new, slot_penalty, stall, slot_free)
# ``t_step`` is the step time with the adapters in flight there, ``t_step_new`` with one more (a
# new LoRA slot). ``waiting_ahead`` (>= 0) requests wait for a sequence slot, ``budget`` is the
# step's token budget left for their prefill. For a request of running-mean output length ``m``
# tokens, ``wait_seq + congestion + wait_slot`` is ``m * per_out_running`` where its adapter
# runs (and for base-model requests), ``m * per_out_queued`` where the adapter is in flight but
# deferred, ``m * per_out_new`` where it needs a new LoRA slot; ``slot_penalty`` is the new-slot
# penalty per output token. ``stall`` is 1 + the requests an adapter load delays there,
# ``slot_free`` whether at most ``max_loras`` adapters are in flight (then all of them run).
ReplicaState = tuple[int, int, int, int, float, int, ReplicaSettings]
ReplicaTerms = tuple[ReplicaState, float, float, int, int, float, float, float, float, float, bool]


class ExpectedTTFTScorer:
    """Scores replicas by the expected time to first token of the request (see module doc)."""

    bounded_scores = True

    __slots__ = (
        "_backlog",
        "_mean_out",
        "_mean_prompt",
        "_memo",
        "_ptok",
        "_terms",
        "model",
        "p",
    )

    def __init__(self, model: StepTimeModel, params: CostParams | None = None) -> None:
        self.model = model
        self.p = params if params is not None else CostParams()
        self._mean_out = self.p.mean_output_tokens
        self._mean_prompt = self.p.mean_prompt_tokens
        self._memo: dict[tuple[int, int], float] = {}
        self._ptok = prefill_token_s(model)
        # replica -> (seconds of prefill work routed there not yet done, as of time t)
        self._backlog: dict[ReplicaId, tuple[float, float]] = {}
        # replica -> its ReplicaTerms as of the last decision that saw it
        self._terms: dict[ReplicaId, ReplicaTerms] = {}

    def _observe(self, req: RoutingRequest) -> None:
        alpha = self.p.length_ewma_alpha
        if alpha > 0.0:
            if req.max_tokens > 0:
                self._mean_out += alpha * (req.max_tokens - self._mean_out)
            if req.prompt_tokens > 0:
                self._mean_prompt += alpha * (req.prompt_tokens - self._mean_prompt)

    def _step_time(self, key: tuple[int, int]) -> float:
        """The model's step time for (batch, distinct adapters), memoised."""
        memo = self._memo
        t = memo.get(key)
        if t is None:
            if len(memo) >= MAX_MEMO:
                memo.clear()
            t = memo[key] = _sane(self.model.step_time_s(*key))
        return t

    def _new_terms(self, rid: ReplicaId, state: ReplicaState) -> ReplicaTerms:
        """The terms of a replica in ``state`` (a function of it alone), kept for next time."""
        n, n_aif, waiting, deferred, kv, n_active, st = state
        p = self.p
        slots = st.max_loras if st.max_loras > 0 else 1
        seqs = st.max_num_seqs if st.max_num_seqs > 0 else 1
        n_eff = n - deferred if n > deferred else 0
        batch = n_eff if n_eff < seqs else seqs
        # LoRA slots: ``d`` adapters in flight, ``deferred_ahead`` of them waiting for a slot.
        if n_aif:
            d = n_aif
            deferred_ahead = d - slots if d > slots else 0
        else:
            d = n_active
            deferred_ahead = deferred
        t_step = self._step_time((batch + 1, d if d < slots else slots))
        # Sequence slots (max_num_seqs, or KV memory if that runs out first).
        cap = float(seqs)
        if kv >= p.kv_full:
            if n_eff < cap:
                cap = float(n_eff)
        elif kv > 0.0 and n_eff > 0:
            kv_cap = n_eff * p.kv_full / kv
            if kv_cap < cap:
                cap = kv_cap
        if cap < 1.0:
            cap = 1.0
        # wait_seq + congestion per second that a request holds a sequence slot (T_seq).
        per_t_seq = 0.0
        excess = n_eff + 1 - cap
        if excess > 0.0:
            per_t_seq = excess / (batch if batch > 0 else 1)
        if p.congestion_weight > 0.0:
            rho = (n_eff + 1) / cap
            if rho > p.rho_max:
                rho = p.rho_max
            per_t_seq += p.congestion_weight * rho ** sqrt(2.0 * (cap + 1.0)) / (cap * (1.0 - rho))
        # wait_slot per second of T_seq: (deferred_ahead + 1) slot turnovers of T_hold / L.
        hold = p.hold_factor
        slot_wait = (deferred_ahead + 1) * hold / slots
        if d >= slots:  # every LoRA slot taken: a new adapter waits, its load stalls all
            t_step_new = t_step
            new_wait = slot_wait
            stall = 1.0 + p.load_stall_weight * n
            slot_penalty = p.new_slot_weight * t_step * hold / slots
        else:
            t_step_new = self._step_time((batch + 1, d + 1))
            new_wait = slot_wait if deferred_ahead > 0 else 0.0
            occupancy = d / slots
            stall = 1.0 + p.load_stall_weight * (waiting + (n - waiting) * occupancy * occupancy)
            occupancy = (d + 1) / slots
            slot_penalty = p.new_slot_weight * t_step_new * hold / slots * occupancy * occupancy
        waiting_ahead = waiting - deferred
        budget = st.max_num_batched_tokens - batch
        terms = (
            state,
            t_step,
            t_step_new,
            waiting_ahead if waiting_ahead > 0 else 0,
            budget if budget > 1 else 1,
            t_step * per_t_seq,
            t_step * (per_t_seq + 0.5 * slot_wait),
            t_step_new * (per_t_seq + new_wait),
            slot_penalty,
            stall,
            d <= slots,
        )
        cache = self._terms
        if len(cache) >= MAX_MEMO and rid not in cache:
            cache.clear()
        cache[rid] = terms
        return terms

    def costs(
        self, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot], now_s: float = 0.0
    ) -> list[float]:
        """Expected seconds to first token on each replica (same order), without learning."""
        p = self.p
        adapter = req.adapter
        mean_out = self._mean_out
        mean_prompt = self._mean_prompt
        prompt = float(req.prompt_tokens) if req.prompt_tokens > 0 else mean_prompt
        own_out = float(req.max_tokens) if p.own_length and req.max_tokens > 0 else mean_out
        load_cpu = load_disk = 0.0
        if adapter is not None:
            rank = req.adapter_rank if req.adapter_rank is not None else p.default_rank
            load_cpu = _sane(self.model.load_s(rank, False))
            load_disk = _sane(self.model.load_s(rank, True))
        miss_cpu = p.gpu_miss_s
        miss_disk = p.gpu_miss_s + p.cpu_miss_s
        miss_unregistered = p.register_s + miss_disk
        ptok = self._ptok
        backlog = self._backlog if p.prefill_memory and ptok > 0.0 else None
        cached = self._terms
        out: list[float] = []
        for r in replicas:
            aif = r.adapter_in_flight
            n_aif = len(aif)
            # What of the snapshot its terms depend on (requests there, ``n``, rather than
            # in_flight: a request more or less that the engine's counts already cover changes
            # nothing). Values, not the snapshot's identity: the gateway updates ``in_flight``
            # of its snapshots in place, ``adapter_in_flight`` is a live view, and the simulator
            # makes new snapshots with the same values.
            waiting = r.num_waiting
            n = r.num_running + waiting
            in_flight = r.in_flight
            state = (
                in_flight if in_flight > n else n,
                n_aif,
                waiting,
                r.num_deferred,
                r.kv_usage,
                len(r.active_adapters),
                r.settings,
            )
            t = cached.get(r.replica_id)
            if t is None or t[0] != state:
                t = self._new_terms(r.replica_id, state)
            (
                _,
                t_step,
                t_step_new,
                waiting_ahead,
                budget,
                per_out_running,
                per_out_queued,
                per_out_new,
                slot_penalty,
                stall,
                slot_free,
            ) = t
            # Where the adapter stands there: running, in flight but deferred, or new.
            if adapter is None:
                running, new = True, False
            elif n_aif:
                running = adapter in aif
                new = not running
                if running and not slot_free:
                    running = adapter in r.active_adapters
            else:
                running = adapter in r.active_adapters
                new = not running
            if new:
                t_step = t_step_new
            # Prefill of the requests waiting ahead plus ours, then the first token.
            ahead_tokens = waiting_ahead * mean_prompt
            cost = (1.0 + (ahead_tokens + prompt) // budget) * t_step
            if ptok > 0.0:
                ahead_s = ahead_tokens * ptok
                if backlog:
                    routed = backlog.get(r.replica_id)
                    if routed is not None:
                        elapsed = now_s - routed[1]
                        left = routed[0] - elapsed if elapsed > 0.0 else routed[0]
                        if left > ahead_s:
                            ahead_s = left
                cost += ahead_s + prompt * ptok
            if running:
                out.append(cost + mean_out * per_out_running)
                continue
            if new:
                cost += mean_out * per_out_new + own_out * slot_penalty
            else:
                cost += mean_out * per_out_queued
            # Adapter load (the GPU and CPU tiers are within the registered set).
            res = r.residency
            if adapter not in res.registered:
                cost += load_disk * stall + miss_unregistered
            elif adapter not in res.gpu:
                if adapter in res.cpu:
                    cost += load_cpu * stall + miss_cpu
                else:
                    cost += load_disk * stall + miss_disk
            out.append(cost)
        return out

    def score(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Mapping[ReplicaId, float]:
        costs = self.costs(req, replicas, ctx.now_s)
        self._observe(req)
        ctx.scratch["expected_ttft_s"] = costs
        if self._ptok > 0.0 and self.p.prefill_memory:
            prompt = req.prompt_tokens if req.prompt_tokens > 0 else self._mean_prompt
            ctx.scratch["prefill_s"] = prompt * self._ptok
        best = min(costs) + SCORE_TAU_S
        return {
            r.replica_id: best / (c + SCORE_TAU_S) for r, c in zip(replicas, costs, strict=True)
        }

    def chosen(self, ctx: RoutingContext, replica_id: ReplicaId) -> None:
        """The request just scored goes to ``replica_id``: add its prefill to that backlog."""
        work = ctx.scratch.get("prefill_s")
        if not isinstance(work, float):
            return
        now = ctx.now_s
        prev = self._backlog.get(replica_id)
        left = 0.0
        if prev is not None:
            elapsed = now - prev[1]
            left = prev[0] - elapsed if elapsed > 0.0 else prev[0]
        if len(self._backlog) >= MAX_MEMO and prev is None:
            self._backlog.clear()
        self._backlog[replica_id] = ((left if left > 0.0 else 0.0) + work, now)


class ExpectedTTFTPicker(MaxScorePicker):
    """``MaxScorePicker`` that tells the scorer where its request went (prefill backlog)."""

    __slots__ = ("scorer",)

    def __init__(self, scorer: ExpectedTTFTScorer, tie_break: TieBreak = "random") -> None:
        super().__init__(tie_break)
        self.scorer = scorer

    def pick(self, ctx: RoutingContext, scored: Mapping[ReplicaId, float]) -> ReplicaId:
        rid = super().pick(ctx, scored)
        self.scorer.chosen(ctx, rid)
        return rid
