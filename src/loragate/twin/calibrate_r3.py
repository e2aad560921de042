"""LoRA compute cost from R3's Poisson runs, and which model ran R3.

By default (``lora_source="poisson"``) the LoRA terms are fitted on R3's Poisson runs over
8..448 slots, the regime of real deployments (``fit_lora_poisson``), after the slots' per-step
cost measured by R7 (``calibrate_step.fit_slot_cost``) and from R6's one-adapter step
(``calibrate_lora.R6_ANCHOR``). Groups of R3 runs whose small-batch steps disagree with the
model's own step ran on slower servers and are left out (``r3_consistent_rows``).
R3 does not name its model: its adapter loads take the R6 swap time of one model
(``attribute_r3``). That model's LoRA terms are fitted on R3; another model's are those prices
scaled by the two models' LoRA cost ratio on matched R5 runs
(``calibrate.transferred_r3_prices``), with its own R6 step, slot cost, base step, loads and KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loragate.twin.calibrate_fit import TRIM_PCT, ComponentFit, FloatArray, arr, quality, wlstsq
from loragate.twin.calibrate_loads import fit_cpu_load
from loragate.twin.calibrate_lora import R6_ANCHOR
from loragate.twin.calibrate_step import BaseStepFit, SlotCost
from loragate.twin.calibration_data import CalibrationData, Table

# R3's runs record no prompt lengths. They are taken to sample ShareGPT like the one-hour runs
# (the benchmark's filter: prompt 4-1024, output >= 4, prompt + output <= 2048 tokens): the
# dataset's own filtered prompts average 221 tokens (15,821 two-turn conversations of
# ShareGPT_V3_unfiltered_cleaned_split, cl100k_base tokens + BOS; scripts/sharegpt_length_tables.py,
# the source of validate.py's SHAREGPT_* tables). The fitted per-adapter cost hardly depends on
# it (0.51-0.58 ms for 100-400 tokens).
R3_MEAN_PROMPT_TOKENS = 221.0


@dataclass(frozen=True, slots=True, kw_only=True)
class _R3Steps:
    """Per-run columns of R3 (600-s runs; per-step means) and the compute part of a step."""

    running: FloatArray  # mean running batch
    waiting: FloatArray  # mean waiting queue
    adapters: FloatArray  # mean distinct adapters per batch
    loras: FloatArray  # max_loras
    rank: FloatArray  # adapter rank (max_lora_rank of the server)
    per_step: FloatArray  # finished requests per step
    out_len: FloatArray  # output tokens per finished request
    compute_ms: FloatArray  # step interval minus the measured scheduling time


def _r3_steps(table: Table) -> _R3Steps:
    steps = arr(table.column("steps"))
    safe_steps = np.where(steps > 0, steps, np.nan)
    duration = arr(table.column("duration"))
    sched = arr(table.column("total_scheduling_time"))
    completed = arr(table.column("completed_requests"))
    return _R3Steps(
        running=arr(table.column("avg_batch_size")),
        waiting=arr(table.column("avg_waiting_queue")),
        adapters=arr(table.column("mean_loras_by_batch")),
        loras=arr(table.column("gpu_loras")),
        rank=arr(table.column("rank")),
        per_step=completed / safe_steps,
        out_len=arr(table.column("processed_tokens")) / np.where(completed > 0, completed, np.nan),
        compute_ms=(duration - sched) / safe_steps * 1000.0,
    )


def _r3_modelled_step(
    r: _R3Steps, base: BaseStepFit, w_p: float, l_0: float, slots: SlotCost, mean_prompt: float
) -> tuple[FloatArray, FloatArray]:
    """(scheduled tokens T, the modelled step without the LoRA kernels' per-token and
    per-adapter cost: base step + one-adapter intercept ``l_0`` + the slots' cost) per R3 run."""
    prefill = mean_prompt * r.per_step
    ctx = r.running * (mean_prompt + r.out_len / 2.0)
    plain = base.predict(r.running + w_p * prefill, ctx) + l_0 + slots.predict(r.loras, r.rank)
    return r.running + prefill, plain


def _r3_lora_rows(
    table: Table, base: BaseStepFit, w_p: float, l_0: float, slots: SlotCost, mean_prompt: float
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """R3 rows as (x = [T, T*max_loras, A], y = LoRA ms left to explain, measured compute ms,
    max_loras).

    Per step: the measured step interval minus the measured scheduling time; ``B`` running
    requests and ``A`` adapters in the batch (both logged per step); the prompts of the requests
    admitted meanwhile, ``mean_prompt * completed / steps`` prefill tokens; ``T = B + prefill``
    (the LoRA kernels run over every scheduled token). The base step (the model's own decode
    fit, with the prefill weight and the context of requests half-way through their outputs),
    the one-adapter intercept ``l_0`` and the slots' per-step cost are taken out.
    """
    r = _r3_steps(table)
    running, compute = r.running, r.compute_ms
    ok = (
        np.isfinite(compute)
        & np.isfinite(running)
        & np.isfinite(r.adapters)
        & np.isfinite(r.loras)
        & np.isfinite(r.per_step)
        & np.isfinite(r.out_len)
        & (running > 2.0)
    )
    tokens, plain = _r3_modelled_step(r, base, w_p, l_0, slots, mean_prompt)
    y = compute - plain
    # l_0 is R6's whole one-adapter step (one token, one slot, one adapter): the kernels' cost
    # is counted from there, or R6's own token, slot and adapter would be paid twice.
    x = np.c_[tokens, tokens * r.loras, r.adapters] - np.asarray(R6_ANCHOR)
    return x[ok], y[ok], compute[ok], r.loras[ok]


# A group of R3 runs (``source``: its file) whose small-batch steps (3-8 running requests, no
# queue) take this many times the model's own one-adapter LoRA step or more ran on a slower
# server than the other calibration runs and is left out of the LoRA fit.
R3_SLOW_GROUP_RATIO = 1.4


def r3_consistent_rows(
    table: Table,
    base: BaseStepFit,
    w_p: float,
    l_0: float,
    slots: SlotCost,
    mean_prompt: float = R3_MEAN_PROMPT_TOKENS,
) -> tuple[Table, str]:
    """R3's rows without the groups whose steps disagree with the model's small-batch step.

    A step of 3-8 running requests costs the base step (R4) plus the one-adapter LoRA step
    (R6) and the slots' cost (R7) plus a few adapters' worth: R3's adapter-rate sweep takes
    15-16 ms there, like R6's and R7's single-request runs (13-15 ms), but its
    aggregated-rate sweep takes 26-27 ms at the same batches (and stays flat up to ~30
    requests): those servers ran slower, for a reason the data does not record, so their steps
    do not price the LoRA kernels of the others. Their scheduling times (CPU-side) are still
    used by ``fit_scheduler``. Returns (kept rows, note).
    """
    sources = [t.get("source", "") for t in table.text]
    if len(set(sources)) < 2:
        return table, ""
    r = _r3_steps(table)
    _, plain = _r3_modelled_step(r, base, w_p, l_0, slots, mean_prompt)
    small = (
        np.isfinite(r.compute_ms)
        & np.isfinite(plain)
        & (r.running >= 3.0)
        & (r.running <= 8.0)
        & (np.nan_to_num(r.waiting, nan=1e9) < 1.0)
    )
    dropped: list[str] = []
    ratios: list[str] = []
    for source in sorted(set(sources)):
        rows = small & np.array([s == source for s in sources], dtype=bool)
        if not rows.any():
            continue
        ratio = float(np.median(r.compute_ms[rows] / plain[rows]))
        ratios.append(f"{source or '?'} {ratio:.2f}x ({int(rows.sum())} runs)")
        if ratio >= R3_SLOW_GROUP_RATIO:
            dropped.append(source)
    note = "small-batch step vs base + one-adapter LoRA step: " + ", ".join(ratios)
    if not dropped or len(dropped) == len(set(sources)):
        return table, note
    keep = [i for i, s in enumerate(sources) if s not in dropped]
    kept = Table(values=[table.values[i] for i in keep], text=[table.text[i] for i in keep])
    return kept, note + f"; left out: {', '.join(dropped)}"


def fit_lora_poisson(
    r3: Table,
    base: BaseStepFit,
    w_p: float,
    l_0: float,
    slots: SlotCost,
    mean_prompt: float = R3_MEAN_PROMPT_TOKENS,
) -> tuple[float, float, float, ComponentFit]:
    """LoRA cost ``l_tok*T + l_slot*T*max_loras + l_ad*A`` from the R3 runs.

    R3 (777 600-s runs of the same engine under Poisson load, max_loras 8..448, up to ~500
    running requests and ~120 adapters per step) is the regime of the one-hour runs the twin
    replays, and it spans the slot counts: the triton LoRA kernels launch programs per (token
    tile, slot), so part of the per-token cost grows with ``max_loras``. R5 (all prompts at
    once, ``max_num_seqs`` 220/250, max_loras 300 only) prices an adapter at ~0.33 ms where R3
    gives ~0.53 ms (0.51-0.58 ms whatever mean prompt is assumed); R3 wins where both exist,
    R5 is the fallback (``fit_lora``). Errors are relative to the measured step; rows missed
    by more than ``TRIM_PCT`` are dropped once. Returns (l_tok, l_slot, l_ad, quality).
    """
    x, y, total, loras = _r3_lora_rows(r3, base, w_p, l_0, slots, mean_prompt)
    keep = np.ones(len(y), dtype=bool)
    c = np.zeros(3)
    for _ in range(2):
        w = 1.0 / np.maximum(np.abs(total[keep]), 1e-9)
        cols = [0, 1, 2]
        while True:  # non-negative least squares on three columns: drop negatives, refit
            sol, *_ = np.linalg.lstsq(x[keep][:, cols] * w[:, None], y[keep] * w, rcond=None)
            if (sol >= 0).all() or len(cols) == 1:
                c = np.zeros(3)
                c[cols] = np.maximum(sol, 0.0)
                break
            cols = [k for k, v in zip(cols, sol, strict=True) if v >= 0] or cols[:1]
        rel = np.abs(x @ c - y) / np.maximum(total, 1e-9) * 100.0
        new_keep = rel <= TRIM_PCT
        if new_keep.sum() < 3 or (new_keep == keep).all():
            break
        keep = new_keep
    pred = x @ c - y + total
    note = (
        f"R3 step intervals minus scheduling ({int(keep.sum())} runs, max_loras "
        f"{int(np.min(loras))}-{int(np.max(loras))}, mean prompt "
        f"{mean_prompt:.0f} tokens); {int((~keep).sum())} runs beyond {TRIM_PCT:.0f}% "
        f"dropped"
    )
    return float(c[0]), float(c[1]), float(c[2]), quality(pred[keep], total[keep], note)


def fit_slot_share(table: Table, reference_max_loras: float) -> tuple[float, str]:
    """Share of the per-token LoRA cost that grows with ``max_loras`` (R3 step intervals).

    The triton LoRA kernels launch one program per (token tile, LoRA slot) and the programs of
    empty slots exit early, so part of the per-token cost scales with the number of slots.
    R3 (600-s runs at max_loras 8..448, no queue) gives the split: step - sched =
    c + b_run*B + b_ad*A + b_slot*B*max_loras, share = b_slot*G / (b_run + b_slot*G) at the
    reference G of the LoRA-overhead runs (a lower bound: b_run also holds base compute).
    """
    if not len(table) or not math.isfinite(reference_max_loras):
        return 0.0, "no scheduler/slot data: per-token LoRA cost independent of max_loras"
    r = _r3_steps(table)
    running, waiting, adapters, slots, y = r.running, r.waiting, r.adapters, r.loras, r.compute_ms
    ok = np.isfinite(y) & np.isfinite(running) & np.isfinite(adapters) & np.isfinite(slots)
    ok &= (np.nan_to_num(waiting, nan=1e9) < 10.0) & (running > 2.0)
    if ok.sum() < 10 or np.unique(slots[ok]).size < 3:
        return 0.0, "too few R3 rows: per-token LoRA cost independent of max_loras"
    x = np.c_[np.ones(int(ok.sum())), running[ok], adapters[ok], running[ok] * slots[ok]]
    c = wlstsq(x, y[ok])
    b_run, b_slot = max(float(c[1]), 0.0), max(float(c[3]), 0.0)
    if b_run + b_slot <= 0:
        return 0.0, "R3 shows no per-token cost: per-token LoRA cost independent of max_loras"
    share = b_slot * reference_max_loras / (b_run + b_slot * reference_max_loras)
    return share, (
        f"R3 ({int(ok.sum())} runs without queue): b_run={b_run:.4f} ms, "
        f"b_slot={b_slot:.6f} ms/slot -> share {share:.2f} at "
        f"max_loras={reference_max_loras:.0f}"
    )


# ---------------------------------------------------------------- which model ran R3


# R3 runs with more CPU->GPU swaps after start-up than this price one load.
R3_MIN_SWAPS = 50


def r3_load_ms(table: Table) -> tuple[float, float, int]:
    """(median ms of one CPU->GPU adapter load, adapter rank, runs) of the R3 runs.

    R3 logs each run's total CPU->GPU loading time (``max_lora_loading_time``, s) and its loads
    from memory, with (``max_lora_loads_from_memory``) and without
    (``..._corrected``) the start-up loads. The total time holds the start-up loads too (runs
    without a swap after start-up log ~8 ms per start-up load), so a load costs the time over
    all memory loads, taken on the runs with more than ``R3_MIN_SWAPS`` swaps. (Over the swaps
    alone the start-up time is charged to the swaps: hundreds of start-up loads against ~50
    swaps give 12-16 ms at the 90th percentile where per load it is 8 ms.)
    Returns nan without those columns.
    """
    time_s = arr(table.column("max_lora_loading_time"))
    loads = arr(table.column("max_lora_loads_from_memory"))
    swaps = arr(table.column("max_lora_loads_from_memory_corrected"))
    rank = arr(table.column("rank"))
    ok = (
        np.isfinite(time_s)
        & np.isfinite(loads)
        & np.isfinite(swaps)
        & (swaps > R3_MIN_SWAPS)
        & (loads >= swaps)
        & (time_s > 0)
    )
    ranks = rank[ok & np.isfinite(rank)]
    if not ok.any() or not ranks.size:
        return math.nan, math.nan, 0
    return (
        float(np.median(time_s[ok] / loads[ok] * 1000.0)),
        float(np.median(ranks)),
        int(ok.sum()),
    )


def attribute_r3(data: CalibrationData) -> tuple[str | None, str]:
    """The model that ran R3 (which does not name it), decided from adapter load times.

    A CPU->GPU load of the same adapter rank costs each model its own time (R6: rank 8 at
    6.4-8.1 ms for Llama-3.1-8B, 3.0-3.5 ms for Qwen-2.5-7B), so R3's median load
    (``r3_load_ms``) names the model whose R6 swap fit (``fit_cpu_load``, at R3's rank without
    padding) is nearest on a log scale. ``None`` (and no note) when the folder has fewer than two
    models with R6 rows, R3 records no loads, or two models are equally near.
    """
    r3_ms, rank, runs = r3_load_ms(data.scheduler)
    if not math.isfinite(r3_ms) or not data.peers:
        return None, ""
    swap_ms: dict[str, float] = {}
    for name, model_data in [(data.model, data), *sorted(data.peers.items())]:
        c0, c_rank, _, quality = fit_cpu_load(model_data.loading)
        if quality.rows and c0 + c_rank * rank > 0:
            swap_ms[name] = c0 + c_rank * rank
    if len(swap_ms) < 2:
        return None, ""
    distance = {name: abs(math.log(r3_ms / ms)) for name, ms in swap_ms.items()}
    ranked = sorted(swap_ms, key=lambda name: distance[name])
    if math.isclose(distance[ranked[0]], distance[ranked[1]]):
        return None, ""
    swaps = ", ".join(f"{name} {swap_ms[name]:.1f} ms" for name in ranked)
    return ranked[0], (
        f"{ranked[0]} (R3's adapter loads {r3_ms:.1f} ms median over {runs} runs "
        f"with > {R3_MIN_SWAPS} swaps, rank {rank:.0f}; R6 swaps: {swaps})"
    )
