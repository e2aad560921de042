"""The rows of the calibration CSVs, in the column layout of
``shared/data/bsc-vllm-lora/calibration/`` that ``loragate twin calibrate`` reads (BSC columns
first, then the extra columns documented in ``data/tiny-llama-cpu/README.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loragate.twin.measure_launch import MeasuredServer
from loragate.twin.measure_runner import EXTRA_COLS, Row, median_rows


@dataclass(frozen=True, kw_only=True)
class Labels:
    """What every row names: the model (``twin calibrate --model``) and the measuring tool."""

    model: str
    source: str
    # rows' ``group`` names start with it: <prefix>_base, <prefix>_lora_overhead, ...
    group_prefix: str = "cpu"

    def group(self, suffix: str) -> str:
        return f"{self.group_prefix}_{suffix}"


def kv_row(group_suffix: str, server: MeasuredServer, cache: dict[str, str], labels: Labels) -> Row:
    """One row per server start (``cache``: the labels of ``vllm:cache_config_info``)."""
    c = server.settings
    facts = server.process.facts
    return {
        "group": labels.group(group_suffix),
        "model": labels.model,
        "enable_lora": int(c.enable_lora),
        "max_loras": c.max_loras if c.enable_lora else None,
        "max_lora_rank": c.max_lora_rank if c.enable_lora else None,
        "max_cpu_loras": c.max_cpu_loras if c.enable_lora else None,
        "max_num_seqs": c.max_num_seqs,
        "gpu_memory_utilization": None,
        "kv_tokens": kv_tokens(server, cache),
        "max_model_len": server.max_model_len,
        "max_concurrency_x": facts.max_concurrency_x,
        "model_weights_gib": None,
        "cuda_graph_gib": None,
        "kv_needed_gib": None,
        "kv_available_gib": None,
        "fail_reason": None,
        "source_path": labels.source,
        "kv_cache_memory_bytes": server.kv_cache_bytes,
        "num_gpu_blocks": cache.get("num_gpu_blocks"),
        "block_size": cache.get("block_size"),
        "kv_cache_size_tokens_metric": cache.get("kv_cache_size_tokens"),
        "max_num_batched_tokens": server.max_num_batched_tokens,
        "startup_s": round(server.process.startup_s, 2),
        "engine_init_s": facts.engine_init_s,
    }


def kv_tokens(server: MeasuredServer, cache: dict[str, str]) -> int | None:
    """The logged KV capacity, else ``num_gpu_blocks × block_size`` of the metrics."""
    if server.process.facts.kv_tokens is not None:
        return server.process.facts.kv_tokens
    try:
        return int(cache["num_gpu_blocks"]) * int(cache["block_size"])
    except (KeyError, ValueError):
        return None


def base_row(
    phase: str,
    server: MeasuredServer,
    conc: int,
    in_len: int,
    out_len: int,
    n: int,
    r: int,
    s: Row,
    labels: Labels,
) -> Row:
    tin = s["total_input_tokens"]
    tout = s["total_output_tokens"]
    assert isinstance(tin, int) and isinstance(tout, int)
    return {
        "group": labels.group("base"),
        "model": labels.model,
        "phase": phase,
        "max_num_seqs": server.settings.max_num_seqs,
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
        "kv_tokens": server.process.facts.kv_tokens,
        "n_steps": s["n_steps"],
        "mean_step_interval_ms": s["mean_step_interval_ms"],
        "median_step_interval_ms": None,
        "sched_time_total_s": None,
        "sched_time_mean_ms": None,
        "server_log_available": 1,
        "source_path": labels.source,
        # extra columns (not in the BSC file)
        "concurrency": conc,
        "max_num_batched_tokens": server.max_num_batched_tokens,
        "mean_tokens_per_step": s["mean_tokens_per_step"],
        "rep": r,
        "loadavg_1m_start": s["loadavg_1m_start"],
        "loadavg_1m_end": s["loadavg_1m_end"],
        **{k: s[k] for k in EXTRA_COLS},
    }


def merge_reps(rows: Sequence[Row]) -> list[Row]:
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


@dataclass(frozen=True, kw_only=True)
class LoraRun:
    """The settings of one LoRA-sweep run (``n`` 0: base-model requests on the LoRA server)."""

    conc: int
    n: int
    rank: int | None
    input_len: int
    out_len: int
    n_req: int
    rep: int


def lora_row(server: MeasuredServer, run: LoraRun, s: Row, base: object, labels: Labels) -> Row:
    cfg = server.settings
    itl = s["itl_mean_ms"]
    ratio = itl / base if isinstance(itl, float) and isinstance(base, float) and base else None
    tin = s["total_input_tokens"]
    return {
        "group": labels.group("lora_overhead" if run.n else "lora_server_base"),
        "model": labels.model,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_seqs_source": "server_arg",
        "max_loras": cfg.max_loras,
        "max_lora_rank": cfg.max_lora_rank,
        "adapter_rank": run.rank,
        "served_adapters": cfg.max_cpu_loras,
        "n_distinct_adapters": run.n,
        "input_len": run.input_len,
        "output_len": run.out_len,
        "mean_input_tokens_per_prompt": tin / run.n_req if isinstance(tin, int) else None,
        "num_prompts": run.n_req,
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
        "kv_tokens": server.process.facts.kv_tokens,
        "server_log_available": 1,
        "source_path": labels.source,
        # extra columns
        "concurrency": run.conc,
        "max_num_batched_tokens": server.max_num_batched_tokens,
        "output_throughput": s["output_throughput"],
        "mean_tokens_per_step": s["mean_tokens_per_step"],
        "rep": run.rep,
        "loadavg_1m_start": s["loadavg_1m_start"],
        "loadavg_1m_end": s["loadavg_1m_end"],
        **{k: s[k] for k in EXTRA_COLS},
    }


@dataclass(frozen=True, kw_only=True)
class LoadingTimes:
    """Per-request TTFTs (ms) of the three loading conditions and the admin load latencies."""

    same: list[float]
    swap: list[float]
    disk_cycle: list[float]
    admin_load: list[float]


def loading_row(server: MeasuredServer, rank: int, t: LoadingTimes, labels: Labels) -> Row:
    cfg = server.settings
    same, alt, cyc, reg_ms = t.same, t.swap, t.disk_cycle, t.admin_load
    base = float(np.median(same))
    swap = np.asarray(alt) - base
    swap_med = float(np.median(alt)) - base
    disk = np.asarray(cyc) - float(np.median(alt))
    return {
        "model": labels.model,
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
        "kv_tokens": server.process.facts.kv_tokens,
        "source_path": labels.source,
        # extra columns
        "ttft_same_adapter_median_ms": base,
        "ttft_swap_median_ms": float(np.median(alt)),
        "ttft_disk_cycle_median_ms": float(np.median(cyc)),
        "disk_reload_in_request_ms_mean": float(disk.mean()),
        "disk_reload_in_request_ms_median": float(np.median(cyc)) - float(np.median(alt)),
        "admin_load_ms_median": float(np.median(reg_ms)),
        "max_num_seqs": cfg.max_num_seqs,
    }
