"""RealtimeEngine: token streams in wall time, agreement with the virtual-time engine, aborts."""

from __future__ import annotations

import asyncio
import time

import pytest

from loragate.core.errors import InvalidRequestError
from loragate.twin.engine import Engine, EngineConfig, EngineRequest, TokenEvent
from loragate.twin.profile import load_profile
from loragate.twin.realtime import RealtimeEngine

FAST = load_profile("fast")
CFG = EngineConfig(max_loras=2, max_cpu_loras=3)


def make(rid: str, adapter: str | None, out: int, at: float, prompt: int = 64) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        adapter=adapter,
        adapter_rank=8,
        prompt_tokens=prompt,
        max_tokens=out,
        arrival_s=at,
    )


async def collect(stream: object) -> list[TokenEvent]:
    return [ev async for ev in stream]  # type: ignore[attr-defined]


async def test_streams_tokens_and_wall_time_matches_the_virtual_engine() -> None:
    scale = 4.0
    specs = [(f"r{i}", [None, "a", "b", "c"][i % 4], 40 + 10 * i) for i in range(6)]
    rt = RealtimeEngine(Engine(CFG, FAST), time_scale=scale)
    await rt.start()
    try:
        t0 = time.monotonic()
        now = rt.now_s()
        streams = [rt.submit(make(rid, a, n, now)) for rid, a, n in specs]
        results = await asyncio.wait_for(asyncio.gather(*map(collect, streams)), 30)
        wall_s = time.monotonic() - t0
    finally:
        await rt.stop()
    for (rid, _, n), events in zip(specs, results, strict=True):
        assert sum(ev.n_tokens for ev in events) == n
        assert events[0].is_first and not any(ev.is_first for ev in events[1:])
        assert events[-1].finished and not any(ev.finished for ev in events[:-1])
        assert all(ev.request_id == rid for ev in events)
        times = [ev.time_s for ev in events]
        assert times == sorted(times)
    # The same load in virtual time: the wall-time run took the sum of the step times.
    virtual = Engine(CFG, FAST)
    for rid, a, n in specs:
        virtual.add_request(make(rid, a, n, 0.0))
    records = virtual.run_until(1e6)
    makespan_s = max(r.finish_s for r in records)
    assert rt.busy_engine_s == pytest.approx(makespan_s, rel=0.05)
    expected_wall = makespan_s / scale
    assert 0.9 < wall_s / expected_wall < 4.0
    assert virtual.loads_from_disk == rt.engine.loads_from_disk == 3


async def test_client_disconnect_aborts_the_request() -> None:
    rt = RealtimeEngine(Engine(CFG, FAST), time_scale=2.0)
    await rt.start()
    try:
        stream = rt.submit(make("long", "a", 2000, rt.now_s()))
        other = rt.submit(make("short", None, 20, rt.now_s()))
        got = 0
        async for ev in stream:
            got += ev.n_tokens
            if got >= 3:
                break
        await stream.aclose()
        assert rt.engine.num_running <= 1
        short = await asyncio.wait_for(collect(other), 10)
        assert sum(ev.n_tokens for ev in short) == 20
        for _ in range(100):
            if not rt.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        assert not rt.engine.has_unfinished() and rt.engine.kv_usage == 0.0
        assert not rt.abort("long")
    finally:
        await rt.stop()


async def test_invalid_request_raises_and_stop_ends_open_streams() -> None:
    rt = RealtimeEngine(Engine(CFG, FAST), time_scale=1.0)
    with pytest.raises(InvalidRequestError):
        rt.submit(make("x", "a", 10, 0.0, prompt=5000))
    await rt.start()
    stream = rt.submit(make("long", None, 100_000 // 50, rt.now_s()))
    first = await asyncio.wait_for(stream.__anext__(), 5)
    assert first.is_first
    await rt.stop()
    rest = await asyncio.wait_for(collect(stream), 5)
    assert not any(ev.finished for ev in rest)


async def test_idle_engine_waits_for_submissions() -> None:
    rt = RealtimeEngine(Engine(CFG, FAST), time_scale=5.0)
    await rt.start()
    try:
        await asyncio.sleep(0.05)
        assert rt.steps == 0  # nothing to do: no busy loop
        events = await asyncio.wait_for(collect(rt.submit(make("r", "a", 5, rt.now_s()))), 5)
        assert len(events) == 5 and rt.steps == 5
    finally:
        await rt.stop()
