"""Step-time fits without LoRA: scheduler, base step, prefill weight, and the slots' step cost.

Why this shape (all from the calibration data, see ``calibrate.FitReport``):
- base: decode ITL is flat (weights-bandwidth bound) up to a knee K of ~70-120 running
  sequences and then linear; longer contexts cost more (attention reads the KV cache), clearly
  for Llama-3.1-8B (8 KV heads), negligibly for Qwen-2.5-7B (4 KV heads). A hinge fits the R4
  decode sweep at ~2.5 % MAPE where the paper's straight line is at ~4-6 %.
- prefill: R4 prefill runs (1 output token) run full 2048-token chunks at a constant ~55 ms,
  which fixes w_p. Without prefill rows for a model the weight of the other models is used.
- scheduler: R3's ``total_scheduling_time/steps`` is linear in running and waiting requests
  (vLLM 0.8.5 scans the whole waiting queue when the LoRA slots are full).
- slots: a LoRA-enabled engine pays a per-step cost of every slot,
  ``max_loras * (u0 + u_r * max(max_lora_rank, 16))``, measured by R7's single-request ITLs
  (``fit_slot_cost``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from loragate.core.errors import ConfigError
from loragate.twin.calibrate_fit import ComponentFit, FloatArray, arr, quality, wlstsq
from loragate.twin.calibration_data import CalibrationData, Table
from loragate.twin.profile import SLOT_RANK_FLOOR

_KNEE_GRID = tuple(range(0, 401, 5))


# ---------------------------------------------------------------- scheduler


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerFit:
    s0: float
    s_run: float
    s_wait: float
    s_wait_full: float | None = None  # while every LoRA slot is taken (queue walk)
    max_waiting: int | None = None  # vLLM's waiting queue saturates here (front end)

    def predict(self, running: FloatArray, waiting: FloatArray) -> FloatArray:
        return self.s0 + self.s_run * running + self.s_wait * waiting


def fit_scheduler(table: Table, base: Table) -> tuple[SchedulerFit, ComponentFit]:
    """sched_ms = s0 + s_run*B + s_wait*W from R3 (or the base runs' scheduler lines).

    Where R3 records the slots and the adapters per batch, the waiting term is fitted
    separately for runs whose batches hold every slot (mean adapters >= 90% of max_loras):
    vLLM 0.8.5 then walks the whole waiting queue each step, skipping other adapters.
    """
    if len(table):
        total = arr(table.column("total_scheduling_time"))
        steps = arr(table.column("steps"))
        running = arr(table.column("avg_batch_size"))
        waiting = arr(table.column("avg_waiting_queue"))
        slots = arr(table.column("gpu_loras"))
        adapters = arr(table.column("mean_loras_by_batch"))
        y = total / np.where(steps > 0, steps, np.nan) * 1000.0
        ok = np.isfinite(y) & np.isfinite(running) & np.isfinite(waiting) & (y > 0)
        full = np.isfinite(slots) & np.isfinite(adapters) & (adapters >= 0.9 * slots)
        split = (ok & full).sum() >= 5 and (ok & ~full).sum() >= 5
        if ok.sum() >= 3:
            cols = [np.ones(int(ok.sum())), running[ok]]
            if split:
                cols += [(waiting * ~full)[ok], (waiting * full)[ok]]
            else:
                cols.append(waiting[ok])
            c = wlstsq(np.column_stack(cols), y[ok], relative=False)
            s_full = max(float(c[3]), 0.0) if split else None
            # Offered far beyond capacity (R3 goes to 150 req/s), the engine's waiting queue
            # stops growing: the largest mean queue is where the front end saturates.
            sat = int(np.nanmax(waiting[ok])) if np.nanmax(waiting[ok]) >= 1000 else None
            sched = SchedulerFit(
                s0=max(float(c[0]), 0.0),
                s_run=max(float(c[1]), 0.0),
                s_wait=max(float(c[2]), 0.0),
                s_wait_full=s_full,
                max_waiting=sat,
            )
            pred = sched.predict(running[ok], waiting[ok])
            if s_full is not None:
                pred = pred + (s_full - sched.s_wait) * (waiting * full)[ok]
            note = "R3 total_scheduling_time/steps"
            if split:
                note += f" ({int((ok & full).sum())} runs with all LoRA slots taken)"
            return sched, quality(pred, y[ok], note)
    running = arr(base.column("mean_running_batch"))
    y = arr(base.column("sched_time_mean_ms"))
    ok = np.isfinite(running) & np.isfinite(y)
    if ok.sum() >= 2:
        c = wlstsq(np.c_[np.ones(int(ok.sum())), running[ok]], y[ok], relative=False)
        sched = SchedulerFit(s0=max(float(c[0]), 0.0), s_run=max(float(c[1]), 0.0), s_wait=0.0)
        return sched, quality(
            sched.predict(running[ok], 0 * y[ok]),
            y[ok],
            "base runs' scheduler lines (no waiting-queue term)",
        )
    return SchedulerFit(s0=0.0, s_run=0.0, s_wait=0.0), quality(arr([]), arr([]), "no data")


# ---------------------------------------------------------------- base (no LoRA) compute


@dataclass(frozen=True, slots=True, kw_only=True)
class BaseStepFit:
    m0: float
    knee: float
    a: float
    a_ctx: float

    def predict(self, tokens: FloatArray, ctx: FloatArray) -> FloatArray:
        return self.m0 + self.a * np.maximum(0.0, tokens - self.knee) + self.a_ctx * ctx


def steady_rows(
    table: Table, sched: SchedulerFit, w_p: float
) -> tuple[FloatArray, FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """(effective tokens per step, context tokens, compute ms, row mask) of all-at-once runs.

    All prompts are sent at once and the running set turns over continuously, so in steady
    state each step also prefills ``running * prompt / output`` prompt tokens, and a running
    request is on average half-way through its output.

    Where the engine's own counters exist (real vLLM CPU data, ``data/tiny-llama-cpu``), they
    replace the client-side figures: the server-side ITL (``itl_server_mean_ms``, the
    ``vllm:inter_token_latency_seconds`` histogram; the client's ITL is distorted by token
    coalescing in the API server at fast steps) and the exact tokens per engine step
    (``mean_tokens_per_step``) instead of the polled running batch.
    """
    running = arr(table.column("mean_running_batch"))
    itl = arr(table.column("itl_mean_ms"))
    itl_server = arr(table.column("itl_server_mean_ms"))
    itl = np.where(np.isfinite(itl_server), itl_server, itl)
    prompt = arr(table.column("mean_input_tokens_per_prompt"))
    prompt = np.nan_to_num(
        np.where(np.isfinite(prompt), prompt, arr(table.column("input_len"))), nan=1.0
    )
    out = arr(table.column("output_len"))
    sched_meas = arr(table.column("sched_time_mean_ms"))
    sched_ms = np.where(
        np.isfinite(sched_meas),
        sched_meas,
        sched.predict(np.nan_to_num(running), np.zeros_like(running)),
    )
    safe_out = np.where(np.isfinite(out) & (out > 1), out, 1.0)
    per_step = arr(table.column("mean_tokens_per_step"))
    # Decode sequences per step: from the step counter (prompt and output tokens of a request
    # are in the proportion prompt : output) where recorded, else the polled running batch.
    decode = np.where(np.isfinite(per_step), per_step * safe_out / (safe_out + prompt), running)
    ok = np.isfinite(decode) & np.isfinite(itl) & np.isfinite(out) & (decode > 0) & (out > 1)
    decode = np.where(ok, decode, 1.0)
    tokens = decode * (1.0 + w_p * prompt / safe_out)
    ctx = decode * (prompt + safe_out / 2.0)
    return tokens, ctx, itl - sched_ms, ok


def fit_base(
    table: Table, sched: SchedulerFit, w_p: float = 0.6
) -> tuple[BaseStepFit, ComponentFit]:
    tokens, ctx, y, ok = steady_rows(table, sched, w_p)
    ok &= np.array([(t.get("phase") or "decode") == "decode" for t in table.text], dtype=bool)
    running, ctx, y = tokens[ok], ctx[ok], y[ok]
    if y.size < 4:
        raise ConfigError("need at least 4 decode rows in base_latency.csv to fit the step time")
    # The context term needs rows whose context per token varies (different prompt/output
    # lengths); with one shape (e.g. the CPU sweep: 8 in / 256 out) it is collinear with the
    # token term and is left out.
    per_token_ctx = ctx / np.maximum(running, 1e-9)
    use_ctx = float(np.std(per_token_ctx)) > 0.01 * float(np.mean(per_token_ctx))
    best: tuple[float, BaseStepFit] | None = None
    for knee in _KNEE_GRID:
        if knee >= float(np.max(running)):
            break
        x = np.c_[np.ones_like(y), np.maximum(0.0, running - knee), ctx if use_ctx else 0 * ctx]
        c = wlstsq(x, y)
        if c[1] <= 0:
            continue
        base = BaseStepFit(
            m0=float(c[0]),
            knee=float(knee),
            a=float(c[1]),
            a_ctx=max(float(c[2]), 0.0) if use_ctx else 0.0,
        )
        err = float(np.mean(np.abs(base.predict(running, ctx) - y) / y))
        if best is None or err < best[0]:
            best = (err, base)
    if best is None:
        raise ConfigError("decode rows do not show ITL growing with the batch")
    base = best[1]
    return base, quality(base.predict(running, ctx), y, f"hinge knee at {base.knee:.0f} tokens")


def _prefill_weights(table: Table, base: BaseStepFit, sched: SchedulerFit) -> FloatArray:
    """Prefill-token weight w_p from full-chunk prefill runs (step time vs chunk tokens)."""
    phase = [t.get("phase", "") for t in table.text]
    steps = arr(table.column("n_steps"))
    interval = arr(table.column("mean_step_interval_ms"))
    tokens = arr(table.column("total_input_tokens"))
    running = arr(table.column("mean_running_batch"))
    sched_meas = arr(table.column("sched_time_mean_ms"))
    sched_ms = np.where(
        np.isfinite(sched_meas),
        sched_meas,
        sched.predict(np.nan_to_num(running), np.zeros_like(steps)),
    )
    chunk = tokens / np.where(steps > 0, steps, np.nan)
    is_pre = np.array([p == "prefill" for p in phase], dtype=bool)
    ok = is_pre & np.isfinite(chunk) & np.isfinite(interval) & (steps >= 20) & (chunk >= 256)
    compute = interval[ok] - sched_ms[ok]
    w = (base.knee + (compute - base.m0) / base.a) / chunk[ok]
    return np.asarray(w[np.isfinite(w) & (w > 0)], dtype=np.float64)


def fit_prefill_weight(
    data: CalibrationData, base: BaseStepFit, sched: SchedulerFit
) -> tuple[float, str]:
    own = _prefill_weights(data.base_latency, base, sched)
    if own.size:
        return float(np.median(own)), f"{own.size} prefill rows of {data.model}"
    # Fallback: the relative cost of a prefill token measured on the other models.
    others: list[float] = []
    models = sorted({t.get("model", "") for t in data.base_latency_all.text} - {data.model})
    for other in models:
        idx = [i for i, t in enumerate(data.base_latency_all.text) if t.get("model") == other]
        sub = Table(
            values=[data.base_latency_all.values[i] for i in idx],
            text=[data.base_latency_all.text[i] for i in idx],
        )
        try:
            other_base, _ = fit_base(sub, sched, 0.6)
        except ConfigError:
            continue
        others.extend(float(v) for v in _prefill_weights(sub, other_base, sched))
    if others:
        return float(np.median(others)), f"no usable prefill rows: weight of {', '.join(models)}"
    return 1.0, "no prefill data: prefill token weighted as a decode token"


# ---------------------------------------------------------------- LoRA slots: per-step cost


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotCost:
    """Per-step cost of a LoRA-enabled engine's slots: ``L * (u0 + u_r * max(R, floor))``."""

    u0: float = 0.0
    u_r: float = 0.0
    floor: float = float(SLOT_RANK_FLOOR)

    def predict(self, max_loras: FloatArray, max_lora_rank: FloatArray) -> FloatArray:
        ranks = np.maximum(np.nan_to_num(max_lora_rank, nan=self.floor), self.floor)
        return np.nan_to_num(max_loras, nan=0.0) * (self.u0 + self.u_r * ranks)


def fit_slot_cost(table: Table) -> tuple[SlotCost, ComponentFit]:
    """ITL = a + L * (u0 + u_r * max(R, 16)) on single-request runs over (max_loras L, R).

    The R7 sweep started one LoRA-enabled server per (L, R) and sent it one base-model request:
    its ITL is a one-sequence step whose LoRA slots are all empty, and it grows linearly with L
    (Llama-3.1-8B: ~13.0 ms at L=8 to ~21.2 ms at L=352), faster at R=32 than at 8 or 16 (equal:
    the kernels tile the rank no finer than 16). The intercept ``a`` is the base step of that
    engine and is not used (the decode fit has it).
    """
    loras = arr(table.column("max_loras"))
    ranks = arr(table.column("max_lora_rank"))
    itl = arr(table.column("itl_mean_ms"))
    ok = np.isfinite(loras) & np.isfinite(ranks) & np.isfinite(itl) & (loras > 0)
    if ok.sum() < 3 or np.unique(loras[ok]).size < 2:
        return SlotCost(), quality(
            arr([]), arr([]), "no single-request sweep over max_loras: no per-slot cost"
        )
    eff = np.maximum(ranks[ok], float(SLOT_RANK_FLOOR))
    several_ranks = np.unique(eff).size >= 2
    x = (
        np.c_[np.ones(int(ok.sum())), loras[ok], loras[ok] * eff]
        if several_ranks
        else np.c_[np.ones(int(ok.sum())), loras[ok]]
    )
    c = wlstsq(x, itl[ok])
    u0 = max(float(c[1]), 0.0)
    u_r = max(float(c[2]), 0.0) if several_ranks else 0.0
    slots = SlotCost(u0=u0, u_r=u_r)
    pred = float(c[0]) + slots.predict(loras[ok], ranks[ok])
    note = (
        f"single-request ITL vs max_loras x max(max_lora_rank, {SLOT_RANK_FLOOR}): "
        f"{u0 * 1000:.2f} us/slot + {u_r * 1000:.3f} us/slot/rank "
        f"(base step {float(c[0]):.2f} ms)"
    )
    return slots, quality(pred, itl[ok], note)
