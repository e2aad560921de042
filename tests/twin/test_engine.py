"""Twin engine behaviour on small hand-built cases (vLLM V1 scheduling semantics)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from loragate.core.errors import InvalidRequestError
from loragate.twin.engine import (
    Engine,
    EngineConfig,
    EngineRequest,
    EngineStartupError,
    RequestRecord,
    validate_request,
)
from loragate.twin.profile import PerformanceProfile, load_profile

FAST = load_profile("fast")


class RecordingProfile:
    """Delegates to a real profile and records every step-time query."""

    def __init__(self, inner: PerformanceProfile) -> None:
        self.inner = inner
        self.calls: list[dict[str, Any]] = []

    def step_time_s(self, **kw: Any) -> float:
        self.calls.append(kw)
        return self.inner.step_time_s(**kw)

    def specialize(self, **kw: Any) -> RecordingProfile:
        # The engine binds its profile to its settings; keep recording through that copy.
        self.inner = self.inner.specialize(**kw)
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def req(
    rid: str,
    adapter: str | None = None,
    *,
    prompt: int = 10,
    out: int = 5,
    at: float = 0.0,
    rank: int = 8,
) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        adapter=adapter,
        adapter_rank=rank if adapter else 0,
        prompt_tokens=prompt,
        max_tokens=out,
        arrival_s=at,
    )


def run_all(engine: Engine) -> dict[str, RequestRecord]:
    return {r.request_id: r for r in engine.run_until(1e6)}


def test_one_request_alone_latency_is_the_sum_of_its_step_times() -> None:
    prof = FAST
    cfg = EngineConfig(max_num_batched_tokens=512)
    e = Engine(cfg, prof)
    e.add_request(req("r", "a", prompt=1200, out=6, at=1.5, rank=16))
    rec = run_all(e)["r"]

    def t(prefill: int, decode: int) -> float:
        return prof.step_time_s(
            batch_size=1,
            distinct_adapters=1,
            prefill_tokens=prefill,
            decode_tokens=decode,
            max_rank_in_batch=16,
            num_waiting=0,
            lora_enabled=True,
        )

    load = prof.disk_to_cpu_load_s(16) + prof.cpu_to_gpu_load_s(16)
    # Chunked prefill 512 + 512 + 176 (the last chunk yields the first token), then 5 decodes.
    ttft = t(512, 0) + load + t(512, 0) + t(176, 0)
    assert rec.first_token_s - rec.arrival_s == pytest.approx(ttft, abs=1e-8)
    assert rec.finish_s - rec.arrival_s == pytest.approx(ttft + 5 * t(0, 1), abs=1e-8)
    assert rec.output_tokens == 6 and rec.preemptions == 0 and rec.deferred_s == 0.0
    assert (e.loads_from_disk, e.loads_from_memory) == (1, 1)
    assert e.steps_total == 8 and e.kv_usage == 0.0 and not e.has_unfinished()


def test_base_model_request_needs_no_slot_and_no_load() -> None:
    e = Engine(EngineConfig(), FAST)
    e.add_request(req("r", None, out=3))
    assert run_all(e)["r"].output_tokens == 3
    assert (e.loads_from_disk, e.loads_from_memory) == (0, 0)
    assert e.gpu_adapters() == []


def test_deferral_skips_over_other_adapters_and_is_counted() -> None:
    e = Engine(EngineConfig(max_loras=1, max_cpu_loras=2), FAST)
    e.add_request(req("a1", "a", out=50))
    e.add_request(req("b1", "b", out=5))
    e.add_request(req("base", None, out=5))
    e.add_request(req("a2", "a", out=5))
    res = e.step(0.0)
    # The walk skips b1 (slot budget full) and admits the base request and a2 behind it.
    assert e.num_running == 3 and e.num_waiting == 1 and e.num_deferred == 1
    assert e.running_adapters == ["a"]
    assert {ev.request_id for ev in res.events} == {"a1", "base", "a2"}
    recs = run_all(e)
    b1, a1 = recs["b1"], recs["a1"]
    # b1 waits exactly until a1 (the last request of adapter a) has finished.
    assert b1.first_token_s > a1.finish_s
    assert b1.deferred_s == pytest.approx(a1.finish_s, abs=1e-8)
    assert recs["a2"].deferred_s == 0.0 and recs["base"].deferred_s == 0.0
    assert e.num_deferred == 0


def test_lru_order_of_gpu_slots_and_cpu_cache_and_load_counters() -> None:
    e = Engine(EngineConfig(max_loras=2, max_cpu_loras=3), FAST)
    seq = [
        ("a", ["a"], ["a"], (1, 1)),
        ("b", ["a", "b"], ["a", "b"], (2, 2)),
        ("a", ["b", "a"], ["b", "a"], (2, 2)),  # resident: no load, now most recent
        ("c", ["a", "c"], ["b", "a", "c"], (3, 3)),  # evicts b from GPU (LRU), CPU has room
        ("b", ["c", "b"], ["a", "c", "b"], (3, 4)),  # from CPU: a leaves the GPU
        ("d", ["b", "d"], ["c", "b", "d"], (4, 5)),  # CPU full: a dropped (LRU), c leaves GPU
        ("a", ["d", "a"], ["b", "d", "a"], (5, 6)),  # a again from disk
    ]
    for i, (adapter, gpu, cpu, loads) in enumerate(seq):
        e.add_request(req(f"r{i}", adapter, at=float(i)))
        e.run_until(i + 0.999)
        assert not e.has_unfinished()
        assert e.gpu_adapters() == gpu, i
        assert e.cpu_adapters() == cpu, i
        assert (e.loads_from_disk, e.loads_from_memory) == loads, i


def test_running_adapters_are_pinned_in_their_slots() -> None:
    e = Engine(EngineConfig(max_loras=2, max_cpu_loras=2), FAST)
    e.add_request(req("a", "a", out=100))
    e.add_request(req("b", "b", out=100))
    e.add_request(req("c", "c", out=2))
    e.step(0.0)
    assert e.gpu_adapters() == ["a", "b"] and e.num_deferred == 1
    e.run_until(1e6)
    assert e.gpu_adapters()[-1] == "c" and len(e.gpu_adapters()) == 2


def test_preemption_happens_and_every_request_recovers() -> None:
    cfg = EngineConfig(
        max_num_seqs=32, max_num_batched_tokens=256, max_model_len=256, kv_capacity_tokens=512
    )
    e = Engine(cfg, FAST)
    n = 12
    for i in range(n):
        e.add_request(req(f"r{i}", None, prompt=40, out=200, at=0.001 * i))
    peak = 0.0
    recs: list[RequestRecord] = []
    while (start := e.next_step_start_s) is not None:
        recs += e.step(start).finished
        peak = max(peak, e.kv_usage)
        assert e.kv_usage <= 1.0
    assert e.num_preemptions_total > 0
    assert peak == 1.0
    assert len(recs) == n and all(r.output_tokens == 200 for r in recs)
    assert sum(r.preemptions for r in recs) == e.num_preemptions_total
    assert e.kv_usage == 0.0


def test_abort_frees_everything() -> None:
    e = Engine(EngineConfig(max_loras=1), FAST)
    e.add_request(req("run", "a", prompt=100, out=1000))
    e.add_request(req("wait", "b", out=5))
    e.add_request(req("later", "a", out=5, at=50.0))
    e.step(0.0)
    assert e.kv_usage > 0 and e.num_deferred == 1
    assert e.abort("run") and e.abort("wait") and e.abort("later")
    assert not e.abort("run") and not e.abort("unknown")
    assert e.kv_usage == 0.0 and e.num_running == 0 and e.num_waiting == 0
    assert not e.has_unfinished() and e.next_step_start_s is None
    assert e.run_until(100.0) == []
    e.add_request(req("run", "a", out=2, at=100.0))  # the id is free again
    assert [r.request_id for r in e.run_until(200.0)] == ["run"]


def test_token_budget_batch_and_slot_limits_hold() -> None:
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_loras=2, max_cpu_loras=4)
    prof = RecordingProfile(FAST)
    e = Engine(cfg, prof)  # type: ignore[arg-type]
    for i in range(40):
        e.add_request(req(f"r{i}", f"a{i % 5}", prompt=30 + 7 * i, out=3 + i % 9, at=0.002 * i))
    recs = run_all(e)
    assert len(recs) == 40
    assert prof.calls
    for c in prof.calls:
        assert c["prefill_tokens"] + c["decode_tokens"] <= 64
        assert c["batch_size"] <= 8
        assert c["distinct_adapters"] <= 2
    assert any(c["prefill_tokens"] + c["decode_tokens"] == 64 for c in prof.calls)


def test_startup_checks() -> None:
    with pytest.raises(EngineStartupError, match="max seq len"):
        Engine(EngineConfig(max_model_len=8192, kv_capacity_tokens=4096), FAST)
    llama = load_profile("paper-llama-3.1-8b-h100")
    big = EngineConfig(max_model_len=131072, max_loras=128, max_cpu_loras=128, max_lora_rank=32)
    with pytest.raises(EngineStartupError):
        Engine(big, llama)  # as in the paper's R7 sweep: this server does not start
    ok = Engine(replace(big, max_loras=96, max_cpu_loras=96), llama)
    assert ok.kv_capacity_tokens == 168064
    with pytest.raises(EngineStartupError, match="max_cpu_loras"):
        Engine(EngineConfig(max_loras=8, max_cpu_loras=4), FAST)
    with pytest.raises(EngineStartupError, match="max_num_batched_tokens"):
        Engine(EngineConfig(max_num_seqs=512, max_num_batched_tokens=256), FAST)


def test_validate_request_rejects_what_vllm_rejects() -> None:
    cfg = EngineConfig(max_model_len=100, max_lora_rank=16)
    validate_request(req("ok", "a", prompt=60, out=40), cfg)
    with pytest.raises(InvalidRequestError, match="maximum context length is 100") as exc:
        validate_request(req("x", prompt=60, out=41), cfg)
    assert exc.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="input tokens"):
        validate_request(req("x", prompt=100, out=1), cfg)
    with pytest.raises(InvalidRequestError, match="rank 32"):
        validate_request(req("x", "a", rank=32), cfg)
    with pytest.raises(InvalidRequestError, match="not enabled"):
        validate_request(req("x", "a"), replace(cfg, enable_lora=False))
    e = Engine(EngineConfig(), FAST)
    e.add_request(req("dup"))
    with pytest.raises(InvalidRequestError, match="already in use"):
        e.add_request(req("dup"))
    with pytest.raises(InvalidRequestError):
        e.add_request(req("long", prompt=4000, out=200))


def test_load_adapter_warms_the_cpu_cache() -> None:
    e = Engine(EngineConfig(max_loras=2, max_cpu_loras=4), FAST)
    assert e.load_adapter("a", 8) == pytest.approx(FAST.disk_to_cpu_load_s(8))
    assert e.cpu_adapters() == ["a"] and e.gpu_adapters() == []
    assert e.load_adapter("a", 8) == 0.0  # already resident
    e.add_request(req("r", "a"))
    run_all(e)
    assert (e.loads_from_disk, e.loads_from_memory) == (1, 1)  # only CPU->GPU at first use
    assert e.unload_adapter("a") and e.cpu_adapters() == [] and e.gpu_adapters() == []


def test_bulk_add_then_abort_and_duplicate_check() -> None:
    e = Engine(EngineConfig(max_loras=1), FAST)
    e.add_requests([req("a", "a", out=50), req("b", "b"), req("c", None, at=5.0)])
    assert e.has_unfinished()
    e.step(0.0)
    assert e.abort("b") and e.abort("c") and not e.abort("zzz")
    with pytest.raises(InvalidRequestError, match="already in use"):
        e.add_request(req("a"))
    assert [r.request_id for r in e.run_until(100.0)] == ["a"]
    assert not e.has_unfinished()


def test_engine_binds_the_profile_to_its_lora_settings() -> None:
    fitted = load_profile("llama-3.1-8b-h100")
    cfg = EngineConfig(max_loras=8, max_cpu_loras=32, max_lora_rank=32, max_model_len=4096)
    engine = Engine(cfg, fitted)
    assert engine.profile.lora.max_loras == 8
    assert engine.profile.loading.max_lora_rank == 32
    # The slot-dependent LoRA cost differs from the unbound profile's (fitted at 300 slots).
    kw: dict[str, Any] = {
        "batch_size": 64,
        "distinct_adapters": 8,
        "prefill_tokens": 0,
        "decode_tokens": 64,
        "max_rank_in_batch": 16,
        "num_waiting": 0,
        "lora_enabled": True,
    }
    assert engine.profile.step_time_s(**kw) != fitted.step_time_s(**kw)
