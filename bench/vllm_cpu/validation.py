"""Validation runs on real vLLM CPU replicas: open-loop multi-adapter workloads unlike the
calibration sweeps, in the columns of ``shared/data/bsc-vllm-lora/validation/real_runs.csv``.

Workload generation (exactly what a replay must reproduce; every request is also written to
``validation/requests.csv``):
  * adapters a0..a{N-1}; adapter i has rank ``ranks[i]`` and Poisson rate ``rates[i]`` (req/s).
  * arrivals: ``rng = numpy.random.default_rng(seed)``; for i = 0..N-1 in order, draw
    exponential gaps ``rng.exponential(1/rate_i)`` and keep the arrivals < window_s.
    All requests are then sorted by arrival time (stable).
  * lengths: ``rng2 = default_rng(seed + 1)``; per request in sorted order, input =
    clip(round(exp(normal(ln(input_median), input_sigma))), input_min, input_max), then output
    the same way with the output parameters, then output = min(output, max_model_len - input).
  * requests: prompt of ``input`` random token ids, ``max_tokens = min_tokens = output`` with
    ``ignore_eos`` (exact output lengths), greedy, streaming.
  * before the run the adapters are registered with POST /v1/load_lora_adapter in order
    a0..a{N-1} (each load goes to the CPU LRU cache of max_cpu_loras entries, so the last
    max_cpu_loras registered are CPU-resident at t=0; no adapter is in a GPU slot).
  * at ``window_s`` requests still running are cancelled and not counted (as the BSC runs);
    duration_s = window_s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np

from loragate.twin.measure_client import RequestSpec, parse_metrics, register_adapter
from loragate.twin.measure_runner import EXTRA_COLS, Row, TimedRequest, run_open_loop, summarize

from .replica import Replica, ReplicaConfig, adapter_dirs, start_replica

MODEL = "tiny-llama-cpu"
Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class LengthDist:
    input_median: float = 64.0
    input_sigma: float = 0.9
    input_min: int = 4
    input_max: int = 384
    output_median: float = 32.0
    output_sigma: float = 0.9
    output_min: int = 2
    output_max: int = 256


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    rates_rps: tuple[float, ...]
    ranks: tuple[int, ...]
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 512
    window_s: float = 90.0
    lengths: LengthDist = LengthDist()
    seed: int = 0

    def server(self) -> ReplicaConfig:
        return ReplicaConfig(
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=self.max_lora_rank,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
        )


HEAVY = LengthDist(input_sigma=1.2, output_median=24.0, output_sigma=1.2)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="v1_deferral_4ad",
        rates_rps=(1.0, 2.0, 1.0, 2.0),
        ranks=(8, 16, 8, 16),
        max_loras=2,
        max_cpu_loras=4,
        seed=11,
    ),
    Scenario(
        name="v2_cpu_pressure_8ad",
        rates_rps=(0.25, 0.5) * 4,
        ranks=(8, 16) * 4,
        max_loras=2,
        max_cpu_loras=4,
        seed=12,
    ),
    Scenario(
        name="v3_heavy_tail_2ad",
        rates_rps=(3.0, 3.0),
        ranks=(8, 16),
        max_loras=2,
        max_cpu_loras=4,
        lengths=HEAVY,
        seed=13,
    ),
    Scenario(
        name="v4_many_8ad",
        rates_rps=(1.0, 2.0) * 4,
        ranks=(16, 8) * 4,
        max_loras=4,
        max_cpu_loras=8,
        seed=14,
    ),
    Scenario(
        name="v5_skewed_16ad",
        rates_rps=(2.0, 2.0, 1.0, 1.0) + (0.5,) * 4 + (0.25,) * 8,
        ranks=(8, 16) * 8,
        max_loras=4,
        max_cpu_loras=8,
        seed=15,
    ),
    Scenario(
        name="v6_overload_8ad",
        rates_rps=(2.5, 5.0) * 4,
        ranks=(8, 16) * 4,
        max_loras=4,
        max_cpu_loras=8,
        seed=16,
    ),
)


@dataclass(frozen=True, kw_only=True)
class PlannedRequest:
    t_arrival_s: float
    adapter: int
    input_tokens: int
    output_tokens: int


def _lognormal_int(rng: np.random.Generator, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(math.exp(rng.normal(math.log(median), sigma))))))


def plan_requests(sc: Scenario) -> list[PlannedRequest]:
    rng = np.random.default_rng(sc.seed)
    arrivals: list[tuple[float, int]] = []
    for i, rate in enumerate(sc.rates_rps):
        t = 0.0
        while True:
            t += float(rng.exponential(1.0 / rate))
            if t >= sc.window_s:
                break
            arrivals.append((t, i))
    arrivals.sort(key=lambda x: x[0])
    rng2 = np.random.default_rng(sc.seed + 1)
    ln = sc.lengths
    out = []
    for t, i in arrivals:
        inp = _lognormal_int(rng2, ln.input_median, ln.input_sigma, ln.input_min, ln.input_max)
        outp = _lognormal_int(rng2, ln.output_median, ln.output_sigma, ln.output_min, ln.output_max)
        out.append(
            PlannedRequest(
                t_arrival_s=t,
                adapter=i,
                input_tokens=inp,
                output_tokens=min(outp, sc.max_model_len - inp),
            )
        )
    return out


def _counts(vals: Sequence[float | int]) -> str:
    return " ".join(f"{v}:{c}" for v, c in sorted(Counter(vals).items()))


async def _wait_idle(rep: Replica, timeout_s: float = 120.0) -> None:

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            async with s.get(f"{rep.base_url}/metrics") as r:
                m = parse_metrics(await r.text())
            if m.get("running", 0) == 0 and m.get("waiting", 0) == 0:
                return
            await asyncio.sleep(1.0)
    raise RuntimeError("replica did not become idle")


async def run_scenario(
    sc: Scenario, rep: Replica, work_dir: Path, log: Log
) -> tuple[Row, list[Row]]:
    dirs = adapter_dirs(work_dir)
    used: Counter[int] = Counter()
    names = []
    async with aiohttp.ClientSession() as s:
        for i, rank in enumerate(sc.ranks):
            name = f"{sc.name}-a{i}"
            path = dirs[rank][used[rank] % len(dirs[rank])]
            used[rank] += 1
            status, _, _ = await register_adapter(s, rep.base_url, name, str(path))
            if status != 200:
                raise RuntimeError(f"register {name}: {status}")
            names.append(name)
    await _wait_idle(rep)
    planned = plan_requests(sc)
    schedule = [
        TimedRequest(
            t_arrival_s=p.t_arrival_s,
            spec=RequestSpec(
                model=names[p.adapter],
                input_tokens=p.input_tokens,
                output_tokens=p.output_tokens,
                seed=sc.seed * 1_000_003 + k,
            ),
        )
        for k, p in enumerate(planned)
    ]
    log(f"  {sc.name}: {len(schedule)} requests over {sc.window_s:.0f} s ...")
    out = await run_open_loop(
        rep.base_url, schedule, window_s=sc.window_s, cpu_probe=rep.cpu_seconds
    )
    s_row = summarize(out, duration_s=sc.window_s)
    reqs: list[Row] = []
    for k, (p, r) in enumerate(zip(planned, out.results, strict=True)):
        reqs.append(
            {
                "run_id": sc.name,
                "req_idx": k,
                "adapter": f"a{p.adapter}",
                "adapter_rank": sc.ranks[p.adapter],
                "adapter_rate_rps": sc.rates_rps[p.adapter],
                "t_arrival_s": round(p.t_arrival_s, 6),
                "input_tokens": p.input_tokens,
                "output_tokens": p.output_tokens,
                "completed": int(r.ok),
                "t_send_offset_s": round(r.t_send - out.t0, 6),
                "ttft_ms": None if r.ttft_s is None or not r.ok else r.ttft_s * 1000.0,
                "tpot_ms": None if r.tpot_s is None or not r.ok else r.tpot_s * 1000.0,
                "e2e_ms": (r.t_end - r.t_send) * 1000.0 if r.ok and r.t_end else None,
            }
        )
    await _wait_idle(rep)
    return _real_row(sc, rep, planned, s_row), reqs


def _real_row(sc: Scenario, rep: Replica, planned: Sequence[PlannedRequest], s: Row) -> Row:
    rates = np.asarray(sc.rates_rps)
    ranks = np.asarray(sc.ranks)
    pool_in = statistics.fmean(p.input_tokens for p in planned)
    pool_out = statistics.fmean(p.output_tokens for p in planned)
    ok = int(str(s["completed"]))
    sent = int(str(s["requests_sent"]))
    dur = sc.window_s
    tin, tout = int(str(s["total_input_tokens"])), int(str(s["total_output_tokens"]))
    ttft = s["ttft_mean_ms"]
    pen = (
        (ok * ttft + (sent - ok) * dur * 1000.0) / sent
        if isinstance(ttft, float) and sent
        else None
    )
    offered = float(rates.sum()) * (pool_in + pool_out)
    total_thr = (tin + tout) / dur
    ln = sc.lengths
    return {
        "run_id": sc.name,
        "model": MODEL,
        "workload": sc.name,
        "rates_set": " ".join(str(r) for r in sorted(set(sc.rates_rps), reverse=True)),
        "ranks_set": " ".join(str(r) for r in sorted(set(sc.ranks))),
        "rate_counts": _counts(sc.rates_rps),
        "rank_counts": _counts(sc.ranks),
        "max_loras": sc.max_loras,
        "max_cpu_loras": sc.max_cpu_loras,
        "served_adapters": len(sc.ranks),
        "max_lora_rank": sc.max_lora_rank,
        "sum_rate_req_s": float(rates.sum()),
        "mean_rate_req_s": float(rates.mean()),
        "std_rate_req_s": float(rates.std()),
        "mean_rank": float(ranks.mean()),
        "std_rank": float(ranks.std()),
        "max_adapter_rank": int(ranks.max()),
        "total_time_s": dur,
        "duration_s": dur,
        "successful_requests": ok,
        "total_input_tokens": tin,
        "total_output_tokens": tout,
        "request_throughput": ok / dur,
        "input_throughput": tin / dur,
        "output_throughput": tout / dur,
        "total_throughput": total_thr,
        "ttft_mean_ms": ttft,
        "ttft_median_ms": s["ttft_median_ms"],
        "ttft_p99_ms": s["ttft_p99_ms"],
        "tpot_mean_ms": s["tpot_mean_ms"],
        "tpot_median_ms": s["tpot_median_ms"],
        "tpot_p99_ms": s["tpot_p99_ms"],
        "itl_mean_ms": s["itl_mean_ms"],
        "itl_median_ms": s["itl_median_ms"],
        "itl_p99_ms": s["itl_p99_ms"],
        "mean_input_tokens_per_completed": tin / ok if ok else None,
        "mean_output_tokens_per_completed": tout / ok if ok else None,
        "pool_prompts": len(planned),
        "pool_mean_input_tokens": pool_in,
        "pool_mean_output_tokens": pool_out,
        "offered_total_tok_s_est": offered,
        "thr_over_offered_est": total_thr / offered if offered else None,
        "requests_sent": sent,
        "offered_total_tok_s_sent_est": sent * (pool_in + pool_out) / dur,
        "ttft_mean_penalised_ms": pen,
        "npy_window": "exact",
        "npy_samples": s["metrics_samples"],
        "npy_mean_interval_s": 1.0,
        "mean_running": s["mean_running_batch"],
        "max_running": s["max_running_batch"],
        "mean_waiting": s["mean_waiting"],
        "max_waiting": s["max_waiting"],
        "preemptions": s["preemptions"],
        "mean_kv_usage": s["mean_kv_usage"],
        "max_kv_usage": s["max_kv_usage"],
        "kv_tokens": rep.facts.kv_tokens,
        "kv_tokens_r7_lookup": None,
        "server_out_log_available": 1,
        "usage_checker_errors": 0,
        "flag": None,
        "job_id": None,
        "source_path": "bench/calibrate_vllm_cpu.py",
        # extra columns needed for the replay
        "max_num_seqs": sc.max_num_seqs,
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "max_model_len": sc.max_model_len,
        "window_s": sc.window_s,
        "adapter_rates_rps": " ".join(str(r) for r in sc.rates_rps),
        "adapter_ranks": " ".join(str(r) for r in sc.ranks),
        "len_dist": "lognormal_clipped",
        "input_median": ln.input_median,
        "input_sigma": ln.input_sigma,
        "input_min": ln.input_min,
        "input_max": ln.input_max,
        "output_median": ln.output_median,
        "output_sigma": ln.output_sigma,
        "output_min": ln.output_min,
        "output_max": ln.output_max,
        "seed": sc.seed,
        "ignore_eos": 1,
        "prefix_caching": 0,
        "kv_cache_memory_bytes": rep.config.kv_cache_bytes,
        "mean_deferred": s["mean_deferred"],
        "max_deferred": s["max_deferred"],
        "failed_requests": sent - ok,
        "loadavg_1m_start": s["loadavg_1m_start"],
        "loadavg_1m_end": s["loadavg_1m_end"],
        "requests_file": "validation/requests.csv",
        "n_steps": s["n_steps"],
        "mean_tokens_per_step": s["mean_tokens_per_step"],
        **{k: s[k] for k in EXTRA_COLS},
    }


def run_validation(
    work_dir: Path,
    log: Log,
    scenarios: Sequence[Scenario] = SCENARIOS,
    window_s: float | None = None,
) -> tuple[list[Row], list[Row]]:
    """One server per distinct server setting; scenarios sharing it run one after another
    (adapters are registered under fresh names, so nothing from a previous run is reused)."""
    if window_s is not None:
        scenarios = [dataclasses.replace(sc, window_s=window_s) for sc in scenarios]
    groups: dict[ReplicaConfig, list[Scenario]] = {}
    for sc in scenarios:
        groups.setdefault(sc.server(), []).append(sc)
    rows: list[Row] = []
    reqs: list[Row] = []
    for cfg, scs in groups.items():
        log(
            f"starting validation replica max_loras={cfg.max_loras} "
            f"max_cpu_loras={cfg.max_cpu_loras} ..."
        )
        rep = start_replica(
            cfg, work_dir=work_dir, log_name=f"valid-{cfg.max_loras}-{cfg.max_cpu_loras}.log"
        )
        log(f"  healthy after {rep.startup_s:.1f} s")
        try:
            for sc in scs:
                row, rq = asyncio.run(run_scenario(sc, rep, work_dir, log))
                rows.append(row)
                reqs += rq
                log(
                    f"  {sc.name}: {row['successful_requests']}/{row['requests_sent']} ok, "
                    f"thr {row['total_throughput']:.1f} tok/s, itl {row['itl_mean_ms']:.2f} ms, "
                    f"ttft {row['ttft_mean_ms']:.1f} ms, deferred max {row['max_deferred']}"
                )
        finally:
            rep.stop()
    return rows, reqs
