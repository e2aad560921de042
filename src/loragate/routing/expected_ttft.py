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
Per decision the work is O(replicas): a handful of arithmetic per replica and memoised step
times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loragate.core.types import ReplicaId, ReplicaSnapshot, RoutingRequest
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


class ExpectedTTFTScorer:
    """Scores replicas by the expected time to first token of the request (see module doc)."""

    bounded_scores = True

    __slots__ = ("_backlog", "_mean_out", "_mean_prompt", "_memo", "_ptok", "model", "p")

    def __init__(self, model: StepTimeModel, params: CostParams | None = None) -> None:
        self.model = model
        self.p = params if params is not None else CostParams()
        self._mean_out = self.p.mean_output_tokens
        self._mean_prompt = self.p.mean_prompt_tokens
        self._memo: dict[tuple[int, int], float] = {}
        self._ptok = prefill_token_s(model)
        # replica -> (seconds of prefill work routed there not yet done, as of time t)
        self._backlog: dict[ReplicaId, tuple[float, float]] = {}

    def _observe(self, req: RoutingRequest) -> None:
        alpha = self.p.length_ewma_alpha
        if alpha > 0.0:
            if req.max_tokens > 0:
                self._mean_out += alpha * (req.max_tokens - self._mean_out)
            if req.prompt_tokens > 0:
                self._mean_prompt += alpha * (req.prompt_tokens - self._mean_prompt)

    def costs(
        self, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot], now_s: float = 0.0
    ) -> list[float]:
        """Expected seconds to first token on each replica (same order), without learning."""
        p = self.p
        adapter = req.adapter
        mean_out = self._mean_out
        mean_prompt = self._mean_prompt
        prompt = req.prompt_tokens if req.prompt_tokens > 0 else mean_prompt
        own_out = float(req.max_tokens) if p.own_length and req.max_tokens > 0 else mean_out
        rank = req.adapter_rank if req.adapter_rank is not None else p.default_rank
        load_cpu = load_disk = 0.0
        if adapter is not None:
            load_cpu = _sane(self.model.load_s(rank, False))
            load_disk = _sane(self.model.load_s(rank, True))
        hold_factor, kv_full, rho_max = p.hold_factor, p.kv_full, p.rho_max
        congestion_w, slot_w, register_s = p.congestion_weight, p.new_slot_weight, p.register_s
        stall_w = p.load_stall_weight
        miss_gpu, miss_disk = p.gpu_miss_s, p.gpu_miss_s + p.cpu_miss_s
        memo = self._memo
        step_time = self.model.step_time_s
        ptok = self._ptok
        backlog = self._backlog if p.prefill_memory else {}
        sqrt = math.sqrt
        out: list[float] = []
        for r in replicas:
            st = r.settings
            slots = st.max_loras if st.max_loras > 0 else 1
            seqs = st.max_num_seqs if st.max_num_seqs > 0 else 1
            n = r.num_running + r.num_waiting
            if r.in_flight > n:
                n = r.in_flight
            deferred = r.num_deferred
            n_eff = n - deferred if n > deferred else 0
            batch = n_eff if n_eff < seqs else seqs
            # LoRA slots: which adapters are in flight, is ``adapter`` one of them, running?
            aif = r.adapter_in_flight
            if aif:
                d = len(aif)
                deferred_ahead = d - slots if d > slots else 0
                in_flight_here = adapter is not None and adapter in aif
                running = in_flight_here and (d <= slots or adapter in r.active_adapters)
            else:
                d = len(r.active_adapters)
                deferred_ahead = deferred
                running = in_flight_here = adapter is not None and adapter in r.active_adapters
            new_slot = adapter is not None and not in_flight_here
            distinct = d + 1 if new_slot else d
            key = (batch + 1, distinct if distinct < slots else slots)
            t_step = memo.get(key)
            if t_step is None:
                if len(memo) >= MAX_MEMO:
                    memo.clear()
                t_step = memo[key] = _sane(step_time(*key))
            t_seq = mean_out * t_step
            # Prefill of the capacity-waiting requests ahead plus ours, then the first token.
            waiting_ahead = r.num_waiting - deferred
            budget = st.max_num_batched_tokens - batch
            if budget < 1:
                budget = 1
            ahead_tokens = waiting_ahead * mean_prompt if waiting_ahead > 0 else 0.0
            cost = (1.0 + (ahead_tokens + prompt) // budget) * t_step
            if ptok > 0.0:
                ahead_s = ahead_tokens * ptok
                routed = backlog.get(r.replica_id)
                if routed is not None:
                    elapsed = now_s - routed[1]
                    left = routed[0] - elapsed if elapsed > 0.0 else routed[0]
                    if left > ahead_s:
                        ahead_s = left
                cost += ahead_s + prompt * ptok
            # Sequence slots (max_num_seqs, or KV memory if that runs out first).
            cap = float(seqs)
            kv = r.kv_usage
            if kv >= kv_full:
                if n_eff < cap:
                    cap = float(n_eff)
            elif kv > 0.0 and n_eff > 0:
                kv_cap = n_eff * kv_full / kv
                if kv_cap < cap:
                    cap = kv_cap
            if cap < 1.0:
                cap = 1.0
            excess = n_eff + 1 - cap
            if excess > 0.0:
                cost += excess * t_seq / (batch if batch > 0 else 1)
            if congestion_w > 0.0:
                rho = (n_eff + 1) / cap
                if rho > rho_max:
                    rho = rho_max
                cost += congestion_w * t_seq * rho ** sqrt(2.0 * (cap + 1.0)) / (cap * (1.0 - rho))
            if adapter is None:
                out.append(cost)
                continue
            t_hold = hold_factor * t_seq
            if not running:
                # LoRA slot wait.
                if in_flight_here:
                    cost += (deferred_ahead + 1) * 0.5 * t_hold / slots
                elif d >= slots or deferred_ahead > 0:
                    cost += (deferred_ahead + 1) * t_hold / slots
                # Adapter load.
                res = r.residency
                # The load stalls the batch: this request and those whose first token it delays.
                if d >= slots:
                    stall = 1.0 + stall_w * n
                else:
                    occupancy = d / slots
                    stall = 1.0 + stall_w * (
                        r.num_waiting + (n - r.num_waiting) * occupancy * occupancy
                    )
                if adapter not in res.registered:  # the GPU and CPU tiers are within it
                    cost += load_disk * stall + register_s + miss_disk
                elif adapter not in res.gpu:
                    if adapter in res.cpu:
                        cost += load_cpu * stall + miss_gpu
                    else:
                        cost += load_disk * stall + miss_disk
            # The slot this request would take from the requests after it.
            if new_slot:
                occupancy = (d + 1) / slots
                if occupancy > 1.0:
                    occupancy = 1.0
                cost += slot_w * own_out * t_step * hold_factor / slots * occupancy * occupancy
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
