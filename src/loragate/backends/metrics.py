"""Parse a vLLM 0.32 ``/metrics`` page (Prometheus text format) into the load signals routing uses.

Quirks handled (see ``shared/design/VLLM_API.md`` §4.6):

* ``vllm:lora_requests_info`` is a gauge whose *value* is the unix time at which a label set was
  last seen, and every label set ever seen stays exported. The current state is the series with
  the **largest value**, not the last line.
* Its ``running_lora_adapters`` and ``waiting_lora_adapters`` carry the same list in 0.32; they
  name adapters with requests in flight, not resident adapters.
* Gauges carry an ``engine`` label; with several engines (data parallel) counts are summed and
  KV usage is averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

from loragate.core.errors import UpstreamProtocolError

_PREFIX = "vllm:"
_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_WAITING_BY_REASON = "vllm:num_requests_waiting_by_reason"
_KV_USAGE = "vllm:kv_cache_usage_perc"
_PREEMPTIONS = "vllm:num_preemptions_total"
_LORA_INFO = "vllm:lora_requests_info"
_GENERATION = "vllm:generation_tokens_total"


@dataclass(frozen=True, slots=True, kw_only=True)
class VllmMetrics:
    """The load signals of one replica at one scrape."""

    num_running: int = 0
    num_waiting: int = 0
    num_deferred: int = 0
    kv_usage: float = 0.0
    num_preemptions: int = 0
    # vllm:generation_tokens_total: > 0 once the engine has run a step that generated.
    generation_tokens: int = 0
    # From the current ``vllm:lora_requests_info`` series (None when the metric is absent).
    max_loras: int | None = None
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    lora_info_seen_at_unix_s: float | None = None

    @property
    def active_adapters(self) -> frozenset[str]:
        return frozenset(self.running_adapters) | frozenset(self.waiting_adapters)


def parse_labels(text: str, line: str) -> dict[str, str]:
    """Parse the inside of ``{...}``: ``a="x",b="y\\"z"`` (escapes ``\\\\``, ``\\"``, ``\\n``)."""
    labels: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        if i >= n:
            break
        eq = text.find("=", i)
        if eq < 0 or eq + 1 >= n or text[eq + 1] != '"':
            raise UpstreamProtocolError(f"bad label set in metrics line: {line!r}")
        name = text[i:eq].strip()
        j = eq + 2
        chars: list[str] = []
        while True:
            if j >= n:
                raise UpstreamProtocolError(f"unterminated label value in: {line!r}")
            c = text[j]
            if c == "\\" and j + 1 < n:
                nxt = text[j + 1]
                chars.append("\n" if nxt == "n" else nxt)
                j += 2
            elif c == '"':
                j += 1
                break
            else:
                chars.append(c)
                j += 1
        labels[name] = "".join(chars)
        i = j
    return labels


def _split_sample(line: str) -> tuple[str, str, float]:
    """``name{labels} value [ts]`` -> (name, raw labels, value)."""
    brace = line.find("{")
    if brace >= 0:
        close = line.rfind("}")
        if close < brace:
            raise UpstreamProtocolError(f"bad metrics line: {line!r}")
        name, labels, rest = line[:brace], line[brace + 1 : close], line[close + 1 :]
    else:
        name, _, rest = line.partition(" ")
        labels = ""
    parts = rest.split()
    if not parts:
        raise UpstreamProtocolError(f"metrics line without a value: {line!r}")
    try:
        value = float(parts[0])
    except ValueError as exc:
        raise UpstreamProtocolError(f"bad metrics value in: {line!r}") from exc
    return name.strip(), labels, value


def _adapter_list(value: str) -> tuple[str, ...]:
    return tuple(a for a in value.split(",") if a)


def parse_vllm_metrics(text: str) -> VllmMetrics:
    """Extract :class:`VllmMetrics` from a ``/metrics`` page; other metrics are skipped."""
    running = waiting = deferred = preemptions = generated = 0.0
    kv_total, kv_count = 0.0, 0
    lora_best: tuple[float, str, str] | None = None  # (seen_at, raw labels, line)
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith(_PREFIX):
            continue  # comments, blank lines and other families
        name, labels, value = _split_sample(line)
        if name == _RUNNING:
            running += value
        elif name == _WAITING:
            waiting += value
        elif name == _WAITING_BY_REASON:
            if parse_labels(labels, line).get("reason") == "deferred":
                deferred += value
        elif name == _KV_USAGE:
            kv_total += value
            kv_count += 1
        elif name == _PREEMPTIONS:
            preemptions += value
        elif name == _GENERATION:
            generated += value
        elif name == _LORA_INFO and (lora_best is None or value > lora_best[0]):
            lora_best = (value, labels, line)
    max_loras: int | None = None
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    seen_at: float | None = None
    if lora_best is not None:
        seen_at, labels, line = lora_best
        parsed = parse_labels(labels, line)
        raw_max = parsed.get("max_lora", "")
        max_loras = int(raw_max) if raw_max.isdigit() else None
        running_adapters = _adapter_list(parsed.get("running_lora_adapters", ""))
        waiting_adapters = _adapter_list(parsed.get("waiting_lora_adapters", ""))
    return VllmMetrics(
        num_running=int(running),
        num_waiting=int(waiting),
        num_deferred=int(deferred),
        kv_usage=kv_total / kv_count if kv_count else 0.0,
        num_preemptions=int(preemptions),
        generation_tokens=int(generated),
        max_loras=max_loras,
        running_adapters=running_adapters,
        waiting_adapters=waiting_adapters,
        lora_info_seen_at_unix_s=seen_at,
    )
