"""Calibration sweeps on real vLLM CPU replicas, written in the column layout of
``shared/data/bsc-vllm-lora/calibration/`` (plus a few extra columns, documented in
``data/tiny-llama-cpu/README.md``).

Three servers are started one after the other (worker pinned to one core):
  base    no LoRA: decode ITL vs running batch (closed loop, concurrency = batch) and prefill
          TTFT vs input length (1 output token)                          -> base_latency.csv
  lora    max_loras 16 / max_cpu_loras 32 / max_lora_rank 16: ITL vs distinct adapters in the
          batch, rank 8 and 16, no swaps (every adapter warmed first)    -> lora_overhead.csv
  loading max_loras 1 / max_cpu_loras 4: sequential short requests, same adapter vs alternating
          two (CPU->GPU swap each request) vs cycling 6 (> max_cpu_loras: disk->CPU load each
          request); costs are TTFT differences                            -> loading.csv
Every server start adds a row to kv_capacity.csv.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np

from .client import RequestSpec, parse_cache_config, register_adapter, stream_completion
from .replica import SERVED_NAME, Replica, ReplicaConfig, adapter_dirs, start_replica
from .runner import EXTRA_COLS, Row, median_rows, run_closed_loop, summarize

MODEL = "tiny-llama-cpu"
SOURCE = "bench/calibrate_vllm_cpu.py"
Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class CalibrationPlan:
    reps: int = 3
    waves: int = 2
    min_run_s: float = 4.0
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_output_lens: tuple[int, ...] = (256,)
    decode_input_len: int = 8
    prefill_input_lens: tuple[int, ...] = (16, 64, 128, 256, 448)
    prefill_concurrency: tuple[int, ...] = (1, 16)
    prefill_min_run_s: float = 2.0
    prefill_requests: int = 32  # >= 20 engine steps at concurrency 1 (twin calibrate uses it)
    lora_batches: tuple[int, ...] = (8, 16, 32)
    lora_distinct: tuple[int, ...] = (1, 2, 4, 8, 16)
    lora_ranks: tuple[int, ...] = (8, 16)
    loading_requests: int = 40
    base_max_num_seqs: int = 32

    @staticmethod
    def quick() -> CalibrationPlan:
        return CalibrationPlan(
            reps=1,
            waves=1,
            min_run_s=1.0,
            decode_batches=(1, 8),
            prefill_input_lens=(16, 256),
            prefill_concurrency=(1,),
            prefill_min_run_s=0.5,
            prefill_requests=4,
            lora_batches=(8,),
            lora_distinct=(1, 8),
            lora_ranks=(8,),
            loading_requests=6,
        )


async def _kv_row(group: str, rep: Replica) -> Row:
    async with aiohttp.ClientSession() as s, s.get(f"{rep.base_url}/metrics") as r:
        cache = parse_cache_config(await r.text())
    c = rep.config
    return {
        "group": group,
        "model": MODEL,
        "enable_lora": int(c.enable_lora),
        "max_loras": c.max_loras if c.enable_lora else None,
        "max_lora_rank": c.max_lora_rank if c.enable_lora else None,
        "max_cpu_loras": c.max_cpu_loras if c.enable_lora else None,
        "max_num_seqs": c.max_num_seqs,
        "gpu_memory_utilization": None,
        "kv_tokens": rep.facts.kv_tokens,
        "max_model_len": c.max_model_len,
        "max_concurrency_x": rep.facts.max_concurrency_x,
        "model_weights_gib": None,
        "cuda_graph_gib": None,
        "kv_needed_gib": None,
        "kv_available_gib": None,
        "fail_reason": None,
        "source_path": SOURCE,
        "kv_cache_memory_bytes": c.kv_cache_bytes,
        "num_gpu_blocks": cache.get("num_gpu_blocks"),
        "block_size": cache.get("block_size"),
        "kv_cache_size_tokens_metric": cache.get("kv_cache_size_tokens"),
        "max_num_batched_tokens": c.max_num_batched_tokens,
        "startup_s": round(rep.startup_s, 2),
        "engine_init_s": rep.facts.engine_init_s,
    }


def _start(cfg: ReplicaConfig, work_dir: Path, name: str, log: Log) -> Replica:
    log(f"starting {name} replica ...")
    rep = start_replica(cfg, work_dir=work_dir, log_name=f"calib-{name}.log")
    log(f"  {name}: healthy after {rep.startup_s:.1f} s, KV {rep.facts.kv_tokens} tokens")
    return rep


async def _register(rep: Replica, names_paths: Sequence[tuple[str, Path]]) -> list[float]:
    lat: list[float] = []
    async with aiohttp.ClientSession() as s:
        for name, path in names_paths:
            status, dt = await register_adapter(s, rep.base_url, name, str(path))
            if status != 200:
                raise RuntimeError(f"registering {name} -> {status}")
            lat.append(dt)
    return lat


async def _warm(rep: Replica, models: Sequence[str]) -> None:
    async with aiohttp.ClientSession() as s:
        for m in models:
            r = await stream_completion(
                s, rep.base_url, RequestSpec(model=m, input_tokens=4, output_tokens=2)
            )
            if not r.ok:
                raise RuntimeError(f"warm-up of {m} failed: {r.status} {r.error}")


def _server_cols(c: ReplicaConfig, kv_tokens: int | None) -> Row:
    return {
        "max_num_seqs": c.max_num_seqs,
        "max_num_batched_tokens": c.max_num_batched_tokens,
        "max_model_len": c.max_model_len,
        "kv_tokens": kv_tokens,
    }


async def base_sweep(
    plan: CalibrationPlan, work_dir: Path, log: Log, *, decode: bool = True, prefill: bool = True
) -> tuple[list[Row], list[Row], Row]:
    cfg = ReplicaConfig(enable_lora=False, max_num_seqs=plan.base_max_num_seqs)
    rep = _start(cfg, work_dir, "base", log)
    try:
        kv = await _kv_row("cpu_base", rep)
        await _warm(rep, [SERVED_NAME] * 3)
        reps: list[Row] = []
        for r in range(plan.reps):
            for out_len in plan.decode_output_lens if decode else ():
                for b in plan.decode_batches:
                    o = await run_closed_loop(
                        rep.base_url,
                        concurrency=b,
                        n_requests=b * plan.waves,
                        models=[SERVED_NAME],
                        input_tokens=plan.decode_input_len,
                        output_tokens=out_len,
                        seed=r * 7919 + b,
                        min_duration_s=plan.min_run_s,
                        cpu_probe=rep.cpu_seconds,
                    )
                    row = _base_row(
                        "decode",
                        cfg,
                        rep,
                        b,
                        plan.decode_input_len,
                        out_len,
                        len(o.results),
                        r,
                        summarize(o),
                    )
                    reps.append(row)
                    log(
                        f"  decode rep{r} B={b} out={out_len}: itl {row['itl_mean_ms']:.2f} ms "
                        f"batch {row['mean_running_batch']}"
                    )
            for conc in plan.prefill_concurrency if prefill else ():
                for in_len in plan.prefill_input_lens:
                    n = max(plan.prefill_requests, conc * 2)
                    o = await run_closed_loop(
                        rep.base_url,
                        concurrency=conc,
                        n_requests=n,
                        models=[SERVED_NAME],
                        input_tokens=in_len,
                        output_tokens=1,
                        seed=r * 7919 + in_len,
                        min_duration_s=plan.prefill_min_run_s,
                        cpu_probe=rep.cpu_seconds,
                    )
                    row = _base_row(
                        "prefill", cfg, rep, conc, in_len, 1, len(o.results), r, summarize(o)
                    )
                    reps.append(row)
                    log(f"  prefill rep{r} C={conc} in={in_len}: ttft {row['ttft_mean_ms']:.2f} ms")
        return _merge(reps), reps, kv
    finally:
        rep.stop()


def _base_row(
    phase: str,
    cfg: ReplicaConfig,
    rep: Replica,
    conc: int,
    in_len: int,
    out_len: int,
    n: int,
    r: int,
    s: Row,
) -> Row:
    tin = s["total_input_tokens"]
    tout = s["total_output_tokens"]
    assert isinstance(tin, int) and isinstance(tout, int)
    return {
        "group": "cpu_base",
        "model": MODEL,
        "phase": phase,
        "max_num_seqs": cfg.max_num_seqs,
        "input_len": in_len,
        "output_len": out_len,
        "num_prompts": n,
        "completed": s["completed"],
        "duration_s": s["duration_s"],
        "mean_running_batch": s["mean_running_batch"],
        "max_running_batch": s["max_running_batch"],
        "mean_waiting": s["mean_waiting"],
        "itl_mean_ms": s["itl_mean_ms"],
        "itl_median_ms": s["itl_median_ms"],
        "itl_p99_ms": s["itl_p99_ms"],
        "tpot_mean_ms": s["tpot_mean_ms"],
        "ttft_mean_ms": s["ttft_mean_ms"],
        "ttft_median_ms": s["ttft_median_ms"],
        "ttft_p99_ms": s["ttft_p99_ms"],
        "total_input_tokens": tin,
        "total_output_tokens": tout,
        "mean_input_tokens_per_prompt": tin / n if n else None,
        "output_throughput": s["output_throughput"],
        "throughput_tok_s": s["throughput_tok_s"],
        "req_output_length": int(tout / n) if n else None,
        "paper_decode_fit_itl_ms": None,
        "kv_tokens": rep.facts.kv_tokens,
        "n_steps": s["n_steps"],
        "mean_step_interval_ms": s["mean_step_interval_ms"],
        "median_step_interval_ms": None,
        "sched_time_total_s": None,
        "sched_time_mean_ms": None,
        "server_log_available": 1,
        "source_path": SOURCE,
        # extra columns (not in the BSC file)
        "concurrency": conc,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "mean_tokens_per_step": s["mean_tokens_per_step"],
        "rep": r,
        "loadavg_1m_start": s["loadavg_1m_start"],
        "loadavg_1m_end": s["loadavg_1m_end"],
        **{k: s[k] for k in EXTRA_COLS},
    }


def _merge(rows: Sequence[Row]) -> list[Row]:
    """Median over repetitions of rows that share every setting column."""
    keys = (
        "group",
        "phase",
        "concurrency",
        "input_len",
        "output_len",
        "n_distinct_adapters",
        "adapter_rank",
    )
    groups: dict[tuple[object, ...], list[Row]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for g in groups.values():
        m = median_rows([{k: v for k, v in r.items() if k != "rep"} for r in g])
        out.append(m)
    return out


async def lora_sweep(
    plan: CalibrationPlan, work_dir: Path, base_rows: Sequence[Row], log: Log
) -> tuple[list[Row], list[Row], Row]:
    n_slots = max(plan.lora_distinct)
    cfg = ReplicaConfig(
        max_loras=n_slots,
        max_cpu_loras=n_slots * len(plan.lora_ranks),
        max_lora_rank=max(plan.lora_ranks),
        max_num_seqs=max(plan.lora_batches),
    )
    dirs = adapter_dirs(work_dir)
    rep = _start(cfg, work_dir, "lora", log)
    try:
        kv = await _kv_row("cpu_lora_overhead", rep)
        names = {rank: [f"r{rank}-{i}" for i in range(n_slots)] for rank in plan.lora_ranks}
        # one adapter per rank replicated under n_slots names (as the BSC R5 sweep did)
        await _register(rep, [(n, dirs[rank][0]) for rank in plan.lora_ranks for n in names[rank]])
        base_itl = {
            (r["concurrency"], r["output_len"]): r["itl_mean_ms"]
            for r in base_rows
            if r["phase"] == "decode" and r["input_len"] == plan.decode_input_len
        }
        reps: list[Row] = []
        out_len = plan.decode_output_lens[0]
        for r in range(plan.reps):
            for b in plan.lora_batches:
                o = await run_closed_loop(
                    rep.base_url,
                    concurrency=b,
                    n_requests=b * plan.waves,
                    models=[SERVED_NAME],
                    input_tokens=plan.decode_input_len,
                    output_tokens=out_len,
                    seed=r * 31 + b,
                    min_duration_s=plan.min_run_s,
                    cpu_probe=rep.cpu_seconds,
                )
                reps.append(
                    _lora_row(
                        cfg,
                        rep,
                        b,
                        0,
                        None,
                        out_len,
                        len(o.results),
                        plan,
                        r,
                        summarize(o),
                        base_itl.get((b, out_len)),
                    )
                )
                for rank in plan.lora_ranks:
                    await _warm(rep, names[rank])  # all n_slots adapters of this rank resident
                    for n in plan.lora_distinct:
                        if n > b:
                            continue
                        o = await run_closed_loop(
                            rep.base_url,
                            concurrency=b,
                            n_requests=b * plan.waves,
                            models=names[rank][:n],
                            input_tokens=plan.decode_input_len,
                            output_tokens=out_len,
                            seed=r * 31 + b * 7 + n,
                            min_duration_s=plan.min_run_s,
                            cpu_probe=rep.cpu_seconds,
                        )
                        row = _lora_row(
                            cfg,
                            rep,
                            b,
                            n,
                            rank,
                            out_len,
                            len(o.results),
                            plan,
                            r,
                            summarize(o),
                            base_itl.get((b, out_len)),
                        )
                        reps.append(row)
                        log(
                            f"  lora rep{r} B={b} rank={rank} n={n}: itl "
                            f"{row['itl_mean_ms']:.2f} ms (x{row['itl_ratio_vs_base']})"
                        )
        return _merge(reps), reps, kv
    finally:
        rep.stop()


def _lora_row(
    cfg: ReplicaConfig,
    rep: Replica,
    conc: int,
    n: int,
    rank: int | None,
    out_len: int,
    n_req: int,
    plan: CalibrationPlan,
    r: int,
    s: Row,
    base: object,
) -> Row:
    itl = s["itl_mean_ms"]
    ratio = itl / base if isinstance(itl, float) and isinstance(base, float) and base else None
    tin = s["total_input_tokens"]
    return {
        "group": "cpu_lora_overhead" if n else "cpu_lora_server_base",
        "model": MODEL,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_seqs_source": "server_arg",
        "max_loras": cfg.max_loras,
        "max_lora_rank": cfg.max_lora_rank,
        "adapter_rank": rank,
        "served_adapters": cfg.max_cpu_loras,
        "n_distinct_adapters": n,
        "input_len": plan.decode_input_len,
        "output_len": out_len,
        "mean_input_tokens_per_prompt": tin / n_req if isinstance(tin, int) else None,
        "num_prompts": n_req,
        "completed": s["completed"],
        "duration_s": s["duration_s"],
        "mean_running_batch": s["mean_running_batch"],
        "max_running_batch": s["max_running_batch"],
        "mean_waiting": s["mean_waiting"],
        "itl_mean_ms": itl,
        "itl_median_ms": s["itl_median_ms"],
        "itl_p99_ms": s["itl_p99_ms"],
        "tpot_mean_ms": s["tpot_mean_ms"],
        "ttft_mean_ms": s["ttft_mean_ms"],
        "throughput_tok_s": s["throughput_tok_s"],
        "base_itl_ms": base,
        "itl_ratio_vs_base": ratio,
        "mean_unique_adapters_per_step": None,
        "max_unique_adapters_per_step": None,
        "paper_overhead_fit_ratio": None,
        "n_steps": s["n_steps"],
        "mean_step_interval_ms": s["mean_step_interval_ms"],
        "median_step_interval_ms": None,
        "sched_time_total_s": None,
        "sched_time_mean_ms": None,
        "kv_tokens": rep.facts.kv_tokens,
        "server_log_available": 1,
        "source_path": SOURCE,
        # extra columns
        "concurrency": conc,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "output_throughput": s["output_throughput"],
        "mean_tokens_per_step": s["mean_tokens_per_step"],
        "rep": r,
        "loadavg_1m_start": s["loadavg_1m_start"],
        "loadavg_1m_end": s["loadavg_1m_end"],
        **{k: s[k] for k in EXTRA_COLS},
    }


async def _sequential_ttft(
    rep: Replica, models: Sequence[str], n: int, seed: int, input_tokens: int = 16
) -> list[float]:
    out: list[float] = []
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            spec = RequestSpec(
                model=models[i % len(models)],
                input_tokens=input_tokens,
                output_tokens=2,
                seed=seed + i,
            )
            res = await stream_completion(s, rep.base_url, spec)
            if not res.ok or res.ttft_s is None:
                raise RuntimeError(f"loading probe failed: {res.status} {res.error}")
            out.append(res.ttft_s * 1000.0)
    return out


async def loading_sweep(
    plan: CalibrationPlan, work_dir: Path, log: Log
) -> tuple[list[Row], list[Row], Row]:
    cfg = ReplicaConfig(max_loras=1, max_cpu_loras=4, max_lora_rank=16, max_num_seqs=4)
    dirs = adapter_dirs(work_dir)
    rep = _start(cfg, work_dir, "loading", log)
    try:
        kv = await _kv_row("cpu_loading", rep)
        rows: list[Row] = []
        raw: list[Row] = []
        for rank in (8, 16):
            d = dirs[rank]
            # "swap" set: two distinct adapter files; "disk" set: 6 names (> max_cpu_loras 4)
            swap = [(f"s{rank}-{i}", d[i % len(d)]) for i in range(2)]
            disk = [(f"d{rank}-{i}", d[i % len(d)]) for i in range(6)]
            reg_ms = [x * 1000.0 for x in await _register(rep, swap + disk)]
            m_same, m_swap = [swap[0][0]], [n for n, _ in swap]
            m_disk = [n for n, _ in disk]
            await _warm(rep, m_swap)
            same: list[float] = []
            alt: list[float] = []
            cyc: list[float] = []
            for r in range(plan.reps):  # interleave the conditions over repetitions
                k = plan.loading_requests
                same += await _sequential_ttft(rep, m_same, k, seed=1000 * r)
                await _warm(rep, m_swap)
                alt += await _sequential_ttft(rep, m_swap, k, seed=1000 * r + 300)
                cyc += await _sequential_ttft(rep, m_disk, k, seed=1000 * r + 600)
            for cond, xs in (("same", same), ("swap", alt), ("disk_cycle", cyc)):
                raw += [
                    {"adapter_rank": rank, "condition": cond, "i": i, "ttft_ms": x}
                    for i, x in enumerate(xs)
                ]
            rows.append(_loading_row(cfg, rep, rank, same, alt, cyc, reg_ms))
            row = rows[-1]
            log(
                f"  loading rank={rank}: same {statistics.median(same):.2f} ms, swap +"
                f"{row['swap_ms_median']:.2f} ms, disk +{row['disk_load_ms_median_excl_first']:.2f}"
                f" ms, admin load {statistics.median(reg_ms):.2f} ms"
            )
        return rows, raw, kv
    finally:
        rep.stop()


def _loading_row(
    cfg: ReplicaConfig,
    rep: Replica,
    rank: int,
    same: list[float],
    alt: list[float],
    cyc: list[float],
    reg_ms: list[float],
) -> Row:
    base = float(np.median(same))
    swap = np.asarray(alt) - base
    swap_med = float(np.median(alt)) - base
    disk = np.asarray(cyc) - float(np.median(alt))
    return {
        "model": MODEL,
        "max_lora_rank": cfg.max_lora_rank,
        "adapter_rank": rank,
        "max_loras": cfg.max_loras,
        "max_cpu_loras": cfg.max_cpu_loras,
        "num_prompts": len(same) + len(alt) + len(cyc),
        "completed": len(same) + len(alt) + len(cyc),
        "n_disk_loads": len(cyc) + len(reg_ms),
        "n_memory_loads": len(alt) + len(cyc),
        "n_swaps": len(alt),
        "swap_ms_mean": float(swap.mean()),
        "swap_ms_median": swap_med,
        "swap_ms_std": float(swap.std()),
        "swap_ms_p10": float(np.percentile(swap, 10)),
        "swap_ms_p90": float(np.percentile(swap, 90)),
        "swap_ms_min": float(swap.min()),
        "swap_ms_max": float(swap.max()),
        "swap_ms_paper_method": float(swap.mean()),
        "paper_constant_ms": None,
        "init_gpu_load_ms_mean": None,
        "first_disk_load_ms": reg_ms[0],
        "disk_load_ms_mean_excl_first": float(np.mean(reg_ms[1:])),
        "disk_load_ms_median_excl_first": float(np.median(reg_ms[1:])),
        "itl_mean_ms": None,
        "duration_s": None,
        "kv_tokens": rep.facts.kv_tokens,
        "source_path": SOURCE,
        # extra columns
        "ttft_same_adapter_median_ms": base,
        "ttft_swap_median_ms": float(np.median(alt)),
        "ttft_disk_cycle_median_ms": float(np.median(cyc)),
        "disk_reload_in_request_ms_mean": float(disk.mean()),
        "disk_reload_in_request_ms_median": float(np.median(cyc)) - float(np.median(alt)),
        "admin_load_ms_median": float(np.median(reg_ms)),
        "max_num_seqs": cfg.max_num_seqs,
    }


def run_calibration(
    plan: CalibrationPlan,
    work_dir: Path,
    log: Log,
    parts: Sequence[str],
    base_rows: Sequence[Row] = (),
) -> dict[str, list[Row]]:
    """Run the selected parts; returns CSV name -> rows (``raw/`` names hold per-rep rows).
    ``base_rows`` (an earlier base_latency.csv) gives the ITL ratios when "base" is not run."""
    out: dict[str, list[Row]] = {"kv_capacity": []}
    if "base" in parts:
        rows, raw, kv = asyncio.run(base_sweep(plan, work_dir, log))
        out["base_latency"], out["raw/base_latency_reps"] = rows, raw
        base_rows = rows
        out["kv_capacity"].append(kv)
    elif "prefill" in parts:  # only the prefill rows; the caller merges them into the files
        rows, raw, kv = asyncio.run(base_sweep(plan, work_dir, log, decode=False))
        out["base_latency"], out["raw/base_latency_reps"] = rows, raw
        out["kv_capacity"].append(kv)
    if "lora" in parts:
        rows, raw, kv = asyncio.run(lora_sweep(plan, work_dir, base_rows, log))
        out["lora_overhead"], out["raw/lora_overhead_reps"] = rows, raw
        out["kv_capacity"].append(kv)
    if "loading" in parts:
        rows, raw, kv = asyncio.run(loading_sweep(plan, work_dir, log))
        out["loading"], out["raw/loading_ttft"] = rows, raw
        out["kv_capacity"].append(kv)
    return out
