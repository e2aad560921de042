"""``GET /metrics`` of the simulated replica, rendered like vLLM 0.32's Prometheus exposition.

The recorded lines (``shared/design/vllm-0.32/transcript_basic.md``) come first, in the
recorded order, with the recorded HELP/TYPE lines (``vllm:num_preemptions_total`` had none);
a few other vLLM counters follow. Numbers are formatted the way prometheus_client does
(``4.0``, ``1.7957982371495411e+09``).

``vllm:lora_requests_info`` keeps vLLM 0.32's quirks: one gauge series per label combination
ever seen, valued with the unix time it was last seen, never removed; ``running_lora_adapters``
and ``waiting_lora_adapters`` carry the same comma-joined list (adapters with scheduled,
unfinished requests, in the order they entered the engine's batch). A reader must take the
series with the largest value as the current state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"


def prom_float(value: float) -> str:
    """A sample value as prometheus_client writes it."""
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class LoraRequestsInfo:
    """The ``vllm:lora_requests_info`` gauge: label combination -> unix time last seen."""

    def __init__(self, *, max_lora: int, wall_time: Callable[[], float] = time.time) -> None:
        self._max_lora = max_lora
        self._wall_time = wall_time
        self._last_seen: dict[str, float] = {}  # insertion order = first time seen

    def observe(self, active_adapters: Sequence[str]) -> None:
        """Record the adapters with in-flight scheduled requests after an engine step."""
        self._last_seen[",".join(active_adapters)] = self._wall_time()

    def series(self) -> list[tuple[str, float]]:
        return list(self._last_seen.items())

    def render(self) -> list[str]:
        lines = [
            "# HELP vllm:lora_requests_info Running stats on lora requests.",
            "# TYPE vllm:lora_requests_info gauge",
        ]
        for adapters, seen in self._last_seen.items():
            label = _escape(adapters)
            lines.append(
                f'vllm:lora_requests_info{{max_lora="{self._max_lora}",'
                f'running_lora_adapters="{label}",waiting_lora_adapters="{label}"}} '
                f"{prom_float(seen)}"
            )
        return lines


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineGauges:
    """The engine state ``/metrics`` exports, sampled at scrape time."""

    num_running: int
    num_waiting: int
    num_deferred: int
    kv_usage: float
    num_preemptions_total: int


@dataclass(slots=True, kw_only=True)
class RequestCounters:
    """Cumulative request counters of the API server."""

    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    success_by_reason: dict[str, int] = field(default_factory=dict)

    def finished(self, reason: str) -> None:
        self.success_by_reason[reason] = self.success_by_reason.get(reason, 0) + 1


def render_metrics(
    *,
    model_name: str,
    gauges: EngineGauges,
    counters: RequestCounters,
    lora_info: LoraRequestsInfo | None,
) -> str:
    """The full ``/metrics`` text (``lora_info`` is None when LoRA is disabled, as in vLLM)."""
    labels = f'engine="0",model_name="{_escape(model_name)}"'
    capacity = max(0, gauges.num_waiting - gauges.num_deferred)
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{labels}}} {prom_float(gauges.num_running)}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{labels}}} {prom_float(gauges.num_waiting)}",
        "# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason. "
        "Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred "
        "by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all "
        "reasons equals vllm:num_requests_waiting.",
        "# TYPE vllm:num_requests_waiting_by_reason gauge",
        f'vllm:num_requests_waiting_by_reason{{{labels},reason="capacity"}} {prom_float(capacity)}',
        f'vllm:num_requests_waiting_by_reason{{{labels},reason="deferred"}} '
        f"{prom_float(gauges.num_deferred)}",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{labels}}} {prom_float(gauges.kv_usage)}",
        f"vllm:num_preemptions_total{{{labels}}} {prom_float(gauges.num_preemptions_total)}",
    ]
    if lora_info is not None:
        lines.extend(lora_info.render())
    lines += [
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{labels}}} {prom_float(counters.prompt_tokens_total)}",
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{labels}}} {prom_float(counters.generation_tokens_total)}",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
    ]
    for reason in ("stop", "length", "abort"):
        count = counters.success_by_reason.get(reason, 0)
        lines.append(
            f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {prom_float(count)}'
        )
    return "\n".join(lines) + "\n"
