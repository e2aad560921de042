"""ReplicaPool: snapshots from real polls, health in and out, single-flight adapter loads."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web

from loragate.backends.pool import ReplicaPool
from loragate.core.config import PollerConfig, ReplicaConfig
from loragate.core.errors import AdapterLoadError
from loragate.core.types import AdapterSpec, ReplicaSettings
from ports import unused_port
from vllm_stub import StubVllm

SLOW_POLLS = PollerConfig(interval_s=3600.0, timeout_s=2.0)


def _pool(*stubs: StubVllm, settings: ReplicaSettings | None = None) -> ReplicaPool:
    replicas = [
        ReplicaConfig(replica_id=f"r{i}", url=s.url, settings=settings) for i, s in enumerate(stubs)
    ]
    return ReplicaPool(replicas, poller=SLOW_POLLS)


async def test_first_poll_builds_snapshots(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    stub_vllm.adapters["pre"] = "/loras/pre"
    pool = _pool(stub_vllm)
    await pool.start(session)
    try:
        (snap,) = pool.healthy_snapshots()
        assert snap.replica_id == "r0" and snap.healthy
        assert (snap.num_running, snap.num_waiting, snap.num_deferred) == (1, 3, 2)
        assert snap.kv_usage == pytest.approx(0.5)
        assert snap.active_adapters == frozenset({"a"})  # the newest lora_requests_info series
        assert snap.settings.max_loras == 3  # discovered from the max_lora label
        assert snap.residency.registered == frozenset({"pre"})
    finally:
        await pool.stop()


async def test_configured_settings_stand_but_the_reported_max_lora_wins(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    """The config's settings are used, except max_loras while vLLM reports its max_lora (the
    running server's truth; the CPU cache stays at least as large)."""
    pool = _pool(stub_vllm, settings=ReplicaSettings(max_loras=7, max_cpu_loras=9, max_lora_rank=8))
    await pool.start(session)
    try:
        settings = pool.snapshot("r0").settings  # the stub reports max_lora 3
        assert (settings.max_loras, settings.max_cpu_loras, settings.max_lora_rank) == (3, 9, 8)
        assert pool.reported_max_loras("r0") == 3
        stub_vllm.metrics_text = 'vllm:num_requests_running{engine="0"} 0.0\n'
        await pool.poll_once()  # not reported (e.g. a restart): the config's stand
        assert pool.snapshot("r0").settings == ReplicaSettings(
            max_loras=7, max_cpu_loras=9, max_lora_rank=8
        )
        assert pool.reported_max_loras("r0") is None
    finally:
        await pool.stop()


async def test_unhealthy_replica_leaves_and_comes_back(
    stub_pair: tuple[StubVllm, StubVllm, list[web.AppRunner]], session: aiohttp.ClientSession
) -> None:
    a, b, _ = stub_pair
    pool = _pool(a, b)
    await pool.start(session)
    try:
        assert [s.replica_id for s in pool.healthy_snapshots()] == ["r0", "r1"]
        b.health_status = 503
        await pool.poll_once()
        assert [s.replica_id for s in pool.healthy_snapshots()] == ["r0"]
        assert not pool.is_healthy("r1") and pool.last_error("r1")
        b.health_status = 200
        await pool.poll_once()
        assert [s.replica_id for s in pool.healthy_snapshots()] == ["r0", "r1"]
        # Passive health: a failed proxy connection takes it out at once, a poll restores it.
        pool.report_failure("r0", "connection reset")
        assert [s.replica_id for s in pool.healthy_snapshots()] == ["r1"]
        await pool.poll_once()
        assert len(pool.healthy_snapshots()) == 2
    finally:
        await pool.stop()


async def test_stopped_replica_is_dropped(
    stub_pair: tuple[StubVllm, StubVllm, list[web.AppRunner]], session: aiohttp.ClientSession
) -> None:
    a, b, runners = stub_pair
    pool = _pool(a, b)
    await pool.start(session)
    try:
        await runners[1].cleanup()
        await pool.poll_once()
        assert [s.replica_id for s in pool.healthy_snapshots()] == ["r0"]
    finally:
        await pool.stop()


