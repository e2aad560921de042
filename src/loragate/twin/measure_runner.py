"""Load drivers (closed loop with fixed concurrency, open loop from an arrival schedule) and the
summary of one run in the column names of the BSC calibration/validation CSVs."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from loragate.twin.measure_client import (
    MetricsPoller,
    RequestResult,
    RequestSpec,
    load_average,
    stream_completion,
)

Row = dict[str, object]
CpuProbe = Callable[[], dict[str, float]]
# extra per-run columns: server-side latency histograms and CPU time of the server processes
EXTRA_COLS = (
    "itl_server_mean_ms",
    "ttft_server_mean_ms",
    "worker_cpu_ms_per_step",
    "engine_cpu_ms_per_step",
    "worker_cpu_util",
    "worker_cpu_s",
    "engine_cpu_s",
    "api_cpu_s",
)


def _no_cpu() -> dict[str, float]:
    return {}


@dataclass(frozen=True, kw_only=True)
class TimedRequest:
    """One request of an open-loop schedule: sent ``t_arrival_s`` after the run starts."""

    t_arrival_s: float
    spec: RequestSpec


@dataclass(kw_only=True)
class RunOutcome:
    results: list[RequestResult]
    t0: float
    t1: float
    samples: list[dict[str, float]]
    before: dict[str, float]
    after: dict[str, float]
    load_start: float
    load_end: float
    cpu_before: dict[str, float] = field(default_factory=dict)
    cpu_after: dict[str, float] = field(default_factory=dict)


def _connector() -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=0, force_close=False)


async def run_closed_loop(
    base_url: str,
    *,
    concurrency: int,
    n_requests: int,
    models: Sequence[str],
    input_tokens: int,
    output_tokens: int,
    seed: int,
    min_duration_s: float = 0.0,
    max_requests: int = 100_000,
    poll_s: float = 0.2,
    cpu_probe: CpuProbe = _no_cpu,
) -> RunOutcome:
    """``concurrency`` workers; worker w always uses ``models[w % len(models)]`` so every batch
    holds min(len(models), concurrency) distinct adapters. Requests go in waves of
    ``concurrency``; a new wave opens while fewer than ``n_requests`` were sent or less than
    ``min_duration_s`` has passed (and fewer than ``max_requests``). With equal lengths the
    workers stay in lock-step."""
    async with aiohttp.ClientSession(connector=_connector()) as session:
        poller = MetricsPoller(session=session, base_url=base_url, interval_s=poll_s)
        before = await poller.sample()
        sent = 0
        results: list[RequestResult] = []
        t_start = time.perf_counter()

        wave_open = True

        def take() -> int | None:
            # decided once per wave of ``concurrency`` requests, so the last wave is full
            nonlocal sent, wave_open
            if sent % concurrency == 0:
                elapsed = time.perf_counter() - t_start
                wave_open = (sent < n_requests or elapsed < min_duration_s) and sent < max_requests
            if not wave_open:
                return None
            sent += 1
            return sent - 1

        async def worker(w: int) -> None:
            while (i := take()) is not None:
                spec = RequestSpec(
                    model=models[w % len(models)],
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    seed=seed * 100_003 + i,
                )
                results.append(await stream_completion(session, base_url, spec))

        load0 = load_average()
        cpu0 = cpu_probe()
        poller.start()
        t0 = t_start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        t1 = time.perf_counter()
        cpu1 = cpu_probe()
        await poller.stop()
        after = await poller.sample()
        return RunOutcome(
            results=results,
            t0=t0,
            t1=t1,
            samples=poller.window(t0, t1),
            before=before,
            after=after,
            load_start=load0,
            load_end=load_average(),
            cpu_before=cpu0,
            cpu_after=cpu1,
        )


async def run_open_loop(
    base_url: str,
    schedule: Sequence[TimedRequest],
    *,
    window_s: float,
    poll_s: float = 1.0,
    cpu_probe: CpuProbe = _no_cpu,
) -> RunOutcome:
    """Send each request at its arrival time; at ``window_s`` cancel what is still running
    (those requests count as not completed, as in the BSC 1-hour runs)."""
    async with aiohttp.ClientSession(connector=_connector()) as session:
        poller = MetricsPoller(session=session, base_url=base_url, interval_s=poll_s)
        before = await poller.sample()
        results: dict[int, RequestResult] = {}

        async def one(i: int, tr: TimedRequest, t0: float) -> None:
            delay = t0 + tr.t_arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            results[i] = RequestResult(spec=tr.spec, t_send=time.perf_counter())
            results[i] = await stream_completion(session, base_url, tr.spec)

        load0 = load_average()
        cpu0 = cpu_probe()
        poller.start()
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(one(i, tr, t0))
            for i, tr in enumerate(schedule)
            if tr.t_arrival_s < window_s
        ]
        _, pending = await asyncio.wait(tasks, timeout=window_s)
        t1 = time.perf_counter()
        cpu1 = cpu_probe()
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await poller.stop()
        after = await poller.sample()
        ordered = [results[i] for i in sorted(results)]
        for r in ordered:
            if r.t_end is None or r.t_end > t1:
                r.error = r.error or "cancelled at window end"
        return RunOutcome(
            results=ordered,
            t0=t0,
            t1=t1,
            samples=poller.window(t0, t1),
            before=before,
            after=after,
            load_start=load0,
            load_end=load_average(),
            cpu_before=cpu0,
            cpu_after=cpu1,
        )


def _ms(xs: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    if not xs:
        return None, None, None
    a = np.asarray(xs) * 1000.0
    return float(a.mean()), float(np.median(a)), float(np.percentile(a, 99))


def summarize(out: RunOutcome, *, duration_s: float | None = None) -> Row:
    """Columns shared by base_latency / lora_overhead / real_runs (BSC names)."""
    ok = [r for r in out.results if r.ok]
    dur = duration_s if duration_s is not None else out.t1 - out.t0
    itl = [g for r in ok for g in r.itl_s]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    tin = sum(r.prompt_tokens for r in ok)
    tout = sum(r.completion_tokens for r in ok)
    itl_mean, itl_med, itl_p99 = _ms(itl)
    ttft_mean, ttft_med, ttft_p99 = _ms(ttft)
    tpot_mean, tpot_med, tpot_p99 = _ms(tpot)
    run = [s.get("running", 0.0) for s in out.samples]
    wait = [s.get("waiting", 0.0) for s in out.samples]
    deferred = [s.get("deferred", 0.0) for s in out.samples]
    kv = [s.get("kv_usage", 0.0) for s in out.samples]

    def delta(key: str) -> float:
        return out.after.get(key, 0.0) - out.before.get(key, 0.0)

    steps = delta("steps")
    step_tok = delta("step_tokens")
    cpu = {k: out.cpu_after[k] - out.cpu_before.get(k, 0.0) for k in out.cpu_after}
    srv_itl_n, srv_ttft_n = delta("itl_count"), delta("ttft_count")
    return {
        "requests_sent": len(out.results),
        "completed": len(ok),
        "failed": len(out.results) - len(ok),
        "duration_s": dur,
        "mean_running_batch": statistics.fmean(run) if run else None,
        "max_running_batch": max(run) if run else None,
        "mean_waiting": statistics.fmean(wait) if wait else None,
        "max_waiting": max(wait) if wait else None,
        "mean_deferred": statistics.fmean(deferred) if deferred else None,
        "max_deferred": max(deferred) if deferred else None,
        "mean_kv_usage": statistics.fmean(kv) if kv else None,
        "max_kv_usage": max(kv) if kv else None,
        "preemptions": out.after.get("preemptions", 0.0) - out.before.get("preemptions", 0.0),
        "metrics_samples": len(out.samples),
        "itl_mean_ms": itl_mean,
        "itl_median_ms": itl_med,
        "itl_p99_ms": itl_p99,
        "tpot_mean_ms": tpot_mean,
        "tpot_median_ms": tpot_med,
        "tpot_p99_ms": tpot_p99,
        "ttft_mean_ms": ttft_mean,
        "ttft_median_ms": ttft_med,
        "ttft_p99_ms": ttft_p99,
        "total_input_tokens": tin,
        "total_output_tokens": tout,
        "request_throughput": len(ok) / dur if dur > 0 else None,
        "input_throughput": tin / dur if dur > 0 else None,
        "output_throughput": tout / dur if dur > 0 else None,
        "throughput_tok_s": (tin + tout) / dur if dur > 0 else None,
        "n_steps": int(steps),
        "mean_step_interval_ms": dur * 1000.0 / steps if steps > 0 else None,
        "mean_tokens_per_step": step_tok / steps if steps > 0 else None,
        "itl_server_mean_ms": delta("itl_sum_s") * 1000.0 / srv_itl_n if srv_itl_n else None,
        "ttft_server_mean_ms": (delta("ttft_sum_s") * 1000.0 / srv_ttft_n if srv_ttft_n else None),
        "worker_cpu_s": cpu.get("worker"),
        "engine_cpu_s": cpu.get("engine"),
        "api_cpu_s": cpu.get("api"),
        "worker_cpu_ms_per_step": (
            cpu["worker"] * 1000.0 / steps if steps > 0 and "worker" in cpu else None
        ),
        "engine_cpu_ms_per_step": (
            cpu["engine"] * 1000.0 / steps if steps > 0 and "engine" in cpu else None
        ),
        "worker_cpu_util": cpu["worker"] / dur if "worker" in cpu and dur > 0 else None,
        "loadavg_1m_start": out.load_start,
        "loadavg_1m_end": out.load_end,
    }


def median_rows(rows: Sequence[Row]) -> Row:
    """Merge repetitions: median of every numeric column, first value otherwise."""
    merged: Row = {}
    for key in rows[0]:
        vals = [r.get(key) for r in rows]
        nums = [v for v in vals if isinstance(v, int | float) and not isinstance(v, bool)]
        if nums and len(nums) == len(vals):
            med = float(np.median(np.asarray(nums, dtype=float)))
            merged[key] = (
                int(med) if all(isinstance(v, int) for v in nums) and med.is_integer() else med
            )
        else:
            merged[key] = vals[0]
    merged["n_reps"] = len(rows)
    return merged
