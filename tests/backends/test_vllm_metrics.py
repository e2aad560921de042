# ruff: noqa: E501  (recorded metric lines are long)
"""/metrics parsing against pages recorded from vLLM 0.32 (shared/design/vllm-0.32/)."""

from __future__ import annotations

import pytest

from loragate.backends.metrics import parse_labels, parse_vllm_metrics
from loragate.core.errors import UpstreamProtocolError

# Recorded while 6 long requests ran on 3 adapters with max_loras=2 (transcript_basic.md).
DEFERRED_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 2.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny-llama",reason="capacity"} 0.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny-llama",reason="deferred"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.0019536019536019467
vllm:num_preemptions_total{engine="0",model_name="tiny-llama"} 0.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-0",waiting_lora_adapters="lora-0"} 1.795798237177636e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7957982371495411e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-1",waiting_lora_adapters="lora-1"} 1.7957982297588255e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-0,lora-1",waiting_lora_adapters="lora-0,lora-1"} 1.7957982386576436e+09
"""

# Recorded at the end of the session, idle: the newest series is the empty one on the second
# line (1795798242.517 > lora-2's 1795798242.506), although lora-2's line comes last.
END_PAGE = """\
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 0.0
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-0",waiting_lora_adapters="lora-0"} 1.795798237177636e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7957982425174384e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-1",waiting_lora_adapters="lora-1"} 1.7957982297588255e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-0,lora-1",waiting_lora_adapters="lora-0,lora-1"} 1.7957982402808375e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-2",waiting_lora_adapters="lora-2"} 1.795798242505873e+09
"""

# Idle page: the newest series is the empty one (second line), not the last line.
IDLE_PAGE = """\
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 0.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-0",waiting_lora_adapters="lora-0"} 1.7957982296518128e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7957982297892137e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-1",waiting_lora_adapters="lora-1"} 1.7957982297588255e+09
"""


def test_load_signals_and_current_lora_series() -> None:
    m = parse_vllm_metrics(DEFERRED_PAGE)
    assert (m.num_running, m.num_waiting, m.num_deferred) == (4, 2, 2)
    assert m.kv_usage == pytest.approx(0.0019536019536019467)
    assert m.max_loras == 2
    assert m.running_adapters == ("lora-0", "lora-1")
    assert m.active_adapters == frozenset({"lora-0", "lora-1"})
    assert m.lora_info_seen_at_unix_s == pytest.approx(1.7957982386576436e09)


def test_current_series_is_the_largest_value_not_the_last_line() -> None:
    end = parse_vllm_metrics(END_PAGE)
    assert end.running_adapters == () and end.waiting_adapters == ()
    assert end.lora_info_seen_at_unix_s == pytest.approx(1.7957982425174384e09)
    idle = parse_vllm_metrics(IDLE_PAGE)
    assert idle.running_adapters == () and idle.active_adapters == frozenset()
    assert idle.lora_info_seen_at_unix_s == pytest.approx(1.7957982297892137e09)


def test_engines_are_summed_and_kv_averaged() -> None:
    page = """\
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="deferred"} 1.0
vllm:num_requests_waiting_by_reason{engine="1",model_name="m",reason="deferred"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4
"""
    m = parse_vllm_metrics(page)
    assert m.num_running == 5 and m.num_deferred == 5
    assert m.kv_usage == pytest.approx(0.3)
    assert m.max_loras is None  # no lora metric on a replica without LoRA


def test_label_escapes() -> None:
    labels = parse_labels(r'a="x\"y",b="c\\d",c="e\nf",d="g,h"', "line")
    assert labels == {"a": 'x"y', "b": "c\\d", "c": "e\nf", "d": "g,h"}


@pytest.mark.parametrize(
    "line",
    [
        'vllm:num_requests_running{engine="0"}',
        'vllm:num_requests_running{engine="0"} NaNx',
        'vllm:num_requests_waiting_by_reason{reason="deferred} 1.0',
    ],
)
def test_broken_lines_raise(line: str) -> None:
    with pytest.raises(UpstreamProtocolError):
        parse_vllm_metrics(line)
