"""Whole-deployment simulation in virtual time: N twin engines behind the gateway's routing.

At each arrival of the workload stream, every engine is advanced to the arrival time
(``Engine.run_until``), the gateway's view of each replica is assembled as a
``ReplicaSnapshot`` — engine-side fields from the engine's observable state (what /metrics
shows: running, waiting, deferred, KV usage, adapters with requests in flight), gateway-side
fields from the simulated gateway's own bookkeeping (in-flight counts per replica and adapter,
and a *shadow* residency advanced by its routing decisions with ``loragate.state.residency``,
not the engine's internal truth) — then the routing policy chooses, and the request is added to
that engine. Everything is single-threaded and seeded, so a run is deterministic for a seed.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from loragate import __version__
from loragate.core.errors import ConfigError, InvalidRequestError, NoReplicaAvailableError
from loragate.core.types import (
    VLLM_LORA_RANKS,
    ReplicaSettings,
    ReplicaSnapshot,
    Residency,
    RoutingRequest,
    max_lora_rank_problem,
)
from loragate.routing import RoutingProfile, build_policy
from loragate.routing.resolved import resolved_routing, routing_sha256
from loragate.simulate.config import KvCapacityError, SimulationConfig
from loragate.simulate.records import (
    CONTEXT_LENGTH,
    INVALID_REQUEST,
    NO_REPLICA,
    SimRecord,
    Status,
)
from loragate.simulate.step_time import ProfileStepTime
from loragate.simulate.summary import SummaryBuilder
from loragate.state.residency import touch
from loragate.twin.engine import (
    Engine,
    EngineConfig,
    EngineRequest,
    EngineStartupError,
    RequestRecord,
)
from loragate.twin.profile import PerformanceProfile, load_profile
from loragate.workload import Workload, WorkloadRequest

RecordSink = Callable[[SimRecord], None]

# summary.json's layout (simulate/outputs.py documents it); raised when a field changes meaning
# or goes away, not when one is added.
SUMMARY_SCHEMA_VERSION = 1


@dataclass(slots=True)
class _EngineView:
    """The engine-side part of a snapshot, as of the last scrape."""

    num_running: int = 0
    num_waiting: int = 0
    num_deferred: int = 0
    kv_usage: float = 0.0
    active: frozenset[str] = frozenset()
    scraped_at_s: float = 0.0


@dataclass(slots=True)
class _Replica:
    replica_id: str
    engine: Engine
    settings: ReplicaSettings
    residency: Residency
    in_flight: int = 0
    adapter_in_flight: dict[str, int] = field(default_factory=dict)
    pending: dict[str, WorkloadRequest] = field(default_factory=dict)
    view: _EngineView = field(default_factory=_EngineView)
    # Finished in a step that started before the current time but ends after it: the gateway
    # sees these completions only once virtual time reaches their finish.
    ahead: deque[RequestRecord] = field(default_factory=deque)
    scrape_key: tuple[int, int] = (-1, -1)

    def advance(self, t_s: float) -> list[RequestRecord]:
        """Run the engine to ``t_s``; the requests whose completion the gateway has seen."""
        done = self.engine.run_until(t_s)
        ahead = self.ahead
        if done:
            ahead.extend(done)
        out: list[RequestRecord] = []
        while ahead and ahead[0].finish_s <= t_s:
            out.append(ahead.popleft())
        return out

    def scrape(self, now_s: float) -> None:
        e = self.engine
        # The engine's state changes only by steps and by our own submissions (arrivals are
        # admitted inside a step): if neither happened, the last scrape still holds.
        key = (e.steps_total, len(self.pending))
        if key == self.scrape_key:
            self.view.scraped_at_s = now_s
            return
        self.scrape_key = key
        active = frozenset(e.running_adapters)
        self.view = _EngineView(
            num_running=e.num_running,
            num_waiting=e.num_waiting,
            num_deferred=e.num_deferred,
            kv_usage=e.kv_usage,
            active=active,
            scraped_at_s=now_s,
        )

    def snapshot(self) -> ReplicaSnapshot:
        v = self.view
        return ReplicaSnapshot(
            replica_id=self.replica_id,
            url=f"sim://{self.replica_id}",
            settings=self.settings,
            num_running=v.num_running,
            num_waiting=v.num_waiting,
            num_deferred=v.num_deferred,
            kv_usage=v.kv_usage,
            active_adapters=v.active,
            waiting_adapters=v.active,  # vLLM 0.32 repeats the running list there
            in_flight=self.in_flight,
            adapter_in_flight=MappingProxyType(self.adapter_in_flight),
            residency=self.residency,
            scraped_at_s=v.scraped_at_s,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationResult:
    summary: dict[str, Any]
    wall_s: float


def _max_lora_rank(given: int | None, workload: Workload) -> int:
    """``--max-lora-rank`` as vLLM accepts it; by default the smallest that fits every adapter
    (what an operator must set: vLLM refuses e.g. 48 for rank-48 adapters, 64 serves them)."""
    need = max([a.rank for a in workload.adapters] or [8])
    if given is None:
        fits = [r for r in VLLM_LORA_RANKS if r >= need]
        if not fits:
            raise ConfigError(
                f"the workload has rank-{need} adapters; vLLM's largest is {VLLM_LORA_RANKS[-1]}",
                key="max_lora_rank",
            )
        return fits[0]
    rank_problem = max_lora_rank_problem(given)
    if rank_problem is not None:
        raise ConfigError(rank_problem, key="max_lora_rank")
    if given < need:
        raise ConfigError(
            f"{given} is below the workload's largest adapter rank ({need})", key="max_lora_rank"
        )
    return given


def engine_config(config: SimulationConfig, max_lora_rank: int) -> EngineConfig:
    s = config.engine
    return EngineConfig(
        max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens,
        max_model_len=s.max_model_len,
        enable_lora=True,
        max_loras=s.max_loras,
        max_cpu_loras=s.max_cpu_loras,
        max_lora_rank=max_lora_rank,
        kv_capacity_tokens=s.kv_capacity_tokens,
    )


class Simulation:
    """One run; build, then call :meth:`run` once."""

    def __init__(
        self,
        workload: Workload,
        config: SimulationConfig,
        *,
        profile: PerformanceProfile | None = None,
        policy: RoutingProfile | None = None,
    ) -> None:
        config.check()
        self.workload = workload
        self.config = config
        self.profile = profile if profile is not None else load_profile(config.profile)
        rank = _max_lora_rank(config.engine.max_lora_rank, workload)
        self.max_lora_rank = rank
        self.seed = config.seed if config.seed is not None else workload.spec.seed
        self.policy = (
            policy
            if policy is not None
            else build_policy(
                config.policy,
                seed=self.seed,
                step_time_model=ProfileStepTime(self.profile, max_lora_rank=rank),
            )
        )
        ecfg = engine_config(config, rank)
        settings = ReplicaSettings(
            max_loras=ecfg.max_loras,
            max_cpu_loras=ecfg.max_cpu_loras,
            max_lora_rank=rank,
            max_num_seqs=ecfg.max_num_seqs,
            max_num_batched_tokens=ecfg.max_num_batched_tokens,
        )
        registered = (
            frozenset(a.name for a in workload.adapters)
            if config.preregister == "all"
            else frozenset()
        )
        self.replicas = [
            _Replica(
                replica_id=f"r{i}",
                engine=self._engine(ecfg),
                settings=settings,
                residency=Residency(registered=registered),
            )
            for i in range(config.replicas)
        ]
        self._by_id = {r.replica_id: r for r in self.replicas}

    def _engine(self, ecfg: EngineConfig) -> Engine:
        try:
            return Engine(ecfg, self.profile)
        except EngineStartupError as exc:
            if exc.key != "max_model_len":
                raise
            # vLLM's own words ("Try increasing `gpu_memory_utilization`") name no setting of
            # a simulation: say which of ours decided the KV cache's size.
            given = ecfg.kv_capacity_tokens
            cap = given
            if cap is None:
                cap = self.profile.specialize(
                    max_loras=ecfg.max_loras, max_lora_rank=ecfg.max_lora_rank
                ).kv_capacity_tokens(
                    max_loras=ecfg.max_loras,
                    max_lora_rank=ecfg.max_lora_rank,
                    lora_enabled=ecfg.enable_lora,
                )
            raise KvCapacityError(
                max_model_len=ecfg.max_model_len,
                kv_tokens=cap // ecfg.block_size * ecfg.block_size,
                given_tokens=given,
                profile=self.profile.name,
                max_loras=ecfg.max_loras,
                max_lora_rank=ecfg.max_lora_rank,
            ) from exc

    def run(self, on_record: RecordSink | None = None) -> SimulationResult:
        wall0 = time.perf_counter()
        spec = self.workload.spec
        cfg = self.config
        summary = SummaryBuilder(
            duration_s=spec.duration_s,
            ttft_slo_ms=cfg.ttft_slo_ms,
            starvation_wait_s=cfg.starvation_wait_s,
        )

        def emit(rec: SimRecord) -> None:
            summary.add(rec)
            if on_record is not None:
                on_record(rec)

        replicas = self.replicas
        policy = self.policy
        interval = cfg.scrape_interval_s
        next_scrape = 0.0 if interval > 0 else math.inf
        n = 0
        for req in self.workload.requests():
            t = req.t_s
            while next_scrape <= t:  # the metrics poller's ticks before this arrival
                for rep in replicas:
                    self._finish(rep, rep.advance(next_scrape), emit)
                    rep.scrape(next_scrape)
                next_scrape += interval
            for rep in replicas:
                done = rep.advance(t)
                if done:
                    self._finish(rep, done, emit)
                if interval == 0:
                    rep.scrape(t)
            request_id = f"q{n}"
            n += 1
            routing_req = RoutingRequest(
                request_id=request_id,
                adapter=req.adapter,
                prompt_tokens=req.prompt_tokens,
                max_tokens=req.max_tokens,
                adapter_rank=req.rank if req.adapter is not None else None,
            )
            try:
                chosen = policy.choose(
                    routing_req, [r.snapshot() for r in replicas], policy.context(now_s=t)
                )
            except NoReplicaAvailableError:
                emit(_unserved(request_id, req, None, "rejected", NO_REPLICA))
                continue
            rep = self._by_id[chosen]
            try:
                rep.engine.add_request(
                    EngineRequest(
                        request_id=request_id,
                        adapter=req.adapter,
                        adapter_rank=req.rank,
                        prompt_tokens=req.prompt_tokens,
                        max_tokens=req.max_tokens,
                        arrival_s=t,
                    )
                )
            except InvalidRequestError as exc:  # the replica answers 400
                emit(_unserved(request_id, req, chosen, "rejected", _rejection_reason(exc)))
                continue
            rep.in_flight += 1
            rep.pending[request_id] = req
            if req.adapter is not None:
                rep.adapter_in_flight[req.adapter] = rep.adapter_in_flight.get(req.adapter, 0) + 1
                rep.residency = touch(rep.residency, req.adapter, rep.settings)
        end = spec.duration_s + cfg.drain_s
        for rep in replicas:
            self._finish(rep, rep.advance(end), emit)
            rest = list(rep.ahead)  # completed at the end of a step that began before `end`
            rep.ahead.clear()
            self._finish(rep, rest, emit)
            for request_id, req in rep.pending.items():  # insertion order = arrival order
                emit(_unserved(request_id, req, rep.replica_id, "unfinished"))
        wall_s = time.perf_counter() - wall0
        result = {
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "loragate_version": __version__,
            **summary.build(
                replicas=self._replica_stats(),
                config=self._config_echo(),
                wall_s=wall_s,
                speedup=spec.duration_s / wall_s if wall_s > 0 else None,
            ),
        }
        return SimulationResult(summary=result, wall_s=wall_s)

    def _finish(self, rep: _Replica, done: list[RequestRecord], emit: RecordSink) -> None:
        for r in done:
            req = rep.pending.pop(r.request_id)
            rep.in_flight -= 1
            if r.adapter is not None:
                left = rep.adapter_in_flight[r.adapter] - 1
                if left:
                    rep.adapter_in_flight[r.adapter] = left
                else:
                    del rep.adapter_in_flight[r.adapter]
            emit(
                SimRecord(
                    request_id=r.request_id,
                    adapter=r.adapter,
                    rank=req.rank,
                    replica=rep.replica_id,
                    arrival_s=r.arrival_s,
                    first_token_s=r.first_token_s,
                    finish_s=r.finish_s,
                    prompt_tokens=r.prompt_tokens,
                    max_tokens=req.max_tokens,
                    output_tokens=r.output_tokens,
                    deferred_s=r.deferred_s,
                    preemptions=r.preemptions,
                    status="ok",
                )
            )

    def _replica_stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for rep in self.replicas:
            e = rep.engine
            out[rep.replica_id] = {
                "loads_from_disk": e.loads_from_disk,
                "loads_from_memory": e.loads_from_memory,
                "adapter_loads": e.loads_from_disk + e.loads_from_memory,
                "preemptions": e.num_preemptions_total,
                "gpu_adapters": list(e.gpu_adapters()),
                "shadow_gpu_adapters": list(rep.residency.gpu),
            }
        return out

    def _config_echo(self) -> dict[str, Any]:
        cfg = self.config
        section = cfg.policy if isinstance(cfg.policy, str) else dict(cfg.policy)
        return {
            "workload": self.workload.spec.name,
            "replicas": cfg.replicas,
            "profile": self.profile.name,
            "policy": self.policy.name,
            "routing": {
                "section": section,
                "sha256": routing_sha256(section),
                "parameters": resolved_routing(section),
            },
            "seed": self.seed,
            "engine": {
                **{
                    k: getattr(cfg.engine, k)
                    for k in (
                        "max_loras",
                        "max_cpu_loras",
                        "max_num_seqs",
                        "max_num_batched_tokens",
                        "max_model_len",
                    )
                },
                "max_lora_rank": self.max_lora_rank,
                "kv_capacity_tokens": self.replicas[0].engine.kv_capacity_tokens,
                "kv_capacity_from": "profile" if cfg.engine.kv_capacity_tokens is None else "given",
            },
            "scrape_interval_s": cfg.scrape_interval_s,
            "drain_s": cfg.drain_s,
            "ttft_slo_ms": cfg.ttft_slo_ms,
            "starvation_wait_s": cfg.starvation_wait_s,
            "adapters": len(self.workload.adapters),
            "offered_rate_rps": self.workload.offered_rate_rps,
        }


def _rejection_reason(exc: InvalidRequestError) -> str:
    # vLLM names the prompt ("messages") or max_tokens when a request is too long for the model.
    return CONTEXT_LENGTH if exc.param in ("messages", "prompt", "max_tokens") else INVALID_REQUEST


def _unserved(
    request_id: str, req: WorkloadRequest, replica: str | None, status: Status, reason: str = ""
) -> SimRecord:
    return SimRecord(
        request_id=request_id,
        adapter=req.adapter,
        rank=req.rank,
        replica=replica,
        arrival_s=req.t_s,
        first_token_s=math.nan,
        finish_s=math.nan,
        prompt_tokens=req.prompt_tokens,
        max_tokens=req.max_tokens,
        output_tokens=0,
        deferred_s=0.0,
        preemptions=0,
        status=status,
        reason=reason,
    )


def run_simulation(
    workload: Workload, config: SimulationConfig, on_record: RecordSink | None = None
) -> SimulationResult:
    """Build and run one simulation (see :class:`Simulation`)."""
    return Simulation(workload, config).run(on_record)
