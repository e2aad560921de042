"""Fit a performance profile's coefficients from benchmark measurements (numpy least squares).

The step-time model (milliseconds; B running requests, D decode tokens, P prefill tokens,
C = sum of the context lengths (KV tokens) of the running requests, A distinct adapters in the
batch, W waiting requests):

    T_eff    = D + w_p * P                      prefill tokens are cheaper than decode tokens
    base     = m0 + a * max(0, T_eff - K) + a_ctx * C
    lora     = l_tok * T_eff + l_ad * A         only with --enable-lora
    sched    = s0 + s_run * B + s_wait * W      CPU-side scheduler, synchronous with the step
    step     = base + lora + sched (+ adapter load times, added by the engine)

Why this shape (all from the calibration data, see ``FitReport``):
- base: decode ITL is flat (weights-bandwidth bound) up to a knee K of ~70-120 running
  sequences and then linear; longer contexts cost more (attention reads the KV cache), clearly
  for Llama-3.1-8B (8 KV heads), negligibly for Qwen-2.5-7B (4 KV heads). A hinge fits the R4
  decode sweep at ~2.5 % MAPE where the paper's straight line is at ~4-6 %.
- prefill: R4 prefill runs (1 output token) run full 2048-token chunks at a constant ~55 ms,
  which fixes w_p. Without prefill rows for a model the weight of the other models is used.
- LoRA: the punica/triton kernels do work proportional to the tokens and one extra tile per
  active adapter. By default (``lora_source="poisson"``) the LoRA terms are fitted on R3's
  Poisson runs over 8..448 slots, the regime of real deployments, after a per-step cost of
  every slot, ``max_loras * (u0 + u_r * max(max_lora_rank, 16))``, measured by R7's
  single-request ITLs (``fit_slot_cost``, ``fit_lora_poisson``). R6's one-request step
  (one token, one adapter, one slot; its median ITL, see ``fit_lora_intercept``) minus the
  base step already holds one token's, slot's and adapter's cost: the fits count those terms
  from there (``R6_ANCHOR``), not on top.
  R3 does not name its model: its adapter loads take the R6 swap time of one model
  (``attribute_r3``). That model's LoRA terms are fitted on R3; another model's are those
  prices scaled by the two models' LoRA cost ratio on matched R5 runs
  (``transferred_r3_prices``), with its own R6 step, slot cost, base step, loads and KV.
  ``lora_source="batch"`` fits them on R5 instead (all prompts at once, max_loras 300: an
  overhead linear in the per-step unique adapters, no LoRA intercept at tiny batches). The
  compute data holds rank 8 only, so no rank term is fitted (the R6 ITLs show no rank effect
  at small batches either).
- scheduler: R3's ``total_scheduling_time/steps`` is linear in running and waiting requests
  (vLLM 0.8.5 scans the whole waiting queue when the LoRA slots are full).
- loads: CPU->GPU swap time per (adapter rank, max_lora_rank) from R6 (padding an adapter to a
  larger max rank costs extra), disk->CPU linear in rank.
- KV: ``KV0 - max_loras * (c_rank * max_lora_rank + c_slot)`` from the R7 start-up sweep.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

from loragate.core.errors import ConfigError
from loragate.twin.calibration_data import CalibrationData, Table, load_calibration_data
from loragate.twin.profile import (
    SLOT_RANK_FLOOR,
    KvModel,
    LoadModel,
    LoraModel,
    PerformanceProfile,
    RankCost,
    SchedulerModel,
    StepModel,
)

FloatArray = npt.NDArray[np.float64]

DEFAULT_TOKEN_BUDGET = 2048
_KNEE_GRID = tuple(range(0, 401, 5))
_TRIM_PCT = 25.0
_PREFILL_ITERATIONS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class FittedCoefficients:
    """Every coefficient of the model above (ms unless the name says otherwise)."""

    base_ms: float
    knee_tokens: float
    per_token_ms: float
    prefill_token_weight: float
    context_ms_per_token: float
    lora_intercept_ms: float
    lora_per_token_ms: float
    lora_per_token_slot_ms: float
    lora_per_adapter_ms: float
    lora_rank_ms_per_rank_token: float
    lora_reference_max_loras: float
    lora_ms_per_slot: float
    lora_ms_per_slot_per_rank: float
    sched_base_ms: float
    sched_per_running_ms: float
    sched_per_waiting_ms: float
    sched_per_waiting_slots_full_ms: float | None
    max_waiting_requests: int | None
    cpu_load_base_ms: float
    cpu_load_per_rank_ms: float
    cpu_load_pad_ms: float
    disk_load_base_ms: float
    disk_load_per_rank_ms: float
    kv_base_tokens: float
    kv_per_slot_rank_tokens: float
    kv_per_slot_tokens: float
    kv_no_lora_tokens: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ComponentFit:
    """Quality of one component's fit on its own calibration rows."""

    rows: int
    mape_pct: float
    max_abs_pct: float
    note: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class FitReport:
    model: str
    coefficients: FittedCoefficients
    components: dict[str, ComponentFit] = field(default_factory=dict)
    # The LoRA prices come from R3 (this model's steps or, scaled, those of R3's model).
    lora_from_r3: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "coefficients": asdict(self.coefficients),
            "components": {k: asdict(v) for k, v in self.components.items()},
        }


# ---------------------------------------------------------------- small numeric helpers


def _arr(values: list[float]) -> FloatArray:
    return np.asarray(values, dtype=np.float64)


def _wlstsq(x: FloatArray, y: FloatArray, *, relative: bool = True) -> FloatArray:
    """Least squares, weighted by 1/y so that relative errors are minimised."""
    if relative:
        w = 1.0 / np.maximum(np.abs(y), 1e-9)
        coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    else:
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return np.asarray(coef, dtype=np.float64)


def _quality(pred: FloatArray, y: FloatArray, note: str = "") -> ComponentFit:
    if y.size == 0:
        return ComponentFit(rows=0, mape_pct=math.nan, max_abs_pct=math.nan, note=note)
    rel = np.abs(pred - y) / np.maximum(np.abs(y), 1e-12) * 100.0
    return ComponentFit(
        rows=int(y.size), mape_pct=float(rel.mean()), max_abs_pct=float(rel.max()), note=note
    )


def _finite(*cols: list[float]) -> npt.NDArray[np.bool_]:
    mask = np.ones(len(cols[0]), dtype=bool)
    for col in cols:
        mask &= np.isfinite(_arr(col))
    return mask


def expected_distinct(n_adapters: FloatArray, batch: FloatArray) -> FloatArray:
    """Expected distinct adapters among ``batch`` requests drawn uniformly from ``n``."""
    n = np.maximum(n_adapters, 1.0)
    return np.minimum(n * (1.0 - np.power(1.0 - 1.0 / n, batch)), np.maximum(batch, 1.0))


