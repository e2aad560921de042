"""Whole-deployment simulation: timing fidelity, routing, bookkeeping, summary, determinism."""

from __future__ import annotations

import math
from typing import Any

import pytest

from loragate.core.errors import ConfigError
from loragate.simulate import SimRecord, Simulation, SimulationConfig, run_simulation
from loragate.simulate.config import ReplicaEngineSettings
from loragate.simulate.runner import engine_config
from loragate.twin.engine import Engine, EngineRequest
from loragate.twin.profile import load_profile
from loragate.workload import Workload, spec_from_mapping


def _workload(
    *,
    count: int = 12,
    rate: float = 20.0,
    duration: float = 30.0,
    seed: int = 3,
    lengths: dict[str, Any] | None = None,
) -> Workload:
    return Workload(
        spec_from_mapping(
            {
                "duration_s": duration,
                "seed": seed,
                "adapters": {
                    "count": count,
                    "ranks": {8: 0.5, 16: 0.5},
                    "popularity": {"kind": "zipf", "s": 1.0},
                    "base_fraction": 0.1,
                },
                "arrivals": {"process": "gamma", "cv": 2.0, "rate_rps": rate},
                "lengths": lengths
                or {
                    "prompt": {"kind": "lognormal", "mean": 200, "sigma": 0.8, "max": 1500},
                    "output": {"kind": "lognormal", "mean": 60, "sigma": 0.8, "max": 500},
                },
            }
        )
    )


def _run(wl: Workload, **cfg: Any) -> tuple[dict[str, Any], list[SimRecord], Simulation]:
    records: list[SimRecord] = []
    sim = Simulation(wl, SimulationConfig(**cfg))
    result = sim.run(records.append)
    return result.summary, records, sim


def _strip(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("wall_s", "speedup")}


def test_one_replica_matches_the_engine_driven_directly() -> None:
    """The driver must not perturb timing: same records as feeding one engine by hand."""
    wl = _workload()
    summary, records, _ = _run(wl, replicas=1, policy="round_robin")
    engine = Engine(engine_config(SimulationConfig(replicas=1), 16), load_profile("fast"))
    direct = []
    for i, req in enumerate(wl.requests()):
        direct += engine.run_until(req.t_s)
        engine.add_request(
            EngineRequest(
                request_id=f"q{i}",
                adapter=req.adapter,
                adapter_rank=req.rank,
                prompt_tokens=req.prompt_tokens,
                max_tokens=req.max_tokens,
                arrival_s=req.t_s,
            )
        )
    direct += engine.run_until(1e9)
    by_id = {r.request_id: r for r in direct}
    assert len(records) == len(direct) == summary["requests"]["ok"] > 100
    for rec in records:
        d = by_id[rec.request_id]
        assert (rec.arrival_s, rec.first_token_s, rec.finish_s, rec.output_tokens) == (
            d.arrival_s,
            d.first_token_s,
            d.finish_s,
            d.output_tokens,
        )


def test_deterministic_for_a_seed() -> None:
    a = _run(_workload(), replicas=3, policy="loragate")
    b = _run(_workload(), replicas=3, policy="loragate")
    assert a[1] == b[1]
    assert _strip(a[0]) == _strip(b[0])
    c = _run(_workload(seed=4), replicas=3, policy="loragate")
    assert c[1] != a[1]


def test_round_robin_spreads_and_affinity_concentrates() -> None:
    wl = _workload(count=30, rate=40)
    rr, rr_recs, _ = _run(wl, replicas=3, policy="round_robin")
    counts = list(rr["routed_per_replica"].values())
    assert max(counts) - min(counts) <= 1
    ch, _, _ = _run(wl, replicas=3, policy="consistent_hash")
    # Hashing on the adapter keeps each adapter on few replicas.
    assert sum(ch["adapters_per_replica"].values()) < sum(rr["adapters_per_replica"].values())
    assert {r.replica for r in rr_recs} == {"r0", "r1", "r2"}


def test_gateway_bookkeeping_and_shadow_residency() -> None:
    wl = _workload(count=20)
    _, records, sim = _run(
        wl, replicas=2, policy="least_loaded", engine=ReplicaEngineSettings(max_loras=2)
    )
    last_adapter: dict[str, str] = {}
    routed: dict[str, set[str]] = {}
    for rec in sorted(records, key=lambda r: int(r.request_id[1:])):
        if rec.adapter is not None and rec.replica is not None:
            last_adapter[rec.replica] = rec.adapter
            routed.setdefault(rec.replica, set()).add(rec.adapter)
    for rep in sim.replicas:
        assert rep.in_flight == 0 and not rep.adapter_in_flight and not rep.pending
        gpu = rep.residency.gpu
        assert len(gpu) <= 2
        assert set(gpu) <= routed[rep.replica_id]
        # The shadow LRU's most recent entry is the adapter routed there last.
        assert gpu[-1] == last_adapter[rep.replica_id]


