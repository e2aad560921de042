"""Pinned digests of the engine's output on fixed workloads.

Pure speed work on the engine must not change a single simulated number: these digests of every
record (and, through ``step()``, every token event) and of the final engine state were taken
before the engine was optimised. A digest mismatch means the schedule changed; if a change is
meant (a new scheduling rule), re-pin the digests in the same commit and say why.

The profile is built inline (not a YAML profile that a recalibration may refit); it switches on
the scheduler's waiting term, the additive LoRA cost and rank-dependent load costs, so that queue
lengths, adapter counts, ranks and loads all reach the step times.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from loragate.twin.engine import Engine, EngineConfig, EngineRequest, RequestRecord
from loragate.twin.profile import PerformanceProfile, profile_from_dict

PROFILE: PerformanceProfile = profile_from_dict(
    {
        "name": "digest",
        "step": {
            "decode_intercept_ms": 10.54,
            "decode_ms_per_seq": 0.0438,
            "prefill_ms_per_token": 0.00731,
        },
        "lora": {
            "pct_per_adapter": 1.93,
            "intercept_pct": 120.0,
            "pct_per_rank": 0.11,
            "extra_ms_per_token_per_slot": 0.0007,
            "extra_ms_per_adapter": 0.05,
        },
        "scheduler": {
            "intercept_ms": 0.3,
            "ms_per_running": 0.002,
            "ms_per_waiting": 0.0011,
            "max_waiting": 5000,
        },
        "loading": {
            "cpu_to_gpu_ms": {"table": {8: 7.487, 16: 7.126, 32: 6.367}},
            "disk_to_cpu_ms": {"intercept_ms": 3.0, "ms_per_rank": 0.21},
        },
        "kv": {"kv0_tokens": 300000, "tokens_per_slot_rank": 48.0},
    }
)

CONFIGS = {
    # KV pressure (preemptions), slot pressure (deferrals), chunked prefill.
    "tight": EngineConfig(
        max_num_seqs=48,
        max_num_batched_tokens=256,
        max_model_len=1024,
        max_loras=3,
        max_cpu_loras=5,
        kv_capacity_tokens=16 * 150,
    ),
    # Overloaded like the bench's heavy-320 case, scaled down: many adapters, few slots.
    "overload": EngineConfig(
        max_num_seqs=512,
        max_num_batched_tokens=2048,
        max_model_len=4096,
        max_loras=6,
        max_cpu_loras=40,
        max_lora_rank=32,
        kv_capacity_tokens=16 * 4000,
    ),
    "no-lora": EngineConfig(enable_lora=False, max_num_seqs=16, kv_capacity_tokens=8192),
}


def workload(seed: int, cfg: EngineConfig, n: int, rate: float) -> list[EngineRequest]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate)
        a = rng.randrange(60) if cfg.enable_lora else 0
        prompt = min(1 + int(rng.paretovariate(1.4) * 60), cfg.max_model_len // 2)
        gen = min(1 + int(rng.paretovariate(1.3) * 40), cfg.max_model_len - prompt)
        out.append(
            EngineRequest(
                request_id=f"r{i}",
                adapter=None if a % 7 == 0 else f"a{a}",
                adapter_rank=(8, 16, 32)[a % 3] if cfg.max_lora_rank >= 32 else (8, 16)[a % 2],
                prompt_tokens=prompt,
                max_tokens=gen,
                arrival_s=round(t, 6),
            )
        )
    return out


def _f(x: float) -> str:
    return float(x).hex()


def record_line(r: RequestRecord) -> str:
    return (
        f"{r.request_id},{r.adapter},{_f(r.arrival_s)},{_f(r.first_token_s)},{_f(r.finish_s)},"
        f"{r.prompt_tokens},{r.output_tokens},{_f(r.deferred_s)},{r.preemptions}"
    )


def state_line(e: Engine) -> str:
    return (
        f"{_f(e.time_s)},{e.steps_total},{e.num_preemptions_total},{e.loads_from_disk},"
        f"{e.loads_from_memory},{e.num_running},{e.num_waiting},{e.num_deferred},"
        f"{e._used},{e.gpu_adapters()},{e.cpu_adapters()}"
    )


def digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def sliced_run(
    cfg: EngineConfig, reqs: list[EngineRequest], dt: float, t_max: float
) -> tuple[str, dict[str, int]]:
    """The simulator's way: bulk-add each slice of arrivals, then run_until the slice end.

    Returns the digest and what the run went through (to check the workloads' coverage)."""
    e = Engine(cfg, PROFILE)
    lines: list[str] = []
    seen = {"max_waiting": 0, "deferred": 0, "finished": 0}
    i = 0
    t = 0.0
    while t < t_max:
        t += dt
        j = i
        while j < len(reqs) and reqs[j].arrival_s <= t:
            j += 1
        e.add_requests(reqs[i:j])
        i = j
        recs = e.run_until(t)
        lines += map(record_line, recs)
        lines.append(state_line(e))
        seen["max_waiting"] = max(seen["max_waiting"], e.num_waiting)
        seen["deferred"] += sum(r.deferred_s > 0 for r in recs)
        seen["finished"] += len(recs)
    seen |= {
        "preemptions": e.num_preemptions_total,
        "disk": e.loads_from_disk,
        "memory": e.loads_from_memory,
    }
    return digest(lines), seen


def stepped_run(cfg: EngineConfig, reqs: list[EngineRequest]) -> str:
    """The wall-time replica's way: one add_request each, then step() by step() with events."""
    e = Engine(cfg, PROFILE)
    for r in reqs:
        e.add_request(r)
    lines: list[str] = []
    while (start := e.next_step_start_s) is not None:
        res = e.step(start)
        lines.append(f"{_f(res.start_s)},{_f(res.duration_s)}")
        lines += (
            f"{ev.request_id},{_f(ev.time_s)},{ev.n_tokens},{ev.finished},{ev.is_first}"
            for ev in res.events
        )
        lines += map(record_line, res.finished)
    lines.append(state_line(e))
    return digest(lines)


SLICED: dict[tuple[str, int, float], str] = {
    ("tight", 1, 2.0): "0e55653fa967fd00",
    ("tight", 2, 8.0): "27d5fe0f06f12366",
    ("overload", 3, 8.0): "b55ea23fe9ea1f3e",
    ("overload", 4, 300.0): "0563ba511bc82a73",
    ("no-lora", 5, 5.0): "1bc95f10b0242f8c",
}

STEPPED: dict[tuple[str, int, float], str] = {
    ("tight", 6, 4.0): "aed7b3ff7f8c3aeb",
    ("overload", 7, 30.0): "ed3088f0d4cba724",
    ("no-lora", 8, 5.0): "6a94d604b20f3e2f",
}


def sliced(name: str, seed: int, rate: float) -> tuple[str, dict[str, int]]:
    reqs = workload(seed, CONFIGS[name], n=3000, rate=rate)
    return sliced_run(CONFIGS[name], reqs, dt=0.7, t_max=reqs[-1].arrival_s + 30.0)


@pytest.mark.parametrize(("name", "seed", "rate"), sorted(SLICED))
def test_sliced_run_until_digest_is_pinned(name: str, seed: int, rate: float) -> None:
    assert sliced(name, seed, rate)[0] == SLICED[(name, seed, rate)]


@pytest.mark.parametrize(("name", "seed", "rate"), sorted(STEPPED))
def test_stepped_digest_is_pinned(name: str, seed: int, rate: float) -> None:
    reqs = workload(seed, CONFIGS[name], n=600, rate=rate)
    assert stepped_run(CONFIGS[name], reqs) == STEPPED[(name, seed, rate)]


def test_the_pinned_workloads_exercise_the_engine() -> None:
    """The digests cover preemption, deferral, disk and memory loads, long queues, draining."""
    seen = {key: sliced(*key)[1] for key in SLICED}
    light, heavy = seen[("tight", 1, 2.0)], seen[("tight", 2, 8.0)]
    assert light["finished"] == 3000 and light["deferred"] > 1000
    assert light["memory"] > light["disk"] > CONFIGS["tight"].max_cpu_loras
    assert heavy["preemptions"] > 1000 and heavy["max_waiting"] > 1000 and heavy["deferred"] > 100
    near, over = seen[("overload", 3, 8.0)], seen[("overload", 4, 300.0)]
    assert near["finished"] > 2500 and near["deferred"] > 1000
    assert near["memory"] > near["disk"] > CONFIGS["overload"].max_cpu_loras
    assert over["max_waiting"] > 2000 and over["deferred"] > 100
    assert seen[("no-lora", 5, 5.0)]["finished"] == 3000