# ---------------------------------------------------------------- scheduler


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sched:
    s0: float
    s_run: float
    s_wait: float
    s_wait_full: float | None = None  # while every LoRA slot is taken (queue walk)
    max_waiting: int | None = None  # vLLM's waiting queue saturates here (front end)

    def predict(self, running: FloatArray, waiting: FloatArray) -> FloatArray:
        return self.s0 + self.s_run * running + self.s_wait * waiting


def fit_scheduler(table: Table, base: Table) -> tuple[_Sched, ComponentFit]:
    """sched_ms = s0 + s_run*B + s_wait*W from R3 (or the base runs' scheduler lines).

    Where R3 records the slots and the adapters per batch, the waiting term is fitted
    separately for runs whose batches hold every slot (mean adapters >= 90% of max_loras):
    vLLM 0.8.5 then walks the whole waiting queue each step, skipping other adapters.
    """
    if len(table):
        total = _arr(table.column("total_scheduling_time"))
        steps = _arr(table.column("steps"))
        running = _arr(table.column("avg_batch_size"))
        waiting = _arr(table.column("avg_waiting_queue"))
        slots = _arr(table.column("gpu_loras"))
        adapters = _arr(table.column("mean_loras_by_batch"))
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
            c = _wlstsq(np.column_stack(cols), y[ok], relative=False)
            s_full = max(float(c[3]), 0.0) if split else None
            # Offered far beyond capacity (R3 goes to 150 req/s), the engine's waiting queue
            # stops growing: the largest mean queue is where the front end saturates.
            sat = int(np.nanmax(waiting[ok])) if np.nanmax(waiting[ok]) >= 1000 else None
            sched = _Sched(s0=max(float(c[0]), 0.0), s_run=max(float(c[1]), 0.0),
                           s_wait=max(float(c[2]), 0.0), s_wait_full=s_full, max_waiting=sat)
            pred = sched.predict(running[ok], waiting[ok])
            if s_full is not None:
                pred = pred + (s_full - sched.s_wait) * (waiting * full)[ok]
            note = "R3 total_scheduling_time/steps"
            if split:
                note += f" ({int((ok & full).sum())} runs with all LoRA slots taken)"
            return sched, _quality(pred, y[ok], note)
    running = _arr(base.column("mean_running_batch"))
    y = _arr(base.column("sched_time_mean_ms"))
    ok = np.isfinite(running) & np.isfinite(y)
    if ok.sum() >= 2:
        c = _wlstsq(np.c_[np.ones(int(ok.sum())), running[ok]], y[ok], relative=False)
        sched = _Sched(s0=max(float(c[0]), 0.0), s_run=max(float(c[1]), 0.0), s_wait=0.0)
        return sched, _quality(sched.predict(running[ok], 0 * y[ok]), y[ok],
                               "base runs' scheduler lines (no waiting-queue term)")
    return _Sched(s0=0.0, s_run=0.0, s_wait=0.0), _quality(_arr([]), _arr([]), "no data")


# ---------------------------------------------------------------- base (no LoRA) compute


@dataclass(frozen=True, slots=True, kw_only=True)
class _Base:
    m0: float
    knee: float
    a: float
    a_ctx: float

    def predict(self, tokens: FloatArray, ctx: FloatArray) -> FloatArray:
        return self.m0 + self.a * np.maximum(0.0, tokens - self.knee) + self.a_ctx * ctx