def test_summary_agrees_with_records() -> None:
    wl = _workload()
    summary, records, _ = _run(wl, replicas=2, policy="least_loaded", ttft_slo_ms=50)
    ok = [r for r in records if r.status == "ok"]
    within = sum(r.ttft_s <= 0.05 for r in ok)
    assert summary["slo"]["attainment"] == pytest.approx(within / len(records))
    assert 0 < summary["slo"]["attainment"] < 1
    ttfts = sorted(r.ttft_s for r in ok)
    assert summary["ttft_s"]["p50"] == pytest.approx(ttfts[len(ttfts) // 2], rel=0.05)
    assert summary["requests"]["total"] == len(records) == len(list(wl.requests()))
    assert summary["deferred"]["requests"] == sum(r.deferred_s > 0 for r in ok)
    in_window = sum(r.finish_s <= wl.spec.duration_s for r in ok)
    assert summary["throughput"]["requests_per_s"] == pytest.approx(in_window / 30.0)
    assert all(r.first_token_s >= r.arrival_s and r.finish_s >= r.first_token_s for r in ok)
    itl = [r.itl_s for r in ok if r.output_tokens > 1]
    assert all(x > 0 for x in itl)
    loads = sum(v["adapter_loads"] for v in summary["replicas"].values())
    assert loads > 0


def test_starvation_flag_and_unfinished() -> None:
    lengths = {"prompt": 200, "output": 200}
    light = _workload(rate=2, lengths=lengths)
    s_light, _, _ = _run(light, replicas=1, policy="round_robin")
    assert s_light["starved"] is False
    heavy = _workload(rate=40, lengths=lengths)
    s_heavy, recs, _ = _run(
        heavy,
        replicas=1,
        policy="round_robin",
        profile="paper-llama-3.1-8b-h100",
        engine=ReplicaEngineSettings(max_num_seqs=4, max_loras=1, max_cpu_loras=2),
        drain_s=0.0,
    )
    assert s_heavy["starved"] is True
    tp = s_heavy["throughput"]
    assert tp["achieved_tokens_per_s"] < 0.9 * tp["offered_tokens_per_s"]
    assert s_heavy["requests"]["unfinished"] > 0
    assert sum(r.status == "unfinished" for r in recs) == s_heavy["requests"]["unfinished"]
    assert all(math.isnan(r.finish_s) for r in recs if r.status == "unfinished")
    # Starved requests: unfinished, or first token after more than starvation_wait_s (60 s).
    assert s_light["starvation"]["requests"] == 0
    assert s_light["starvation"]["adapters"] == 0
    starved = [
        r for r in recs if r.status == "unfinished" or (r.status == "ok" and r.ttft_s > 60.0)
    ]
    st = s_heavy["starvation"]
    assert st["wait_s"] == 60.0
    assert st["requests"] == len(starved) >= s_heavy["requests"]["unfinished"]
    assert st["fraction"] == pytest.approx(len(starved) / len(recs))
    assert st["adapters"] == len({r.adapter or "" for r in starved})
    assert sum(st["worst_adapters"].values()) <= len(starved)


def test_too_long_requests_are_rejected() -> None:
    wl = _workload(lengths={"prompt": {"kind": "uniform", "min": 100, "max": 3000}, "output": 200})
    summary, records, _ = _run(
        wl, replicas=2, policy="round_robin", engine=ReplicaEngineSettings(max_model_len=2048)
    )
    rejected = [r for r in records if r.status == "rejected"]
    assert rejected and all(r.prompt_tokens + r.max_tokens > 2048 for r in rejected)
    assert summary["requests"]["rejected"] == len(rejected)
    assert all(r.prompt_tokens + r.max_tokens <= 2048 for r in records if r.status == "ok")


def test_scrape_lag_runs_and_changes_decisions() -> None:
    wl = _workload(count=30, rate=60)
    fresh, fresh_recs, _ = _run(wl, replicas=3, policy="least_loaded")
    lagged, lag_recs, _ = _run(wl, replicas=3, policy="least_loaded", scrape_interval_s=1.0)
    assert lagged["requests"]["ok"] == fresh["requests"]["ok"]
    assert [r.replica for r in lag_recs] != [r.replica for r in fresh_recs]


def test_max_lora_rank_below_workload_is_an_error() -> None:
    with pytest.raises(ConfigError) as exc:
        run_simulation(
            _workload(),
            SimulationConfig(replicas=1, engine=ReplicaEngineSettings(max_lora_rank=8)),
        )
    assert exc.value.key == "max_lora_rank"
