"""The gateway's own event-loop lag in ``/metrics``: a TTFT tail the host's CPU causes (the
gateway's loop starved or blocked) told apart from one the replicas cause.

The gateway runs in-process over loopback; the test blocks the event loop they share itself
(as tests/state/test_resync_under_load.py does), so no route of the gateway does. The only
bounds asserted are looser than the block caused: a 0.6 s block with a check every 0.1 s
wakes the check at least 0.5 s late, so one observation lands above the 0.25 s bucket."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from gateway_harness import ScriptedReplica, gateway_config, serving, wait_until
from prometheus_client.parser import text_string_to_metric_families

from loragate.core.config import config_from_mapping
from loragate.core.errors import ConfigError
from loragate.gateway import running_gateway

LAG_LOG = "loragate.gateway.loop_lag"
BLOCK_S = 0.6


@pytest.fixture
async def replica() -> AsyncIterator[ScriptedReplica]:
    rep = ScriptedReplica("r0")
    async with serving(rep.app) as (url, _):
        rep.url = url
        yield rep


async def _lag(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The lag series: each bucket's cumulative count by its bound, ``count`` and ``max``."""
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "loragate_event_loop_lag_seconds_bucket":
                out[s.labels["le"]] = s.value
            elif s.name == "loragate_event_loop_lag_seconds_count":
                out["count"] = s.value
            elif s.name == "loragate_event_loop_lag_max_seconds":
                out["max"] = s.value
    return out


async def _lag_until(
    http: aiohttp.ClientSession, url: str, done: Callable[[dict[str, float]], bool]
) -> dict[str, float]:
    """The lag series once ``done`` holds for them (bounded: 10 s)."""
    for _ in range(200):
        lag = await _lag(http, url)
        if done(lag):
            return lag
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out; the lag series: {lag}")


async def test_a_blocked_event_loop_shows_in_metrics_and_the_log(
    replica: ScriptedReplica, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LAG_LOG)
    config = gateway_config(
        [replica.url], metrics={"loop_lag_interval_s": 0.1, "loop_lag_warning_s": 0.3}
    )
    async with (
        running_gateway(config, port=0) as gw,
        aiohttp.ClientSession() as http,
    ):
        # The check runs (it has woken twice: it sleeps again now).
        before = await _lag_until(http, gw.url, lambda lag: lag["count"] >= 2)
        assert not [r for r in caplog.records if r.name == LAG_LOG]
        # The gateway's event loop is this test's: hold it.
        time.sleep(BLOCK_S)  # noqa: ASYNC251 - the stall is the point
        after = await _lag_until(http, gw.url, lambda lag: lag["count"] > before["count"])
        above = after["count"] - after["0.25"]
        assert above - (before["count"] - before["0.25"]) >= 1, (before, after)
        assert after["max"] >= 0.25, after
        assert after["+Inf"] == after["count"]
        await wait_until(lambda: [r for r in caplog.records if r.name == LAG_LOG], "the WARNING")
    lines = [r for r in caplog.records if r.name == LAG_LOG]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # at most one a minute
    assert lines[0].levelno == logging.WARNING
    message = lines[0].getMessage()
    assert message.startswith("event loop lag: the gateway's event loop ran "), message
    assert " s late (it checks every 0.1 s, metrics.loop_lag_interval_s)" in message
    assert "short of CPU" in message and "not a replica's doing" in message
    # Cancelled with the app: no task left behind.
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "loragate-loop-lag"]


async def test_an_idle_gateway_shows_the_lag_from_zero_and_logs_nothing(
    replica: ScriptedReplica, caplog: pytest.LogCaptureFixture
) -> None:
    """The series are there from the start (the default interval, 0.25 s)."""
    caplog.set_level(logging.WARNING, logger=LAG_LOG)
    async with (
        running_gateway(gateway_config([replica.url]), port=0) as gw,
        aiohttp.ClientSession() as http,
    ):
        lag = await _lag(http, gw.url)
        assert gw.gateway.config.metrics.loop_lag_interval_s == 0.25
    assert {"0.001", "0.25", "10.0", "+Inf", "count", "max"} <= lag.keys(), lag
    assert not [r for r in caplog.records if r.name == LAG_LOG]


@pytest.mark.parametrize("key", ["loop_lag_interval_s", "loop_lag_warning_s"])
@pytest.mark.parametrize("value", [0, -1, "fast"])
def test_the_settings_must_be_positive_seconds(key: str, value: object) -> None:
    doc = {"base_model": "m", "replicas": [{"url": "http://127.0.0.1:1"}], "metrics": {key: value}}
    with pytest.raises(ConfigError) as exc:
        config_from_mapping(doc)
    assert exc.value.key == f"metrics.{key}"
    assert "number of seconds" in str(exc.value), exc.value


def test_the_settings_sit_beside_the_metrics_token() -> None:
    metrics = {"token": "scrape-me", "loop_lag_interval_s": 0.5, "loop_lag_warning_s": 2}
    doc = {"base_model": "m", "replicas": [{"url": "http://127.0.0.1:1"}], "metrics": metrics}
    got = config_from_mapping(doc, environ={}).metrics
    assert (got.token, got.loop_lag_interval_s, got.loop_lag_warning_s) == ("scrape-me", 0.5, 2.0)
