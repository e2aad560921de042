"""ReplicaPool: adapter paths against the replicas' ``/v1/models`` roots, and the settings it
assumes for a replica the config gives none (vLLM's defaults for what it does not report)."""

from __future__ import annotations

import aiohttp
import pytest

from loragate.backends.pool import ReplicaPool
from loragate.core.config import PollerConfig, ReplicaConfig
from loragate.core.types import AdapterSpec
from vllm_stub import StubVllm

SLOW_POLLS = PollerConfig(interval_s=3600.0, timeout_s=2.0)
NEW = AdapterSpec(name="lora-0", path="/loras/new/lora-0")


def _pool(stub: StubVllm) -> ReplicaPool:
    return ReplicaPool([ReplicaConfig(replica_id="r0", url=stub.url)], poller=SLOW_POLLS)


async def test_a_load_answered_already_loaded_from_another_path_is_redone_in_place(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    pool = _pool(stub_vllm)
    pool.expect_adapters({NEW.name: NEW})
    await pool.start(session)
    try:
        # Registered there after the poll, from the old path (another gateway's config).
        stub_vllm.adapters["lora-0"] = "/loras/old/lora-0"
        assert not pool.is_registered("r0", "lora-0")
        assert await pool.ensure_adapter("r0", NEW)
        assert stub_vllm.adapters == {"lora-0": NEW.path}  # vLLM's "already loaded" was not
        assert pool.is_registered("r0", "lora-0")  # taken for the configured weights
        await pool.poll_once()
        assert pool.is_registered("r0", "lora-0") and pool.stale_adapters() == {}
    finally:
        await pool.stop()


async def test_same_path_spelled_otherwise_is_not_reloaded(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    stub_vllm.adapters["lora-0"] = "/loras/new//lora-0/"
    pool = _pool(stub_vllm)
    pool.expect_adapters({NEW.name: NEW})
    await pool.start(session)
    try:
        assert pool.is_registered("r0", "lora-0")
        assert not await pool.ensure_adapter("r0", NEW)
        assert stub_vllm.load_calls == 0
    finally:
        await pool.stop()


async def test_a_path_change_unregisters_at_once_and_back_again(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    """The catalog changes (a reload): the replica's copy stops counting before any poll; a
    path changed back (before the in-place load could run) counts again."""
    old = AdapterSpec(name="lora-0", path="/loras/old/lora-0")
    stub_vllm.adapters["lora-0"] = old.path
    stub_vllm.load_delay_s = 3600.0  # the in-place load never finishes in this test
    pool = _pool(stub_vllm)
    pool.expect_adapters({old.name: old})
    await pool.start(session)
    try:
        assert pool.is_registered("r0", "lora-0")
        pool.expect_adapters({NEW.name: NEW})
        assert not pool.is_registered("r0", "lora-0")
        assert "lora-0" not in pool.snapshot("r0").residency.registered
        assert pool.stale_adapters() == {"r0": {"lora-0": old.path}}
        pool.expect_adapters({old.name: old})
        assert pool.is_registered("r0", "lora-0") and pool.stale_adapters() == {}
    finally:
        await pool.stop()


@pytest.mark.parametrize(("max_lora", "slots"), [("3", 3), ("16", 16)])
async def test_a_replica_without_settings_has_as_many_cpu_loras_as_slots(
    stub_vllm: StubVllm, session: aiohttp.ClientSession, max_lora: str, slots: int
) -> None:
    """vLLM's --max-cpu-loras defaults to --max-loras (and may not be smaller); /metrics
    reports only max_lora, so that default is what a replica without settings is assumed
    to have."""
    text = stub_vllm.metrics_text
    stub_vllm.metrics_text = text.replace('max_lora="3"', f'max_lora="{max_lora}"')
    pool = _pool(stub_vllm)
    await pool.start(session)
    try:
        settings = pool.snapshot("r0").settings
        assert (settings.max_loras, settings.max_cpu_loras) == (slots, slots)
    finally:
        await pool.stop()


async def test_a_replica_without_settings_or_lora_metrics_has_consistent_defaults(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    stub_vllm.metrics_text = "\n".join(
        line for line in stub_vllm.metrics_text.splitlines() if "lora_requests_info" not in line
    )
    pool = _pool(stub_vllm)
    await pool.start(session)
    try:
        settings = pool.snapshot("r0").settings
        assert settings.max_cpu_loras == settings.max_loras
    finally:
        await pool.stop()
