"""The load test's pure parts: reading /v1/models, mapping adapters, scaling rates, summing up."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from loragate.core.errors import ConfigError
from loragate.loadtest.fleet import (
    FleetModels,
    TargetError,
    by_popularity,
    map_adapters,
    openai_base,
    parse_models,
    plan_models,
)
from loragate.loadtest.openloop import RequestResult
from loragate.loadtest.scaling import scale_rates
from loragate.loadtest.summary import format_text, summarise
from loragate.workload import Workload, spec_from_mapping


def card(name: str, parent: str | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "owned_by": "vllm", "root": name, "parent": parent}


def test_models_with_a_parent_are_the_adapters_and_their_parent_the_base() -> None:
    doc = {
        "object": "list",
        "data": [card("other"), card("base"), card("b", "base"), card("a", "base")],
    }
    assert parse_models(doc) == FleetModels(
        base_model="base", adapters=("b", "a"), others=("other",)
    )
    assert parse_models({"data": [card("base")]}) == FleetModels(base_model="base", adapters=())
    with pytest.raises(TargetError, match="did not answer an OpenAI model list"):
        parse_models({"models": []})


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://h:1", "http://h:1/v1"),
        ("http://h:1/", "http://h:1/v1"),
        ("http://h:1/v1/", "http://h:1/v1"),
        ("https://h/prefix/v1", "https://h/prefix/v1"),
    ],
)
def test_the_url_may_be_the_root_or_the_openai_base(url: str, base: str) -> None:
    assert openai_base(url) == base


def test_spec_adapters_map_by_popularity_onto_the_fleet_cycling() -> None:
    names = by_popularity(["a0", "a1", "a2", "a3", "a4"], [1.0, 5.0, 3.0, 5.0, 0.5])
    assert names == ["a1", "a3", "a2", "a0", "a4"]  # ties keep spec order
    assert map_adapters(names, ["x", "y"]) == {
        "a1": "x",
        "a3": "y",
        "a2": "x",
        "a0": "y",
        "a4": "x",
    }


def _plan(listing: FleetModels | TargetError, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "models": "auto",
        "base_only": False,
        "base_model": None,
        "listing": listing,
        "spec_adapters": ["s0", "s1", "s2"],
        "spec_has_base": True,
    }
    return plan_models(**{**args, **kw})


def test_models_auto_uses_the_listed_adapters_or_the_base_model() -> None:
    fleet = FleetModels(base_model="base", adapters=("x", "y"))
    plan = _plan(fleet)
    assert (plan.base_model, plan.mapping) == ("base", {"s0": "x", "s1": "y", "s2": "x"})
    bare = _plan(FleetModels(base_model="base", adapters=()))
    assert bare.mapping == {"s0": "base", "s1": "base", "s2": "base"}
    assert any("lists no LoRA adapter" in n for n in bare.notes)
    assert _plan(fleet, base_only=True).mapping == {"s0": "base", "s1": "base", "s2": "base"}


def test_a_failed_listing_stops_auto_but_not_explicit_models_with_a_base() -> None:
    refused = TargetError("GET u answered 401: invalid API key")
    with pytest.raises(TargetError, match="401"):
        _plan(refused)
    with pytest.raises(TargetError, match="pass --base-model"):
        _plan(refused, models="m")
    plan = _plan(refused, models="m, n", base_model="b")
    assert plan.mapping == {"s0": "m", "s1": "n", "s2": "m"}
    assert any(n.startswith("warning: GET u answered 401") for n in plan.notes)
    # No base-model traffic: no base model needed.
    assert _plan(refused, models="m", spec_has_base=False).base_model is None
    with pytest.raises(TargetError, match="--models"):
        _plan(refused, models=" , ")


@pytest.mark.parametrize(
    "arrivals",
    [
        {"process": "poisson", "rate_rps": 10},
        {
            "process": "gamma",
            "cv": 2.0,
            "rate_rps": 10,
            "diurnal": {"period_s": 50, "amplitude": 0.5},
        },
        {
            "process": "poisson",
            "onoff": {"on_s": 10, "off_s": 20, "on_rate_rps": 30, "off_rate_rps": 3},
        },
    ],
)
def test_scaling_multiplies_the_offered_rate(arrivals: dict[str, Any]) -> None:
    spec = spec_from_mapping(
        {
            "name": "s",
            "duration_s": 100,
            "adapters": {"count": 4, "base_fraction": 0.25},
            "arrivals": arrivals,
        }
    )
    before = Workload(spec)
    after = Workload(scale_rates(spec, 2.5))
    assert after.offered_rate_rps == pytest.approx(2.5 * before.offered_rate_rps)
    assert after.adapter_names == before.adapter_names
    assert len(list(after.requests())) > 2 * len(list(before.requests()))


def test_scaling_explicit_per_adapter_rates() -> None:
    spec = spec_from_mapping(
        {
            "name": "s",
            "duration_s": 10,
            "adapters": {
                "count": 2,
                "items": [
                    {"name": "a", "rank": 8, "rate_rps": 2.0},
                    {"name": "b", "rank": 8, "rate_rps": 1.0},
                ],
            },
            "arrivals": {"process": "poisson"},
        }
    )
    scaled = Workload(scale_rates(spec, 0.5))
    assert scaled.mean_rates_rps.tolist() == pytest.approx([1.0, 0.5])
    with pytest.raises(ConfigError, match="must be > 0"):
        scale_rates(spec, 0.0)


def _result(i: int, **kw: Any) -> RequestResult:
    base = RequestResult(
        index=i, adapter="a", endpoint="/completions", scheduled_s=i * 0.1, sent_s=i * 0.1,
        status=200, ttft_s=0.01 * (i + 1), latency_s=0.1 * (i + 1), output_tokens=5, model="m",
    )  # fmt: skip
    return dataclasses.replace(base, **kw)


def test_the_summary_counts_add_up() -> None:
    results = [
        *(_result(i) for i in range(7)),
        _result(7, status=401, error="invalid API key", error_type="http", ttft_s=None, model="n"),
        _result(8, status=0, error="no answer", error_type="timeout", ttft_s=None),
        _result(9, status=200, error="boom", error_type="stream_error", model="n"),
    ]
    s = summarise(results, spec_rps=10.0, window_s=1.0, elapsed_s=2.0, unanswered=2)
    req = s["requests"]
    assert (req["scheduled"], req["sent"], req["ok"], req["failed"]) == (12, 10, 7, 3)
    assert req["by_status"] == {"0": 1, "200": 8, "401": 1}
    assert req["errors_by_type"] == {"HTTP 401": 1, "timeout": 1, "stream_error": 1}
    assert s["rate"]["offered_rps"] == 12.0
    assert s["rate"]["sent_rps"] == 10.0
    assert s["rate"]["ok_rps"] == 3.5
    assert s["output_tokens"] == 35  # successful requests only
    assert s["ttft_ms"]["p50"] == 40.0  # nearest rank over the 7 successes: 10..70 ms
    assert s["e2e_ms"]["p99"] == 700.0
    top = s["models"]["top"]
    assert [(r["model"], r["requests"], r["ok"]) for r in top] == [("m", 8, 7), ("n", 2, 0)]
    text = format_text(s)
    assert "failed 3 (HTTP 401: 1, timeout: 1, stream_error: 1)" in text
    assert "unanswered 2 (not sent before the run's deadline)" in text
    assert "1 x HTTP 401: invalid API key" in text