async def test_failures_to_unhealthy_threshold(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    pool = ReplicaPool(
        [ReplicaConfig(replica_id="r0", url=stub_vllm.url)],
        poller=PollerConfig(interval_s=3600.0, failures_to_unhealthy=2),
    )
    await pool.start(session)
    try:
        stub_vllm.health_status = 500
        await pool.poll_once()
        assert pool.is_healthy("r0")  # one failure is tolerated
        await pool.poll_once()
        assert not pool.is_healthy("r0")
    finally:
        await pool.stop()


async def test_concurrent_requests_share_one_adapter_load(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    stub_vllm.load_delay_s = 0.2
    pool = _pool(stub_vllm)
    await pool.start(session)
    spec = AdapterSpec(name="lora-0", path="/loras/lora-0")
    try:
        waited = await asyncio.gather(*(pool.ensure_adapter("r0", spec) for _ in range(20)))
        assert waited == [True] * 20
        assert stub_vllm.load_calls == 1
        assert pool.is_registered("r0", "lora-0")
        assert pool.snapshot("r0").residency.registered == frozenset({"lora-0"})
        assert pool.adapter_loads() == {"r0": 1}
        assert await pool.ensure_adapter("r0", spec) is False  # already there: no call
        assert stub_vllm.load_calls == 1
    finally:
        await pool.stop()


async def test_cancelled_waiter_does_not_cancel_the_load(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    stub_vllm.load_delay_s = 0.3
    pool = _pool(stub_vllm)
    await pool.start(session)
    spec = AdapterSpec(name="lora-0", path="/loras/lora-0")
    try:
        first = asyncio.create_task(pool.ensure_adapter("r0", spec))
        second = asyncio.create_task(pool.ensure_adapter("r0", spec))
        await asyncio.sleep(0.05)
        first.cancel()
        assert await second is True
        assert stub_vllm.load_calls == 1 and "lora-0" in stub_vllm.adapters
    finally:
        await pool.stop()


async def test_failed_load_reaches_every_waiter(
    stub_vllm: StubVllm, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    pool = _pool(stub_vllm)
    await pool.start(session)
    spec = AdapterSpec(name="bad", path="/nowhere/bad")
    caplog.set_level(logging.WARNING, logger="loragate.backends.pool")
    try:
        results = await asyncio.gather(
            *(pool.ensure_adapter("r0", spec) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, AdapterLoadError) and r.status == 404 for r in results)
        assert not pool.is_registered("r0", "bad")
        # One WARNING for the one load (clients only saw a 502; the log said nothing).
        lines = [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(
            f"adapter bad (/nowhere/bad) failed to load on replica r0 ({stub_vllm.url}): "
        )
        # The only replica: no other can take its requests, and the line says so.
        assert "every healthy replica refused it" in lines[0]
        assert "until a refusal lapses (within 60 s)" in lines[0]
        # A load refused there again while the refusal is remembered: not logged again.
        with pytest.raises(AdapterLoadError):
            await pool.ensure_adapter("r0", spec)
        lines = [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()]
        assert len(lines) == 1, lines
        # Remembered (one refused load per round, however many waited) until r0 lists it.
        assert pool.refusing(spec) == {"r0"} and pool.refusals.counts == {("bad", "r0"): 2}
        assert set(pool.refused_adapters("r0")) == {"bad"}
        await pool.poll_once()
        assert pool.refusing(spec) == {"r0"}
        stub_vllm.adapters["bad"] = "/nowhere/bad"  # loaded there some other way
        await pool.poll_once()
        assert pool.refusing(spec) == () and pool.refused_adapters("r0") == {}
    finally:
        await pool.stop()


async def test_registered_set_is_reconciled_with_v1_models(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    pool = _pool(stub_vllm)
    await pool.start(session)
    try:
        await pool.ensure_adapter("r0", AdapterSpec(name="x", path="/loras/x"))
        stub_vllm.adapters["external"] = "/loras/external"  # e.g. vLLM's resolver loaded it
        del stub_vllm.adapters["x"]  # e.g. the replica restarted
        await pool.poll_once()
        assert pool.registered_adapters() == {"r0": frozenset({"external"})}
        pool.forget_adapter("r0", "external")
        assert not pool.is_registered("r0", "external")
    finally:
        await pool.stop()


async def test_background_poller_runs(stub_vllm: StubVllm, session: aiohttp.ClientSession) -> None:
    pool = ReplicaPool(
        [ReplicaConfig(replica_id="r0", url=stub_vllm.url)],
        poller=PollerConfig(interval_s=0.05),
    )
    await pool.start(session)
    try:
        stub_vllm.health_status = 503
        for _ in range(100):  # bounded: at most ~5 s
            if not pool.is_healthy("r0"):
                break
            await asyncio.sleep(0.05)
        assert not pool.is_healthy("r0")
    finally:
        await pool.stop()


async def test_replica_down_at_start_is_logged_once(
    stub_vllm: StubVllm, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica that never answered was silent in the log (only healthy -> unhealthy was)."""
    down = f"http://127.0.0.1:{unused_port()}"
    pool = ReplicaPool(
        [
            ReplicaConfig(replica_id="up", url=stub_vllm.url),
            ReplicaConfig(replica_id="down", url=down),
        ],
        poller=SLOW_POLLS,
    )
    caplog.set_level(logging.WARNING, logger="loragate.backends.pool")
    await pool.start(session)
    try:
        await pool.poll_once()  # still down: not logged again
        assert [s.replica_id for s in pool.healthy_snapshots()] == ["up"]
        lines = [r.getMessage() for r in caplog.records if "down" in r.getMessage()]
        assert len(lines) == 1, lines
        assert f"replica down ({down}) gets no traffic until a poll succeeds" in lines[0]
    finally:
        await pool.stop()


async def test_a_replica_serving_another_model_gets_no_traffic(
    stub_pair: tuple[StubVllm, StubVllm, list[web.AppRunner]],
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, _ = stub_pair
    b.base_model = "loragate/sim-base"  # started without --served-model-name
    pool = ReplicaPool(
        [ReplicaConfig(replica_id=f"r{i}", url=s.url) for i, s in enumerate((a, b))],
        poller=SLOW_POLLS,
        base_model="tiny-llama",
    )
    with caplog.at_level(logging.WARNING, logger="loragate.backends.pool"):
        await pool.start(session)
    try:
        assert [s.replica_id for s in pool.healthy_snapshots()] == ["r0"]
        error = pool.last_error("r1")
        assert error is not None
        assert "'loragate/sim-base'" in error and "--served-model-name tiny-llama" in error
        await pool.poll_once()
        warned = [r.getMessage() for r in caplog.records if "r1" in r.getMessage()]
        assert len(warned) == 1 and "gets no traffic" in warned[0]  # said once, not per poll
        b.base_model = "tiny-llama"  # restarted with the right name
        await pool.poll_once()
        assert [s.replica_id for s in pool.healthy_snapshots()] == ["r0", "r1"]
        assert pool.last_error("r1") is None
        pool.base_model = "loragate/sim-base"  # a reload changed base_model: checked at once
        await pool.poll_once()
        assert pool.healthy_snapshots() == ()
    finally:
        await pool.stop()


async def test_a_replica_url_ending_in_v1_is_explained(
    stub_vllm: StubVllm, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # The OpenAI SDK habit: url: http://host:8000/v1. The replica answers 404 to every poll.
    pool = ReplicaPool(
        [ReplicaConfig(replica_id="r0", url=stub_vllm.url + "/v1")], poller=SLOW_POLLS
    )
    caplog.set_level(logging.WARNING, logger="loragate.backends.pool")
    await pool.start(session)
    try:
        assert pool.healthy_snapshots() == ()
        error = pool.last_error("r0")
        assert error is not None and f"GET {stub_vllm.url}/v1/" in error and "status 404" in error
        assert "the server's root, without /v1" in error
        (line,) = [r.getMessage() for r in caplog.records]
        assert "gets no traffic until a poll succeeds" in line and "without /v1" in line
        assert "unreachable" not in line  # it answers: it is the URL that is wrong
    finally:
        await pool.stop()
