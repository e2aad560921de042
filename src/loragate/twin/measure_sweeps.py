"""Calibration sweeps on real vLLM servers, written in the column layout of
``shared/data/bsc-vllm-lora/calibration/`` (plus a few extra columns, documented in
``data/tiny-llama-cpu/README.md``), the folder ``loragate twin calibrate`` reads.

Three servers are started one after the other by a ``Launcher``:
  base    no LoRA: decode ITL vs running batch (closed loop, concurrency = batch) and prefill
          TTFT vs input length (1 output token)                          -> base_latency.csv
  lora    max_loras = most distinct adapters, max_cpu_loras = that × ranks: ITL vs distinct
          adapters in the batch, per rank, no swaps (every adapter warmed first)
                                                                          -> lora_overhead.csv
  loading max_loras 1 / max_cpu_loras 4: sequential short requests, same adapter vs alternating
          two (CPU->GPU swap each request) vs cycling 6 (> max_cpu_loras: disk->CPU load each
          request); costs are TTFT differences                            -> loading.csv
Every server start adds a row to kv_capacity.csv.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from loragate.core.errors import MeasurementError
from loragate.twin.measure_client import (
    RequestSpec,
    parse_cache_config,
    register_adapter,
    stream_completion,
)
from loragate.twin.measure_launch import (
    AdapterSet,
    Launcher,
    MeasuredServer,
    ServerSettings,
    vllm_max_lora_rank,
)
from loragate.twin.measure_rows import (
    Labels,
    LoadingTimes,
    LoraRun,
    base_row,
    kv_row,
    loading_row,
    lora_row,
    merge_reps,
)
from loragate.twin.measure_runner import Row, run_closed_loop, summarize

Log = Callable[[str], None]
# The parts a calibration runs ("prefill": only the prefill rows of the base sweep, merged by
# the caller into an existing base_latency.csv).
CALIBRATION_PARTS = ("base", "lora", "loading", "prefill")
# Adapters of the loading sweep: two alternate (a CPU->GPU swap per request) and six cycle
# through a CPU cache of four (a disk->CPU load per request).
LOADING_MAX_CPU_LORAS = 4
LOADING_SWAP_NAMES = 2
LOADING_CYCLE_NAMES = 6


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
    loading_ranks: tuple[int, ...] = (8, 16)
    loading_requests: int = 40
    base_max_num_seqs: int = 32

    @staticmethod
    def quick() -> CalibrationPlan:
        """The smallest plan ``loragate twin calibrate`` fits every step-time term from."""
        return CalibrationPlan(
            reps=1,
            waves=1,
            min_run_s=1.0,
            decode_batches=(1, 2, 4, 8),  # twin calibrate fits the step on >= 4 rows
            prefill_input_lens=(16, 256),
            prefill_concurrency=(1,),
            prefill_min_run_s=0.5,
            prefill_requests=24,  # >= 20 full-chunk steps: the prefill weight's rows
            lora_batches=(4, 8),  # >= 3 LoRA rows over tokens and adapters
            lora_distinct=(1, 4),
            lora_ranks=(8,),
            loading_requests=6,
        )

    def max_context_tokens(self) -> int:
        """The longest prompt + output a request of this plan has (vs the max_model_len)."""
        decode = self.decode_input_len + max(self.decode_output_lens)
        prefill = max(self.prefill_input_lens, default=0) + 1
        return max(decode, prefill)

    def run_count(self, parts: Sequence[str]) -> int:
        """How many timed runs the parts take (to print before a long measurement)."""
        n = 0
        if "base" in parts or "prefill" in parts:
            decode = len(self.decode_output_lens) * len(self.decode_batches)
            prefill = len(self.prefill_concurrency) * len(self.prefill_input_lens)
            n += self.reps * ((decode if "base" in parts else 0) + prefill)
        if "lora" in parts:
            per_batch = [
                1 + len(self.lora_ranks) * sum(1 for d in self.lora_distinct if d <= b)
                for b in self.lora_batches
            ]
            n += self.reps * sum(per_batch)
        if "loading" in parts:
            n += len(self.loading_ranks) * 3 * self.reps
        return n


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """Where and how to measure: the launcher, the adapter folders by rank, the row labels."""

    launcher: Launcher
    adapters: AdapterSet
    labels: Labels
    log: Log


async def _kv(group: str, server: MeasuredServer, labels: Labels) -> Row:
    async with aiohttp.ClientSession() as s, s.get(f"{server.base_url}/metrics") as r:
        cache = parse_cache_config(await r.text())
    return kv_row(group, server, cache, labels)


@contextmanager
def _running(
    m: Measurement, settings: ServerSettings, name: str, plan: CalibrationPlan
) -> Iterator[MeasuredServer]:
    """A started server, stopped on the way out whatever happens (SIGTERM as SystemExit too)."""
    m.log(f"starting {name} server ...")
    server = m.launcher.start(settings, name)
    try:
        facts = server.process.facts
        m.log(
            f"  {name}: healthy after {server.process.startup_s:.1f} s, KV {facts.kv_tokens} tokens"
        )
        need = plan.max_context_tokens()
        if server.max_model_len is not None and server.max_model_len < need:
            raise MeasurementError(
                f"the {name} server's max_model_len is {server.max_model_len} but the sweep "
                f"sends requests of up to {need} tokens: raise --max-model-len in the server "
                "command"
            )
        yield server
    finally:
        server.stop()


async def _register(server: MeasuredServer, names_paths: Sequence[tuple[str, Path]]) -> list[float]:
    lat: list[float] = []
    async with aiohttp.ClientSession() as s:
        for name, path in names_paths:
            status, dt, body = await register_adapter(s, server.base_url, name, str(path))
            if status != 200:
                raise MeasurementError(
                    f"the server refused adapter {name} ({path}): {status} {body[:300]}"
                )
            lat.append(dt)
    return lat


async def _warm(server: MeasuredServer, models: Sequence[str]) -> None:
    async with aiohttp.ClientSession() as s:
        for model in models:
            r = await stream_completion(
                s, server.base_url, RequestSpec(model=model, input_tokens=4, output_tokens=2)
            )
            if not r.ok:
                raise MeasurementError(f"warm-up request to {model} failed: {r.status} {r.error}")


async def base_sweep(
    plan: CalibrationPlan, m: Measurement, *, decode: bool = True, prefill: bool = True
) -> tuple[list[Row], list[Row], Row]:
    settings = ServerSettings(enable_lora=False, max_num_seqs=plan.base_max_num_seqs)
    with _running(m, settings, "base", plan) as server:
        kv = await _kv("base", server, m.labels)
        base = server.base_model
        await _warm(server, [base] * 3)
        reps: list[Row] = []
        for r in range(plan.reps):
            for out_len in plan.decode_output_lens if decode else ():
                for b in plan.decode_batches:
                    o = await run_closed_loop(
                        server.base_url,
                        concurrency=b,
                        n_requests=b * plan.waves,
                        models=[base],
                        input_tokens=plan.decode_input_len,
                        output_tokens=out_len,
                        seed=r * 7919 + b,
                        min_duration_s=plan.min_run_s,
                        cpu_probe=server.process.cpu_seconds,
                    )
                    row = base_row(
                        "decode",
                        server,
                        b,
                        plan.decode_input_len,
                        out_len,
                        len(o.results),
                        r,
                        summarize(o),
                        m.labels,
                    )
                    reps.append(row)
                    m.log(
                        f"  decode rep{r} B={b} out={out_len}: itl {_ms(row['itl_mean_ms'])} "
                        f"batch {row['mean_running_batch']}"
                    )
            for conc in plan.prefill_concurrency if prefill else ():
                for in_len in plan.prefill_input_lens:
                    n = max(plan.prefill_requests, conc * 2)
                    o = await run_closed_loop(
                        server.base_url,
                        concurrency=conc,
                        n_requests=n,
                        models=[base],
                        input_tokens=in_len,
                        output_tokens=1,
                        seed=r * 7919 + in_len,
                        min_duration_s=plan.prefill_min_run_s,
                        cpu_probe=server.process.cpu_seconds,
                    )
                    row = base_row(
                        "prefill",
                        server,
                        conc,
                        in_len,
                        1,
                        len(o.results),
                        r,
                        summarize(o),
                        m.labels,
                    )
                    reps.append(row)
                    m.log(f"  prefill rep{r} C={conc} in={in_len}: ttft {_ms(row['ttft_mean_ms'])}")
        return merge_reps(reps), reps, kv


def _ms(value: object) -> str:
    return f"{value:.2f} ms" if isinstance(value, float) else "n/a (no request completed)"


def _adapters_of(m: Measurement, rank: int) -> list[Path]:
    dirs = m.adapters.get(rank)
    if not dirs:
        have = ", ".join(str(r) for r in sorted(m.adapters)) or "none"
        raise MeasurementError(f"the sweep needs an adapter of rank {rank} (given ranks: {have})")
    return dirs


async def lora_sweep(
    plan: CalibrationPlan, m: Measurement, base_rows: Sequence[Row]
) -> tuple[list[Row], list[Row], Row]:
    n_slots = max(plan.lora_distinct)
    settings = ServerSettings(
        max_loras=n_slots,
        max_cpu_loras=n_slots * len(plan.lora_ranks),
        max_lora_rank=vllm_max_lora_rank(max(plan.lora_ranks)),
        max_num_seqs=max(plan.lora_batches),
    )
    first = {rank: _adapters_of(m, rank)[0] for rank in plan.lora_ranks}
    with _running(m, settings, "lora", plan) as server:
        kv = await _kv("lora_overhead", server, m.labels)
        names = {rank: [f"r{rank}-{i}" for i in range(n_slots)] for rank in plan.lora_ranks}
        # one adapter per rank replicated under n_slots names (as the BSC R5 sweep did)
        await _register(server, [(n, first[rank]) for rank in plan.lora_ranks for n in names[rank]])
        base_itl = {
            (r["concurrency"], r["output_len"]): r["itl_mean_ms"]
            for r in base_rows
            if r["phase"] == "decode" and r["input_len"] == plan.decode_input_len
        }
        reps: list[Row] = []
        out_len = plan.decode_output_lens[0]

        async def one(r: int, b: int, n: int, rank: int | None, seed: int) -> Row:
            models = names[rank][:n] if rank is not None else [server.base_model]
            o = await run_closed_loop(
                server.base_url,
                concurrency=b,
                n_requests=b * plan.waves,
                models=models,
                input_tokens=plan.decode_input_len,
                output_tokens=out_len,
                seed=seed,
                min_duration_s=plan.min_run_s,
                cpu_probe=server.process.cpu_seconds,
            )
            run = LoraRun(
                conc=b,
                n=n,
                rank=rank,
                input_len=plan.decode_input_len,
                out_len=out_len,
                n_req=len(o.results),
                rep=r,
            )
            return lora_row(server, run, summarize(o), base_itl.get((b, out_len)), m.labels)

        for r in range(plan.reps):
            for b in plan.lora_batches:
                reps.append(await one(r, b, 0, None, r * 31 + b))
                for rank in plan.lora_ranks:
                    await _warm(server, names[rank])  # all n_slots adapters of this rank resident
                    for n in plan.lora_distinct:
                        if n > b:
                            continue
                        row = await one(r, b, n, rank, r * 31 + b * 7 + n)
                        reps.append(row)
                        m.log(
                            f"  lora rep{r} B={b} rank={rank} n={n}: itl "
                            f"{_ms(row['itl_mean_ms'])} (x{row['itl_ratio_vs_base']})"
                        )
        return merge_reps(reps), reps, kv


async def _sequential_ttft(
    server: MeasuredServer, models: Sequence[str], n: int, seed: int, input_tokens: int = 16
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
            res = await stream_completion(s, server.base_url, spec)
            if not res.ok or res.ttft_s is None:
                raise MeasurementError(f"loading probe failed: {res.status} {res.error}")
            out.append(res.ttft_s * 1000.0)
    return out


async def loading_sweep(plan: CalibrationPlan, m: Measurement) -> tuple[list[Row], list[Row], Row]:
    settings = ServerSettings(
        max_loras=1,
        max_cpu_loras=LOADING_MAX_CPU_LORAS,
        max_lora_rank=vllm_max_lora_rank(max(plan.loading_ranks)),
        max_num_seqs=4,
    )
    dirs = {rank: _adapters_of(m, rank) for rank in plan.loading_ranks}
    with _running(m, settings, "loading", plan) as server:
        kv = await _kv("loading", server, m.labels)
        rows: list[Row] = []
        raw: list[Row] = []
        for rank in plan.loading_ranks:
            d = dirs[rank]
            # "swap" set: two distinct adapter files; "disk" set: 6 names (> max_cpu_loras 4)
            swap = [(f"s{rank}-{i}", d[i % len(d)]) for i in range(LOADING_SWAP_NAMES)]
            disk = [(f"d{rank}-{i}", d[i % len(d)]) for i in range(LOADING_CYCLE_NAMES)]
            reg_ms = [x * 1000.0 for x in await _register(server, swap + disk)]
            m_same, m_swap = [swap[0][0]], [n for n, _ in swap]
            m_disk = [n for n, _ in disk]
            await _warm(server, m_swap)
            same: list[float] = []
            alt: list[float] = []
            cyc: list[float] = []
            for r in range(plan.reps):  # interleave the conditions over repetitions
                k = plan.loading_requests
                same += await _sequential_ttft(server, m_same, k, seed=1000 * r)
                await _warm(server, m_swap)
                alt += await _sequential_ttft(server, m_swap, k, seed=1000 * r + 300)
                cyc += await _sequential_ttft(server, m_disk, k, seed=1000 * r + 600)
            for cond, xs in (("same", same), ("swap", alt), ("disk_cycle", cyc)):
                raw += [
                    {"adapter_rank": rank, "condition": cond, "i": i, "ttft_ms": x}
                    for i, x in enumerate(xs)
                ]
            times = LoadingTimes(same=same, swap=alt, disk_cycle=cyc, admin_load=reg_ms)
            rows.append(loading_row(server, rank, times, m.labels))
            row = rows[-1]
            m.log(
                f"  loading rank={rank}: same {statistics.median(same):.2f} ms, swap +"
                f"{row['swap_ms_median']:.2f} ms, disk +{row['disk_load_ms_median_excl_first']:.2f}"
                f" ms, admin load {statistics.median(reg_ms):.2f} ms"
            )
        return rows, raw, kv


def run_calibration(
    plan: CalibrationPlan,
    m: Measurement,
    parts: Sequence[str],
    base_rows: Sequence[Row] = (),
) -> dict[str, list[Row]]:
    """Run the selected parts; returns CSV name -> rows (``raw/`` names hold per-rep rows).
    ``base_rows`` (an earlier base_latency.csv) gives the ITL ratios when "base" is not run."""
    out: dict[str, list[Row]] = {"kv_capacity": []}
    if "base" in parts:
        rows, raw, kv = asyncio.run(base_sweep(plan, m))
        out["base_latency"], out["raw/base_latency_reps"] = rows, raw
        base_rows = rows
        out["kv_capacity"].append(kv)
    elif "prefill" in parts:  # only the prefill rows; the caller merges them into the files
        rows, raw, kv = asyncio.run(base_sweep(plan, m, decode=False))
        out["base_latency"], out["raw/base_latency_reps"] = rows, raw
        out["kv_capacity"].append(kv)
    if "lora" in parts:
        rows, raw, kv = asyncio.run(lora_sweep(plan, m, base_rows))
        out["lora_overhead"], out["raw/lora_overhead_reps"] = rows, raw
        out["kv_capacity"].append(kv)
    if "loading" in parts:
        rows, raw, kv = asyncio.run(loading_sweep(plan, m))
        out["loading"], out["raw/loading_ttft"] = rows, raw
        out["kv_capacity"].append(kv)
    return out
