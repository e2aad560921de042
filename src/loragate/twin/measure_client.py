"""Client-side measurement against a real vLLM server (``loragate twin measure``).

* :func:`stream_completion` sends one streaming ``/v1/completions`` request with a prompt given
  as token ids (exact input length, no tokenizer needed), ``ignore_eos`` and ``max_tokens``
  (exact output length), ``stream_options.include_usage`` and ``return_token_ids`` (so a chunk
  that carries k tokens is known to carry k). TTFT = first chunk with tokens - send time; the
  inter-token latencies are the gaps between token-carrying chunks, a gap covering k tokens
  counted as k gaps of gap/k.
* :class:`MetricsPoller` samples ``/metrics`` (running/waiting/deferred/KV/preemptions/steps).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True, kw_only=True)
class RequestSpec:
    model: str
    input_tokens: int
    output_tokens: int
    seed: int = 0


@dataclass(kw_only=True)
class RequestResult:
    spec: RequestSpec
    t_send: float
    t_first: float | None = None
    t_last: float | None = None
    t_end: float | None = None
    status: int = 0
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.t_end is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    @property
    def tpot_s(self) -> float | None:
        if self.t_first is None or self.t_last is None or self.completion_tokens < 2:
            return None
        return (self.t_last - self.t_first) / (self.completion_tokens - 1)


def prompt_ids(n_tokens: int, seed: int, vocab: int = 1024) -> list[int]:
    """Random token ids in [16, vocab): avoids the special tokens, defeats prefix reuse."""
    rnd = random.Random(seed)
    return [rnd.randrange(16, vocab) for _ in range(n_tokens)]


async def stream_completion(
    session: aiohttp.ClientSession, base_url: str, spec: RequestSpec, timeout_s: float = 600.0
) -> RequestResult:
    body = {
        "model": spec.model,
        "prompt": prompt_ids(spec.input_tokens, spec.seed),
        "max_tokens": spec.output_tokens,
        "min_tokens": spec.output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    res = RequestResult(spec=spec, t_send=time.perf_counter())
    last: float | None = None
    try:
        async with session.post(
            f"{base_url}/v1/completions",
            json=body,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            res.status = resp.status
            if resp.status != 200:
                res.error = (await resp.text())[:300]
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                now = time.perf_counter()
                msg = json.loads(payload)
                usage = msg.get("usage")
                if usage:
                    res.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    res.completion_tokens = int(usage.get("completion_tokens", 0))
                for ch in msg.get("choices", []):
                    ids = ch.get("token_ids") or []
                    k = len(ids) if ids else (1 if ch.get("text") else 0)
                    if k == 0:
                        continue
                    if last is None:
                        res.t_first = now
                        k -= 1  # the first token has no gap
                        if k > 0:
                            res.itl_s.extend([0.0] * k)
                    else:
                        gap = (now - last) / k
                        res.itl_s.extend([gap] * k)
                    last = now
                    res.t_last = now
            res.t_end = time.perf_counter()
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
    return res


_LINE_RE = re.compile(r"^(vllm:[a-z_]+)(\{[^}]*\})?\s+([-+0-9.eEinfa]+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """The few vLLM gauges/counters the sweeps need (label-less keys; deferred is keyed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE_RE.match(line)
        if not m:
            continue
        name, labels, val = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "vllm:num_requests_waiting_by_reason":
            if 'reason="deferred"' in labels:
                out["deferred"] = val
            continue
        key = {
            "vllm:num_requests_running": "running",
            "vllm:num_requests_waiting": "waiting",
            "vllm:kv_cache_usage_perc": "kv_usage",
            "vllm:num_preemptions_total": "preemptions",
            "vllm:iteration_tokens_total_count": "steps",
            "vllm:iteration_tokens_total_sum": "step_tokens",
            "vllm:generation_tokens_total": "generation_tokens",
            "vllm:prompt_tokens_total": "prompt_tokens",
            "vllm:inter_token_latency_seconds_sum": "itl_sum_s",
            "vllm:inter_token_latency_seconds_count": "itl_count",
            "vllm:time_to_first_token_seconds_sum": "ttft_sum_s",
            "vllm:time_to_first_token_seconds_count": "ttft_count",
        }.get(name)
        if key:
            out[key] = val
    return out


def parse_cache_config(text: str) -> dict[str, str]:
    """Labels of ``vllm:cache_config_info`` (num_gpu_blocks, block_size, kv_cache_size_tokens)."""
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            return dict(re.findall(r'(\w+)="([^"]*)"', line))
    return {}


@dataclass(kw_only=True)
class MetricsPoller:
    """Samples /metrics every ``interval_s`` in the background while a run is going on."""

    session: aiohttp.ClientSession
    base_url: str
    interval_s: float = 0.5
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def sample(self) -> dict[str, float]:
        async with self.session.get(f"{self.base_url}/metrics") as r:
            vals = parse_metrics(await r.text())
        self.samples.append((time.perf_counter(), vals))
        return vals

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await self.sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def window(self, t0: float, t1: float) -> list[dict[str, float]]:
        return [v for t, v in self.samples if t0 <= t <= t1]


async def register_adapter(
    session: aiohttp.ClientSession, base_url: str, name: str, path: str
) -> tuple[int, float, str]:
    """POST /v1/load_lora_adapter; returns (status, latency_s, body)."""
    t0 = time.perf_counter()
    async with session.post(
        f"{base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
    ) as r:
        body = await r.read()
        return r.status, time.perf_counter() - t0, body.decode(errors="replace")


def load_average() -> float:
    return os.getloadavg()[0]