def _steady_rows(
    table: Table, sched: _Sched, w_p: float
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
    running = _arr(table.column("mean_running_batch"))
    itl = _arr(table.column("itl_mean_ms"))
    itl_server = _arr(table.column("itl_server_mean_ms"))
    itl = np.where(np.isfinite(itl_server), itl_server, itl)
    prompt = _arr(table.column("mean_input_tokens_per_prompt"))
    prompt = np.nan_to_num(np.where(np.isfinite(prompt), prompt, _arr(table.column("input_len"))),
                           nan=1.0)
    out = _arr(table.column("output_len"))
    sched_meas = _arr(table.column("sched_time_mean_ms"))
    sched_ms = np.where(np.isfinite(sched_meas), sched_meas,
                        sched.predict(np.nan_to_num(running), np.zeros_like(running)))
    safe_out = np.where(np.isfinite(out) & (out > 1), out, 1.0)
    per_step = _arr(table.column("mean_tokens_per_step"))
    # Decode sequences per step: from the step counter (prompt and output tokens of a request
    # are in the proportion prompt : output) where recorded, else the polled running batch.
    decode = np.where(np.isfinite(per_step), per_step * safe_out / (safe_out + prompt), running)
    ok = np.isfinite(decode) & np.isfinite(itl) & np.isfinite(out) & (decode > 0) & (out > 1)
    decode = np.where(ok, decode, 1.0)
    tokens = decode * (1.0 + w_p * prompt / safe_out)
    ctx = decode * (prompt + safe_out / 2.0)
    return tokens, ctx, itl - sched_ms, ok


def fit_base(table: Table, sched: _Sched, w_p: float = 0.6) -> tuple[_Base, ComponentFit]:
    tokens, ctx, y, ok = _steady_rows(table, sched, w_p)
    ok &= np.array([(t.get("phase") or "decode") == "decode" for t in table.text], dtype=bool)
    running, ctx, y = tokens[ok], ctx[ok], y[ok]
    if y.size < 4:
        raise ConfigError("need at least 4 decode rows in base_latency.csv to fit the step time")
    # The context term needs rows whose context per token varies (different prompt/output
    # lengths); with one shape (e.g. the CPU sweep: 8 in / 256 out) it is collinear with the
    # token term and is left out.
    per_token_ctx = ctx / np.maximum(running, 1e-9)
    use_ctx = float(np.std(per_token_ctx)) > 0.01 * float(np.mean(per_token_ctx))
    best: tuple[float, _Base] | None = None
    for knee in _KNEE_GRID:
        if knee >= float(np.max(running)):
            break
        x = np.c_[np.ones_like(y), np.maximum(0.0, running - knee), ctx if use_ctx else 0 * ctx]
        c = _wlstsq(x, y)
        if c[1] <= 0:
            continue
        base = _Base(m0=float(c[0]), knee=float(knee), a=float(c[1]),
                     a_ctx=max(float(c[2]), 0.0) if use_ctx else 0.0)
        err = float(np.mean(np.abs(base.predict(running, ctx) - y) / y))
        if best is None or err < best[0]:
            best = (err, base)
    if best is None:
        raise ConfigError("decode rows do not show ITL growing with the batch")
    base = best[1]
    return base, _quality(base.predict(running, ctx), y, f"hinge knee at {base.knee:.0f} tokens")


def _prefill_weights(table: Table, base: _Base, sched: _Sched) -> FloatArray:
    """Prefill-token weight w_p from full-chunk prefill runs (step time vs chunk tokens)."""
    phase = [t.get("phase", "") for t in table.text]
    steps = _arr(table.column("n_steps"))
    interval = _arr(table.column("mean_step_interval_ms"))
    tokens = _arr(table.column("total_input_tokens"))
    running = _arr(table.column("mean_running_batch"))
    sched_meas = _arr(table.column("sched_time_mean_ms"))
    sched_ms = np.where(np.isfinite(sched_meas), sched_meas,
                        sched.predict(np.nan_to_num(running), np.zeros_like(steps)))
    chunk = tokens / np.where(steps > 0, steps, np.nan)
    is_pre = np.array([p == "prefill" for p in phase], dtype=bool)
    ok = is_pre & np.isfinite(chunk) & np.isfinite(interval) & (steps >= 20) & (chunk >= 256)
    compute = interval[ok] - sched_ms[ok]
    w = (base.knee + (compute - base.m0) / base.a) / chunk[ok]
    return np.asarray(w[np.isfinite(w) & (w > 0)], dtype=np.float64)


def fit_prefill_weight(data: CalibrationData, base: _Base, sched: _Sched) -> tuple[float, str]:
    own = _prefill_weights(data.base_latency, base, sched)
    if own.size:
        return float(np.median(own)), f"{own.size} prefill rows of {data.model}"
    # Fallback: the relative cost of a prefill token measured on the other models.
    others: list[float] = []
    models = sorted({t.get("model", "") for t in data.base_latency_all.text} - {data.model})
    for other in models:
        idx = [i for i, t in enumerate(data.base_latency_all.text) if t.get("model") == other]
        sub = Table(values=[data.base_latency_all.values[i] for i in idx],
                    text=[data.base_latency_all.text[i] for i in idx])
        try:
            other_base, _ = fit_base(sub, sched, 0.6)
        except ConfigError:
            continue
        others.extend(float(v) for v in _prefill_weights(sub, other_base, sched))
    if others:
        return float(np.median(others)), f"no usable prefill rows: weight of {', '.join(models)}"
    return 1.0, "no prefill data: prefill token weighted as a decode token"


# ---------------------------------------------------------------- LoRA compute overhead


@dataclass(frozen=True, slots=True, kw_only=True)
class _Slots:
    """Per-step cost of a LoRA-enabled engine's slots: ``L * (u0 + u_r * max(R, floor))``."""

    u0: float = 0.0
    u_r: float = 0.0
    floor: float = float(SLOT_RANK_FLOOR)

    def predict(self, max_loras: FloatArray, max_lora_rank: FloatArray) -> FloatArray:
        ranks = np.maximum(np.nan_to_num(max_lora_rank, nan=self.floor), self.floor)
        return np.nan_to_num(max_loras, nan=0.0) * (self.u0 + self.u_r * ranks)


def fit_slot_cost(table: Table) -> tuple[_Slots, ComponentFit]:
    """ITL = a + L * (u0 + u_r * max(R, 16)) on single-request runs over (max_loras L, R).

    The R7 sweep started one LoRA-enabled server per (L, R) and sent it one base-model request:
    its ITL is a one-sequence step whose LoRA slots are all empty, and it grows linearly with L
    (Llama-3.1-8B: ~13.0 ms at L=8 to ~21.2 ms at L=352), faster at R=32 than at 8 or 16 (equal:
    the kernels tile the rank no finer than 16). The intercept ``a`` is the base step of that
    engine and is not used (the decode fit has it).
    """
    loras = _arr(table.column("max_loras"))
    ranks = _arr(table.column("max_lora_rank"))
    itl = _arr(table.column("itl_mean_ms"))
    ok = np.isfinite(loras) & np.isfinite(ranks) & np.isfinite(itl) & (loras > 0)
    if ok.sum() < 3 or np.unique(loras[ok]).size < 2:
        return _Slots(), _quality(_arr([]), _arr([]),
                                  "no single-request sweep over max_loras: no per-slot cost")
    eff = np.maximum(ranks[ok], float(SLOT_RANK_FLOOR))
    several_ranks = np.unique(eff).size >= 2
    x = (np.c_[np.ones(int(ok.sum())), loras[ok], loras[ok] * eff] if several_ranks
         else np.c_[np.ones(int(ok.sum())), loras[ok]])
    c = _wlstsq(x, itl[ok])
    u0 = max(float(c[1]), 0.0)
    u_r = max(float(c[2]), 0.0) if several_ranks else 0.0
    slots = _Slots(u0=u0, u_r=u_r)
    pred = float(c[0]) + slots.predict(loras[ok], ranks[ok])
    note = (f"single-request ITL vs max_loras x max(max_lora_rank, {SLOT_RANK_FLOOR}): "
            f"{u0 * 1000:.2f} us/slot + {u_r * 1000:.3f} us/slot/rank "
            f"(base step {float(c[0]):.2f} ms)")
    return slots, _quality(pred, itl[ok], note)


def _lora_run_adapters(table: Table) -> FloatArray:
    """Distinct adapters per step of the R5 runs (all prompts at once).

    Where the server log is missing, the per-step unique adapters are not known: the
    expectation for a batch drawn uniformly over the requested adapters is used (checked
    against the rows where both exist, see ``fit_lora``'s note). Closed-loop runs whose client
    w always uses adapter w mod n (``concurrency`` recorded) hold exactly min(n, batch)
    adapters.
    """
    running = _arr(table.column("mean_running_batch"))
    unique = _arr(table.column("mean_unique_adapters_per_step"))
    n_distinct = _arr(table.column("n_distinct_adapters"))
    clients = _arr(table.column("concurrency"))
    guess = np.where(np.isfinite(clients),
                     np.minimum(n_distinct, np.maximum(np.nan_to_num(running), 1.0)),
                     expected_distinct(n_distinct, running))
    return np.asarray(np.where(np.isfinite(unique), unique, guess), dtype=np.float64)


def fit_lora(
    table: Table, base: _Base, sched: _Sched, w_p: float, intercept_ms: float | None = 0.0,
    slots: _Slots | None = None, anchor_tokens: float = 1.0,
) -> tuple[float, float, float, ComponentFit]:
    """lora_ms = l_0 + l_tok * M + l_ad * A on the R5 runs (all prompts at once).

    M counts every scheduled token, prefill or decode: the LoRA shrink/expand kernels run over
    all tokens of the step (a prefill token is no cheaper for them, unlike for the base step
    whose decode tokens also read the KV cache), so rows with prompts (turnover prefill) and
    rows without constrain the same per-token cost (the profile sets its LoRA
    ``prefill_token_weight`` to 1). With M = the prefill-weighted tokens of the base step, the
    R5 rows with prompts were under-predicted by 10-16 %.
    ``intercept_ms`` is l_0 when measured elsewhere (single-request runs); ``None`` fits it
    here. A measured l_0 is R6's whole one-adapter step: the tokens and adapters are counted
    from that point (``anchor_tokens``: what R6's one token at max_loras 1 weighs against a
    token at R5's slot count) and the returned intercept is l_0 minus their cost there.
    ``slots`` is the per-slot step cost (``fit_slot_cost``), taken out of the rows before the
    fit (R5 ran 300 slots). Rows whose ITL the fit misses by more than
    ``_TRIM_PCT`` are dropped once and the fit is repeated (reported in the note), so a
    single odd probe cannot drag the coefficients.
    Returns (l_0, l_tok, l_ad, quality).
    """
    tokens_eff, ctx, compute, ok = _steady_rows(table, sched, w_p)
    tokens = _steady_rows(table, sched, 1.0)[0]  # every scheduled token
    running = _arr(table.column("mean_running_batch"))
    unique = _arr(table.column("mean_unique_adapters_per_step"))
    n_distinct = _arr(table.column("n_distinct_adapters"))
    adapters = _lora_run_adapters(table)
    # Base-model requests on a LoRA server (no adapter) are another regime (no LoRA kernels
    # for the batch's tokens): not part of this fit.
    ok &= np.isfinite(adapters) & (np.nan_to_num(n_distinct, nan=1.0) > 0)
    fit_l0 = intercept_ms is None
    if ok.sum() < (3 if fit_l0 else 2):
        return 0.0, 0.0, 0.0, _quality(_arr([]), _arr([]), "no LoRA rows: no LoRA overhead")
    y = compute - base.predict(tokens_eff, ctx) - (intercept_ms or 0.0)
    if slots is not None:
        y = y - slots.predict(_arr(table.column("max_loras")), _arr(table.column("max_lora_rank")))
    total = compute
    x = (np.c_[np.ones_like(tokens), tokens, adapters] if fit_l0
         else np.c_[tokens - anchor_tokens, adapters - R6_ANCHOR[2]])
    keep = ok.copy()
    for _ in range(2):
        c = _wlstsq_rel_total(x[keep], y[keep], total[keep] - y[keep])
        rel = np.abs(x @ c - y) / np.maximum(total, 1e-9) * 100.0
        new_keep = ok & (rel <= _TRIM_PCT)
        if new_keep.sum() < 2 or (new_keep == keep).all():
            break
        keep = new_keep
    if fit_l0:
        l_0, c = max(float(c[0]), 0.0), c[1:]
    l_tok, l_ad = max(float(c[0]), 0.0), max(float(c[1]), 0.0)
    if not fit_l0:
        l_0 = float(intercept_ms or 0.0) - l_tok * anchor_tokens - l_ad * R6_ANCHOR[2]
    pred = total - y - (0.0 if fit_l0 else float(intercept_ms or 0.0)) + l_0 \
        + l_tok * tokens + l_ad * adapters
    both = np.isfinite(unique) & np.isfinite(n_distinct) & np.isfinite(running)
    note = f"ITL of LoRA runs; {int(ok.sum() - keep.sum())} rows beyond {_TRIM_PCT:.0f}% dropped"
    if both.any():
        est = expected_distinct(n_distinct[both], running[both])
        note += (f"; expected-distinct estimate vs logged unique adapters: "
                 f"{float(np.mean(np.abs(est - unique[both]) / unique[both]) * 100):.1f}% MAPE")
    if fit_l0:
        note += f"; LoRA intercept {l_0:.2f} ms fitted on these rows"
    return l_0, l_tok, l_ad, _quality(pred[keep], total[keep], note)


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
    steps = _arr(table.column("steps"))
    safe_steps = np.where(steps > 0, steps, np.nan)
    duration = _arr(table.column("duration"))
    sched = _arr(table.column("total_scheduling_time"))
    completed = _arr(table.column("completed_requests"))
    return _R3Steps(
        running=_arr(table.column("avg_batch_size")),
        waiting=_arr(table.column("avg_waiting_queue")),
        adapters=_arr(table.column("mean_loras_by_batch")),
        loras=_arr(table.column("gpu_loras")),
        rank=_arr(table.column("rank")),
        per_step=completed / safe_steps,
        out_len=_arr(table.column("processed_tokens")) / np.where(completed > 0, completed,
                                                                   np.nan),
        compute_ms=(duration - sched) / safe_steps * 1000.0,
    )


def _r3_modelled_step(
    r: _R3Steps, base: _Base, w_p: float, l_0: float, slots: _Slots, mean_prompt: float
) -> tuple[FloatArray, FloatArray]:
    """(scheduled tokens T, the modelled step without the LoRA kernels' per-token and
    per-adapter cost: base step + one-adapter intercept ``l_0`` + the slots' cost) per R3 run."""
    prefill = mean_prompt * r.per_step
    ctx = r.running * (mean_prompt + r.out_len / 2.0)
    plain = base.predict(r.running + w_p * prefill, ctx) + l_0 + slots.predict(r.loras, r.rank)
    return r.running + prefill, plain


def _r3_lora_rows(
    table: Table, base: _Base, w_p: float, l_0: float, slots: _Slots, mean_prompt: float
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
    ok = np.isfinite(compute) & np.isfinite(running) & np.isfinite(r.adapters) \
        & np.isfinite(r.loras) & np.isfinite(r.per_step) & np.isfinite(r.out_len) \
        & (running > 2.0)
    tokens, plain = _r3_modelled_step(r, base, w_p, l_0, slots, mean_prompt)
    y = compute - plain
    # l_0 is R6's whole one-adapter step (one token, one slot, one adapter): the kernels' cost
    # is counted from there, or R6's own token, slot and adapter would be paid twice.
    x = np.c_[tokens, tokens * r.loras, r.adapters] - np.asarray(R6_ANCHOR)
    return x[ok], y[ok], compute[ok], r.loras[ok]


# R6's single-request runs (``fit_lora_intercept``) measure the LoRA step at one scheduled token
# (T), max_loras 1 (T * max_loras) and one adapter (A): the LoRA fits count their per-token,
# per-token-per-slot and per-adapter costs from this point, and the profile's intercept is
# l_0 minus their value there.
R6_ANCHOR = (1.0, 1.0, 1.0)


# A group of R3 runs (``source``: its file) whose small-batch steps (3-8 running requests, no
# queue) take this many times the model's own one-adapter LoRA step or more ran on a slower
# server than the other calibration runs and is left out of the LoRA fit.
R3_SLOW_GROUP_RATIO = 1.4


def r3_consistent_rows(
    table: Table, base: _Base, w_p: float, l_0: float, slots: _Slots,
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
    small = np.isfinite(r.compute_ms) & np.isfinite(plain) & (r.running >= 3.0) \
        & (r.running <= 8.0) & (np.nan_to_num(r.waiting, nan=1e9) < 1.0)
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
    r3: Table, base: _Base, w_p: float, l_0: float, slots: _Slots,
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
    by more than ``_TRIM_PCT`` are dropped once. Returns (l_tok, l_slot, l_ad, quality).
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
        new_keep = rel <= _TRIM_PCT
        if new_keep.sum() < 3 or (new_keep == keep).all():
            break
        keep = new_keep
    pred = x @ c - y + total
    note = (f"R3 step intervals minus scheduling ({int(keep.sum())} runs, max_loras "
            f"{int(np.min(loras))}-{int(np.max(loras))}, mean prompt "
            f"{mean_prompt:.0f} tokens); {int((~keep).sum())} runs beyond {_TRIM_PCT:.0f}% "
            f"dropped")
    return float(c[0]), float(c[1]), float(c[2]), _quality(pred[keep], total[keep], note)


def _wlstsq_rel_total(x: FloatArray, y: FloatArray, offset: FloatArray) -> FloatArray:
    """Fit y ~ x @ c minimising errors relative to the total (offset + y)."""
    w = 1.0 / np.maximum(np.abs(offset + y), 1e-9)
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    return np.asarray(coef, dtype=np.float64)


def fit_lora_intercept(
    table: Table, base: _Base, sched: _Sched, slots: _Slots | None = None
) -> tuple[float | None, str]:
    """LoRA cost of a one-request batch from the R6 runs (max_loras 1: requests run alone).

    A swap happens between requests, so it is in the TTFT, not in the ITL: the ITL of these
    runs is the step time of a single decode with one adapter. Its median, where recorded
    (``itl_median_ms``), not its mean: R6 sends all 50 requests at once, and in all 12 runs
    the client's mean ITL lies 0.7-0.9 ms above the median and above the 99th percentile (a
    few very long gaps), while the median agrees with the engine's own median step interval
    (server log) to 0.02 ms; a single request's client ITL (R7) equals the engine's step.
    """
    loras = _arr(table.column("max_loras"))
    mean = _arr(table.column("itl_mean_ms"))
    median = _arr(table.column("itl_median_ms"))
    itl = np.where(np.isfinite(median), median, mean)
    ok = (loras == 1) & np.isfinite(itl)
    if not ok.any():
        return None, "no single-request LoRA runs"
    one = np.ones(1)
    plain = float(base.predict(one, np.zeros(1))[0] + sched.predict(one, np.zeros(1))[0])
    if slots is not None:
        itl = itl - slots.predict(loras, _arr(table.column("max_lora_rank")))
    value = max(float(np.median(itl[ok])) - plain, 0.0)
    which = "median" if np.isfinite(median[ok]).all() else \
        "mean" if not np.isfinite(median[ok]).any() else "median (else mean)"
    return value, (f"median over {int(ok.sum())} max_loras=1 runs of their {which} ITL, minus "
                   "the base step")


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
    c = _wlstsq(x, y[ok])
    b_run, b_slot = max(float(c[1]), 0.0), max(float(c[3]), 0.0)
    if b_run + b_slot <= 0:
        return 0.0, "R3 shows no per-token cost: per-token LoRA cost independent of max_loras"
    share = b_slot * reference_max_loras / (b_run + b_slot * reference_max_loras)
    return share, (f"R3 ({int(ok.sum())} runs without queue): b_run={b_run:.4f} ms, "
                   f"b_slot={b_slot:.6f} ms/slot -> share {share:.2f} at "
                   f"max_loras={reference_max_loras:.0f}")


# ---------------------------------------------------------------- adapter loads


def fit_cpu_load(table: Table) -> tuple[float, float, float, ComponentFit]:
    """swap_ms = c0 + c_rank*rank + c_pad*[rank < max_lora_rank] (R6 swap increments)."""
    rank = _arr(table.column("adapter_rank"))
    max_rank = _arr(table.column("max_lora_rank"))
    swap = _arr(table.column("swap_ms_mean"))
    swap = np.where(np.isfinite(swap), swap, _arr(table.column("swap_ms_paper_method")))
    # Where the per-request noise exceeds the effect (std > |mean|: TTFT differences on a
    # contended CPU, ``data/tiny-llama-cpu``), the mean is dragged by outliers: use the median,
    # a negative median read as a free swap.
    std = _arr(table.column("swap_ms_std"))
    median = _arr(table.column("swap_ms_median"))
    noisy = np.isfinite(std) & np.isfinite(median) & (std > np.abs(np.nan_to_num(swap)))
    swap = np.where(noisy, np.maximum(median, 0.0), swap)
    ok = np.isfinite(rank) & np.isfinite(swap) & ((swap > 0) | noisy)
    if not ok.any():
        return 0.0, 0.0, 0.0, _quality(_arr([]), _arr([]), "no loading rows: loads are free")
    max_rank = np.where(np.isfinite(max_rank), max_rank, rank)
    pad = (rank < max_rank).astype(np.float64)
    cols = [np.ones(int(ok.sum())), rank[ok]]
    if 0 < pad[ok].sum() < ok.sum() and ok.sum() > 2:  # a padding term needs a third row
        cols.append(pad[ok])
    x = np.column_stack(cols)
    if ok.sum() < x.shape[1] or np.unique(rank[ok]).size < 2:
        x = x[:, :1] if np.unique(rank[ok]).size < 2 else x
    c = _wlstsq(x, swap[ok], relative=not noisy[ok].any())
    coef = [float(v) for v in c] + [0.0] * (3 - len(c))
    c0, c_rank, c_pad = coef[0], coef[1], coef[2] if x.shape[1] == 3 else 0.0
    pred = c0 + c_rank * rank[ok] + c_pad * pad[ok]
    return c0, c_rank, c_pad, _quality(pred, swap[ok], "CPU->GPU swap ms")


def fit_disk_load(table: Table) -> tuple[float, float, ComponentFit]:
    """disk_ms = d0 + d_rank*rank from the start-up disk loads (first load excluded)."""
    rank = _arr(table.column("adapter_rank"))
    disk = _arr(table.column("disk_load_ms_mean_excl_first"))
    ok = np.isfinite(rank) & np.isfinite(disk) & (disk > 0)
    if not ok.any():
        return 0.0, 0.0, _quality(_arr([]), _arr([]), "no disk-load rows: disk loads are free")
    if np.unique(rank[ok]).size < 2:
        d0 = float(np.mean(disk[ok]))
        return d0, 0.0, _quality(np.full(int(ok.sum()), d0), disk[ok], "one rank only")
    c = _wlstsq(np.c_[np.ones(int(ok.sum())), rank[ok]], disk[ok])
    pred = c[0] + c[1] * rank[ok]
    return float(c[0]), float(c[1]), _quality(pred, disk[ok], "disk->CPU ms")


# ---------------------------------------------------------------- KV memory


def fit_kv(table: Table) -> tuple[float, float, float, float, ComponentFit]:
    """KV tokens = KV0 - L*(c_rank*R + c_slot); no-LoRA capacity as the median of those rows."""
    groups = [t.get("group", "") for t in table.text]
    kv = _arr(table.column("kv_tokens"))
    loras = _arr(table.column("max_loras"))
    rank = _arr(table.column("max_lora_rank"))
    lora_on = _arr(table.column("enable_lora"))
    lora_on = np.where(np.isfinite(lora_on), lora_on, np.isfinite(loras).astype(np.float64))
    sweep = np.array([g == "R7" for g in groups], dtype=bool)
    if not sweep.any():
        sweep = lora_on > 0
    ok = sweep & np.isfinite(kv) & np.isfinite(loras) & np.isfinite(rank)
    no_lora = kv[(lora_on == 0) & np.isfinite(kv)]
    kv_no_lora = float(np.median(no_lora)) if no_lora.size else math.nan
    if ok.sum() < 3:
        if ok.any():  # a few start-ups (e.g. an explicit KV byte budget on CPU): their median
            base = float(np.median(kv[ok]))
            plain = kv_no_lora if math.isfinite(kv_no_lora) else base
            return base, 0.0, 0.0, plain, _quality(
                np.full(int(ok.sum()), base), kv[ok],
                f"{int(ok.sum())} LoRA start-ups: constant capacity, no slot/rank term")
        base = kv_no_lora if math.isfinite(kv_no_lora) else 0.0
        return base, 0.0, 0.0, base, _quality(_arr([]), _arr([]), "too few KV rows")
    x = np.c_[np.ones(int(ok.sum())), -loras[ok] * rank[ok], -loras[ok]]
    c = _wlstsq(x, kv[ok])
    pred = x @ c
    kv0 = float(c[0])
    return (kv0, float(c[1]), float(c[2]), kv_no_lora if math.isfinite(kv_no_lora) else kv0,
            _quality(pred, kv[ok], "KV tokens vs max_loras x max_lora_rank"))


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
    time_s = _arr(table.column("max_lora_loading_time"))
    loads = _arr(table.column("max_lora_loads_from_memory"))
    swaps = _arr(table.column("max_lora_loads_from_memory_corrected"))
    rank = _arr(table.column("rank"))
    ok = np.isfinite(time_s) & np.isfinite(loads) & np.isfinite(swaps) & (swaps > R3_MIN_SWAPS) \
        & (loads >= swaps) & (time_s > 0)
    ranks = rank[ok & np.isfinite(rank)]
    if not ok.any() or not ranks.size:
        return math.nan, math.nan, 0
    return (float(np.median(time_s[ok] / loads[ok] * 1000.0)), float(np.median(ranks)),
            int(ok.sum()))


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
    return ranked[0], (f"{ranked[0]} (R3's adapter loads {r3_ms:.1f} ms median over {runs} runs "
                       f"with > {R3_MIN_SWAPS} swaps, rank {rank:.0f}; R6 swaps: {swaps})")


# R5 runs of two models are the same experiment when these settings agree.
_R5_RUN_KEYS = ("n_distinct_adapters", "input_len", "output_len", "max_loras", "max_lora_rank",
                "adapter_rank")


def _r5_lora_extra(table: Table) -> dict[tuple[float | None, ...], tuple[float, float, float]]:
    """R5 runs by their settings: (scheduled tokens T, adapters per step A, LoRA extra ms).

    The extra is the run's ITL minus the ITL of the no-LoRA run of the same family
    (``base_itl_ms``: same model, ``max_num_seqs`` and lengths); T counts every scheduled token
    (decode plus the turnover prefill, as ``fit_lora``), A as ``fit_lora``.
    """
    tokens, _, _, ok = _steady_rows(table, _Sched(s0=0.0, s_run=0.0, s_wait=0.0), 1.0)
    adapters = _lora_run_adapters(table)
    extra = _arr(table.column("itl_mean_ms")) - _arr(table.column("base_itl_ms"))
    n_distinct = _arr(table.column("n_distinct_adapters"))
    ok &= np.isfinite(adapters) & np.isfinite(extra) & (extra > 0) & (n_distinct > 0)
    rows: dict[tuple[float | None, ...], tuple[float, float, float]] = {}
    for i in np.flatnonzero(ok):
        values = table.values[int(i)]
        key = tuple(round(v, 6) if math.isfinite(v) else None
                    for v in (values.get(k, math.nan) for k in _R5_RUN_KEYS))
        rows[key] = (float(tokens[i]), float(adapters[i]), float(extra[i]))
    return rows


def lora_cost_ratio(own: Table, ref: Table) -> tuple[float | None, ComponentFit]:
    """LoRA compute cost of one model relative to another's, from R5 runs both made alike.

    Matched runs (same ``_R5_RUN_KEYS``) give each model's LoRA extra (``_r5_lora_extra``). The
    two models did not run the same batches (``max_num_seqs`` differs: Llama 220, Qwen 250),
    so the runs are compared at the same tokens and adapters: the reference model's extra is
    fitted as ``p*T + q*A`` through the origin on its matched runs, evaluated at the other
    model's T and A, and the ratio is the least-squares slope through the origin of the
    other model's extra on that prediction. (Dividing each run's extra by its own T instead
    treats the per-adapter part, which grows 4x with the adapters at a constant T, as a token
    cost and charges the larger batches to the model.) Returns (ratio, quality of ratio x
    prediction on the model's runs); the ratio is ``None`` with fewer than 3 matched runs.
    """
    mine, theirs = _r5_lora_extra(own), _r5_lora_extra(ref)
    keys = sorted(set(mine) & set(theirs), key=str)
    if len(keys) < 3:
        return None, _quality(_arr([]), _arr([]), f"{len(keys)} matched R5 runs")
    ref_x = np.array([theirs[k][:2] for k in keys], dtype=np.float64)
    ref_y = _arr([theirs[k][2] for k in keys])
    cols = [0, 1]
    while True:  # non-negative prices: drop a negative column and refit
        sol, *_ = np.linalg.lstsq(ref_x[:, cols], ref_y, rcond=None)
        if (sol >= 0).all() or len(cols) == 1:
            price = np.zeros(2)
            price[cols] = np.maximum(sol, 0.0)
            break
        cols = [k for k, v in zip(cols, sol, strict=True) if v >= 0] or cols[:1]
    x = np.array([mine[k][:2] for k in keys], dtype=np.float64)
    y = _arr([mine[k][2] for k in keys])
    pred = x @ price
    if float(pred @ pred) <= 0:
        return None, _quality(_arr([]), _arr([]), "reference model shows no LoRA cost in R5")
    ratio = float(pred @ y) / float(pred @ pred)
    note = (f"{len(keys)} matched R5 runs; reference {price[0] * 1000:.1f} us/token + "
            f"{price[1]:.3f} ms/adapter ({_quality(ref_x @ price, ref_y).mape_pct:.1f}% MAPE "
            f"on its runs)")
    return ratio, _quality(ratio * pred, y, note)


# ---------------------------------------------------------------- everything


def _has_r3_step_rows(table: Table) -> bool:
    """Scheduler-overhead runs with what the joint LoRA fit needs (R3's full columns)."""
    needed = ("steps", "duration", "total_scheduling_time", "avg_batch_size",
              "mean_loras_by_batch", "gpu_loras", "completed_requests", "processed_tokens")
    return len(table) >= 10 and all(
        np.isfinite(_arr(table.column(name))).sum() >= 10 for name in needed)


LoraSource = Literal["batch", "poisson"]
LORA_SOURCES: tuple[LoraSource, ...] = ("batch", "poisson")


def fit_coefficients(
    data: CalibrationData, *, lora_source: LoraSource = "poisson"
) -> FitReport:
    """Fit every component for ``data.model``; components without data get neutral values.

    ``lora_source`` chooses where the LoRA compute cost comes from:

    * ``poisson`` (default): R3's Poisson runs over 8..448 slots price it
      (``fit_lora_poisson``), after the slots' per-step cost measured by R7's single-request
      sweep (``fit_slot_cost``), which becomes a profile term. Falls back to ``batch`` without
      R3 or R6 data. When the folder's R6 swap times say R3 ran another model
      (``attribute_r3``), that model's R3 prices are scaled to this one
      (``transferred_r3_prices``).
    * ``batch``: R5's all-at-once runs at 300 slots price a token and an adapter; R3 only
      splits the per-token cost into a part that scales with ``max_loras``.

    Both are validated on the BSC one-hour runs (``bench/validate_twin.py``; README,
    "Digital twin").
    """
    if lora_source not in LORA_SOURCES:
        raise ConfigError(f"must be one of {', '.join(LORA_SOURCES)}", key="lora_source")
    sched, q_sched = fit_scheduler(data.scheduler, data.base_latency)
    # The decode fit needs the prefill weight (decode runs also prefill a little) and the
    # prefill weight needs the decode fit: a few fixed-point rounds converge.
    w_p, w_note = 0.6, ""
    for _ in range(_PREFILL_ITERATIONS):
        base, q_base = fit_base(data.base_latency, sched, w_p)
        w_p, w_note = fit_prefill_weight(data, base, sched)
    poisson = lora_source == "poisson" and _has_r3_step_rows(data.scheduler)
    if poisson:
        slots, q_slots = fit_slot_cost(data.slot_sweep)
    else:
        slots = _Slots()
        q_slots = _quality(_arr([]), _arr([]), "not used (LoRA cost from R5: lora_source batch)")
    l_0_measured, l0_note = fit_lora_intercept(data.loading, base, sched, slots)
    if poisson and l_0_measured is None:  # the R3 fit needs R6's one-adapter intercept
        poisson, slots = False, _Slots()
        q_slots = _quality(_arr([]), _arr([]), "not used (no single-request LoRA runs)")
    ref_slots = float(np.nanmedian(_arr(data.lora_overhead.column("max_loras")) + 0.0)) \
        if len(data.lora_overhead) else math.nan
    if poisson and l_0_measured is not None:
        l_0 = l_0_measured
        r3_model, attribution = attribute_r3(data)
        prices: tuple[float, float, float] | None = None
        if r3_model is not None and r3_model != data.model:
            prices, q_lora = transferred_r3_prices(data, r3_model)
            if prices is None:
                attribution += f"; its prices not transferred ({q_lora.note})"
        if prices is not None:
            l_tok_plain, l_tok_slot, l_ad = prices
            q_lora = replace(q_lora, note=f"R3 ran {attribution}; {q_lora.note}")
        else:  # R3 ran this model (or which one is not known): its steps price the kernels
            r3, r3_note = r3_consistent_rows(data.scheduler, base, w_p, l_0, slots)
            l_tok_plain, l_tok_slot, l_ad, q_lora = fit_lora_poisson(r3, base, w_p, l_0, slots)
            if r3_note:
                q_lora = replace(q_lora, note=f"{q_lora.note}; {r3_note}")
            if attribution:
                q_lora = replace(q_lora, note=f"{q_lora.note}; R3 ran {attribution}")
        # l_0 is R6's one-adapter step: without R6's own token, slot and adapter.
        own = float(np.dot((l_tok_plain, l_tok_slot, l_ad), R6_ANCHOR))
        l_0 -= own
        on = "the prices transferred from R3" if prices is not None else "R3's prices"
        l0_note += f", minus its own token, slot and adapter on {on} ({own:.2f} ms)"
        share_note = "fitted with the per-token cost on R3 (see lora)"
    else:
        share, share_note = fit_slot_share(data.scheduler, ref_slots)
        # R6's one token ran at max_loras 1, R5's tokens at ref_slots: its weight in R5 tokens
        one_slot = 1.0 - share + share / ref_slots if share > 0 else 1.0
        l_0, l_tok, l_ad, q_lora = fit_lora(data.lora_overhead, base, sched, w_p, l_0_measured,
                                            slots, anchor_tokens=one_slot)
        if l_0_measured is not None:
            l0_note += (f", minus its own token and adapter on R5's prices "
                        f"({l_0_measured - l_0:.2f} ms)")
        l_tok_plain = l_tok * (1.0 - share)
        l_tok_slot = l_tok * share / ref_slots if share > 0 else 0.0
    if l_0_measured is None:
        l0_note = f"no single-request LoRA runs: fitted with the LoRA rows ({l_0:.2f} ms)"
    c0, c_rank, c_pad, q_cpu = fit_cpu_load(data.loading)
    d0, d_rank, q_disk = fit_disk_load(data.loading)
    kv0, kv_rank, kv_slot, kv_plain, q_kv = fit_kv(data.kv_capacity)
    coefficients = FittedCoefficients(
        base_ms=base.m0,
        knee_tokens=base.knee,
        per_token_ms=base.a,
        prefill_token_weight=w_p,
        context_ms_per_token=base.a_ctx,
        lora_intercept_ms=l_0,
        lora_per_token_ms=l_tok_plain,
        lora_per_token_slot_ms=l_tok_slot,
        lora_per_adapter_ms=l_ad,
        lora_rank_ms_per_rank_token=0.0,
        lora_reference_max_loras=ref_slots,
        lora_ms_per_slot=slots.u0,
        lora_ms_per_slot_per_rank=slots.u_r,
        sched_base_ms=sched.s0,
        sched_per_running_ms=sched.s_run,
        sched_per_waiting_ms=sched.s_wait,
        sched_per_waiting_slots_full_ms=sched.s_wait_full,
        max_waiting_requests=sched.max_waiting,
        cpu_load_base_ms=c0,
        cpu_load_per_rank_ms=c_rank,
        cpu_load_pad_ms=c_pad,
        disk_load_base_ms=d0,
        disk_load_per_rank_ms=d_rank,
        kv_base_tokens=kv0,
        kv_per_slot_rank_tokens=kv_rank,
        kv_per_slot_tokens=kv_slot,
        kv_no_lora_tokens=kv_plain,
    )
    components = {
        "scheduler": q_sched,
        "base_decode": q_base,
        "prefill": ComponentFit(rows=0, mape_pct=math.nan, max_abs_pct=math.nan, note=w_note),
        "lora": q_lora,
        "lora_intercept": ComponentFit(rows=0, mape_pct=math.nan, max_abs_pct=math.nan,
                                       note=l0_note),
        "lora_slots": ComponentFit(rows=0, mape_pct=math.nan, max_abs_pct=math.nan,
                                   note=share_note),
        "lora_slot_step": q_slots,
        "cpu_load": q_cpu,
        "disk_load": q_disk,
        "kv": q_kv,
    }
    return FitReport(model=data.model, coefficients=coefficients, components=components,
                     lora_from_r3=poisson)


def transferred_r3_prices(
    data: CalibrationData, r3_model: str
) -> tuple[tuple[float, float, float] | None, ComponentFit]:
    """LoRA prices (per token, per token per slot, per adapter) of ``data.model`` from R3 run
    on another model: that model's R3 fit (``fit_coefficients`` of its own data, exactly its
    profile's), scaled by the two models' LoRA cost ratio on matched R5 runs
    (``lora_cost_ratio``). R3's step times are that model's: subtracting this model's base step
    from them would price its kernels with the other model's steps. Returns (None, reason) when
    the ratio or the other model's R3 fit is missing.
    """
    peer = data.peers[r3_model]
    ratio, q_ratio = lora_cost_ratio(data.lora_overhead, peer.lora_overhead)
    if ratio is None:
        return None, q_ratio
    try:
        report = fit_coefficients(peer, lora_source="poisson")
    except ConfigError as exc:
        return None, replace(q_ratio, note=f"{r3_model} does not fit: {exc.message}")
    if not report.lora_from_r3:
        return None, replace(q_ratio, note=f"{r3_model}'s LoRA cost is not fitted on R3")
    c, fit = report.coefficients, report.components["lora"]
    note = (f"its R3 prices ({c.lora_per_token_ms * 1000:.2f} us/token + "
            f"{c.lora_per_token_slot_ms * 1e6:.1f} ns/token/slot + "
            f"{c.lora_per_adapter_ms:.3f} ms/adapter; {fit.rows} R3 runs, {fit.mape_pct:.2f}% "
            f"MAPE) x {ratio:.3f}, this model's R5 LoRA cost over {r3_model}'s at the same "
            f"tokens and adapters ({q_ratio.note}; MAPE here: ratio x reference on this "
            f"model's runs)")
    prices = (ratio * c.lora_per_token_ms, ratio * c.lora_per_token_slot_ms,
              ratio * c.lora_per_adapter_ms)
    return prices, replace(q_ratio, note=note)


# ---------------------------------------------------------------- profile


# Mean context (prompt + generated so far) of a running request in ShareGPT-like chat traffic;
# used when the caller does not specialize the profile to its workload (validate does).
DEFAULT_CONTEXT_TOKENS_PER_SEQ = 330.0


def _kv_table(table: Table) -> tuple[tuple[int, int, int | None], ...]:
    rows: dict[tuple[int, int], int | None] = {}
    for values, text in zip(table.values, table.text, strict=True):
        if text.get("group", "R7") != "R7":
            continue
        loras, rank = values.get("max_loras", math.nan), values.get("max_lora_rank", math.nan)
        if not (math.isfinite(loras) and math.isfinite(rank)):
            continue
        kv = values.get("kv_tokens", math.nan)
        rows[(int(loras), int(rank))] = int(kv) if math.isfinite(kv) else None
    return tuple((a, b, v) for (a, b), v in sorted(rows.items()))


def build_profile(
    report: FitReport, data: CalibrationData, *, name: str, description: str = "",
    source: str = "",
) -> PerformanceProfile:
    """Map fitted coefficients onto the profile schema (optional calibrated terms)."""
    c = report.coefficients
    ref_slots = int(c.lora_reference_max_loras) if math.isfinite(c.lora_reference_max_loras) else 0
    return PerformanceProfile(
        name=name,
        description=description or f"Fitted by loragate twin calibrate for {report.model}",
        source=source,
        step=StepModel(
            decode_intercept_ms=round(c.base_ms, 6),
            decode_ms_per_seq=round(c.per_token_ms, 8),
            prefill_ms_per_token=round(c.per_token_ms * c.prefill_token_weight, 8),
            knee_seqs=float(c.knee_tokens),
            ms_per_context_token=round(c.context_ms_per_token, 10),
            context_tokens_per_seq=DEFAULT_CONTEXT_TOKENS_PER_SEQ,
        ),
        lora=LoraModel(
            pct_per_adapter=0.0,
            intercept_pct=100.0,
            extra_intercept_ms=round(c.lora_intercept_ms, 6),
            extra_ms_per_token=round(c.lora_per_token_ms, 8),
            extra_ms_per_token_per_slot=round(c.lora_per_token_slot_ms, 10),
            extra_ms_per_adapter=round(c.lora_per_adapter_ms, 6),
            max_loras=ref_slots,
            prefill_token_weight=1.0,
            ms_per_slot=round(c.lora_ms_per_slot, 8),
            ms_per_slot_per_rank=round(c.lora_ms_per_slot_per_rank, 10),
        ),
        scheduler=SchedulerModel(
            intercept_ms=round(c.sched_base_ms, 6),
            ms_per_running=round(c.sched_per_running_ms, 8),
            ms_per_waiting=round(c.sched_per_waiting_ms, 10),
            ms_per_waiting_slots_full=None if c.sched_per_waiting_slots_full_ms is None
            else round(c.sched_per_waiting_slots_full_ms, 10),
            max_waiting=c.max_waiting_requests,
        ),
        loading=LoadModel(
            cpu_to_gpu=RankCost(intercept_ms=round(c.cpu_load_base_ms, 6),
                                ms_per_rank=round(c.cpu_load_per_rank_ms, 8)),
            disk_to_cpu=RankCost(intercept_ms=round(c.disk_load_base_ms, 6),
                                 ms_per_rank=round(c.disk_load_per_rank_ms, 8)),
            cpu_to_gpu_pad_ms=round(c.cpu_load_pad_ms, 6),
        ),
        kv=KvModel(
            kv0_tokens=round(c.kv_base_tokens),
            tokens_per_slot_rank=round(c.kv_per_slot_rank_tokens, 6),
            tokens_per_slot=round(c.kv_per_slot_tokens, 6),
            no_lora_tokens=int(c.kv_no_lora_tokens) if math.isfinite(c.kv_no_lora_tokens)
            else None,
            table=_kv_table(data.kv_capacity),
        ),
        fit={
            "model": report.model,
            "components": {
                k: {"rows": v.rows,
                    "mape_pct": None if math.isnan(v.mape_pct) else round(v.mape_pct, 3),
                    "note": v.note}
                for k, v in report.components.items()
            },
        },
    )


def calibrate_profile(
    folder: str, model: str, *, name: str, description: str = "", source: str = "",
    lora_source: LoraSource = "poisson",
) -> tuple[PerformanceProfile, FitReport]:
    """Read ``folder``, fit ``model`` and return the profile and the fit report."""
    data = load_calibration_data(folder, model)
    report = fit_coefficients(data, lora_source=lora_source)
    profile = build_profile(report, data, name=name, description=description, source=source)
    return profile, report
