from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from loragate.twin.vllm_metrics import (
    EngineGauges,
    LoraRequestsInfo,
    RequestCounters,
    prom_float,
    render_metrics,
)

GAUGES = EngineGauges(
    num_running=4,
    num_waiting=3,
    num_deferred=2,
    kv_usage=0.0019536019536019467,
    num_preemptions_total=1,
)


class FakeWallTime:
    """A settable unix clock (plain object, not a mock)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_prom_float_matches_recorded_formatting() -> None:
    assert prom_float(4) == "4.0"
    assert prom_float(0.0019536019536019467) == "0.0019536019536019467"
    assert prom_float(1795798237.177636) == "1.795798237177636e+09"


def test_recorded_lines_and_order() -> None:
    text = render_metrics(
        model_name="tiny-llama", gauges=GAUGES, counters=RequestCounters(), lora_info=None
    )
    lines = text.splitlines()
    expected = [
        'vllm:num_requests_running{engine="0",model_name="tiny-llama"} 4.0',
        'vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 3.0',
        "vllm:num_requests_waiting_by_reason"
        '{engine="0",model_name="tiny-llama",reason="capacity"} 1.0',
        "vllm:num_requests_waiting_by_reason"
        '{engine="0",model_name="tiny-llama",reason="deferred"} 2.0',
        'vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.0019536019536019467',
        'vllm:num_preemptions_total{engine="0",model_name="tiny-llama"} 1.0',
    ]
    positions = [lines.index(line) for line in expected]
    assert positions == sorted(positions)
    assert "# TYPE vllm:num_requests_waiting_by_reason gauge" in lines
    assert "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage." in lines
    assert "lora_requests_info" not in text  # only exported with LoRA enabled


def test_lora_requests_info_keeps_every_combination_valued_by_last_seen_time() -> None:
    clock = FakeWallTime(1795798229.6518128)
    info = LoraRequestsInfo(max_lora=2, wall_time=clock)
    info.observe(["lora-0"])
    clock.t += 1.0
    info.observe([])
    clock.t += 1.0
    info.observe(["lora-0", "lora-1"])
    clock.t += 1.0
    info.observe([])  # seen again: value moves, position stays
    text = render_metrics(
        model_name="tiny-llama", gauges=GAUGES, counters=RequestCounters(), lora_info=info
    )
    series = re.findall(
        r'vllm:lora_requests_info\{max_lora="2",running_lora_adapters="([^"]*)",'
        r'waiting_lora_adapters="([^"]*)"\} (\S+)',
        text,
    )
    assert [s[0] for s in series] == ["lora-0", "", "lora-0,lora-1"]
    assert all(running == waiting for running, waiting, _ in series)
    newest = max(series, key=lambda s: float(s[2]))
    assert newest[0] == ""
    assert "# HELP vllm:lora_requests_info Running stats on lora requests." in text


def test_output_parses_as_prometheus_text() -> None:
    info = LoraRequestsInfo(max_lora=2)
    info.observe(["a"])
    counters = RequestCounters(prompt_tokens_total=12, generation_tokens_total=30)
    counters.finished("length")
    text = render_metrics(model_name="m", gauges=GAUGES, counters=counters, lora_info=info)
    samples = {
        (s.name, s.labels.get("finished_reason", s.labels.get("reason", ""))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("vllm:num_requests_running", "")] == 4.0
    assert samples[("vllm:num_requests_waiting_by_reason", "deferred")] == 2.0
    assert samples[("vllm:generation_tokens_total", "")] == 30.0
    assert samples[("vllm:request_success_total", "length")] == 1.0
