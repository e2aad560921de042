"""The gateway's Prometheus output: plain per-request counters rendered at scrape time."""

from __future__ import annotations

import re
from typing import get_args

from loragate.gateway.telemetry import ROUTED_RESIDENCIES, RoutedResidency, Telemetry


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample ``name{labels}`` (label order as rendered does not matter)."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_:]+)\{(.*)\} (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if got == labels:
            return float(m.group(3))
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def _telemetry() -> Telemetry:
    t = Telemetry()
    t.bind_state(
        in_flight=lambda: {"r0": 2, "r1": 0},
        healthy=lambda: {"r0": True, "r1": False},
        adapter_loads=lambda: {"r0": 3, "r1": 0},
    )
    return t


def test_request_counter_by_adapter_replica_and_status() -> None:
    t = _telemetry()
    for _ in range(3):
        t.count("lora-0", "r0", "200")
    t.count("", "", "404")
    text = t.render().decode()
    assert (
        _sample(text, "loragate_requests_total", adapter="lora-0", replica="r0", status="200") == 3
    )
    assert _sample(text, "loragate_requests_total", adapter="", replica="", status="404") == 1
    assert "loragate_requests_created" not in text


def test_histogram_buckets_are_cumulative_and_bounds_inclusive() -> None:
    t = _telemetry()
    for seconds in (0.001, 0.005, 0.02, 0.3, 500.0):  # 0.005 sits exactly on a bound
        t.observe_latency("r0", seconds)
    text = t.render().decode()
    name = "loragate_upstream_latency_seconds_bucket"
    assert _sample(text, name, replica="r0", le="0.005") == 2
    assert _sample(text, name, replica="r0", le="0.01") == 2
    assert _sample(text, name, replica="r0", le="0.025") == 3
    assert _sample(text, name, replica="r0", le="0.5") == 4
    assert _sample(text, name, replica="r0", le="120.0") == 4
    assert _sample(text, name, replica="r0", le="+Inf") == 5
    assert _sample(text, "loragate_upstream_latency_seconds_count", replica="r0") == 5
    total = _sample(text, "loragate_upstream_latency_seconds_sum", replica="r0")
    assert abs(total - 500.326) < 1e-9


def test_ttft_is_separate_from_latency_and_gauges_are_read_at_scrape_time() -> None:
    t = _telemetry()
    t.observe_ttft("r1", 0.04)
    text = t.render().decode()
    assert _sample(text, "loragate_ttft_seconds_count", replica="r1") == 1
    assert _sample(text, "loragate_ttft_seconds_bucket", replica="r1", le="0.025") == 0
    assert _sample(text, "loragate_ttft_seconds_bucket", replica="r1", le="0.05") == 1
    assert "loragate_upstream_latency_seconds_count" not in text  # nothing observed yet
    assert _sample(text, "loragate_in_flight_requests", replica="r0") == 2
    assert _sample(text, "loragate_replica_healthy", replica="r1") == 0
    assert _sample(text, "loragate_adapter_loads_total", replica="r0") == 3


def test_every_routed_residency_has_its_ttft_histogram() -> None:
    """observe_ttft's lookup is total: its label type (checked by mypy) is exactly the keys."""
    labels = {a for arg in get_args(RoutedResidency) for a in get_args(arg)}
    t = Telemetry()
    assert labels == set(ROUTED_RESIDENCIES) == set(t._ttft_residency)
    for label in ROUTED_RESIDENCIES:
        t.observe_ttft("r1", 0.01, label)
    assert all(h.counts[1] == 1 for h in t._ttft_residency.values())
