"""Fit a performance profile's coefficients from benchmark measurements (numpy least squares).

The step-time model (milliseconds; B running requests, D decode tokens, P prefill tokens,
C = sum of the context lengths (KV tokens) of the running requests, A distinct adapters in the
batch, W waiting requests):

    T_eff    = D + w_p * P                      prefill tokens are cheaper than decode tokens
    base     = m0 + a * max(0, T_eff - K) + a_ctx * C
    lora     = l_tok * T_eff + l_ad * A         only with --enable-lora
    sched    = s0 + s_run * B + s_wait * W      CPU-side scheduler, synchronous with the step
    step     = base + lora + sched (+ adapter load times, added by the engine)

Each part is fitted in its own module, whose docstring says why it has this shape (all from
the calibration data, see ``FitReport``):

- ``calibrate_step``: scheduler, base step (hinge knee, context), prefill weight, and the
  per-step cost of the LoRA slots;
- ``calibrate_lora``: LoRA cost from R5 (``lora_source="batch"``) and R6's one-adapter step,
  and the LoRA cost ratio of two models;
- ``calibrate_r3``: LoRA cost from R3's Poisson runs (the default) and which model ran R3;
- ``calibrate_loads``: adapter load times (CPU->GPU, disk->CPU) and KV capacity;
- ``calibrate_fit``: the least-squares and fit-quality helpers they share.

This module assembles them (``fit_coefficients``, with ``transferred_r3_prices`` for a model
that did not run R3), maps the coefficients onto a profile (``build_profile``) and reads a
calibration folder (``calibrate_profile``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np

from loragate.core.errors import ConfigError
from loragate.twin.calibrate_fit import ComponentFit, arr, quality
from loragate.twin.calibrate_loads import fit_cpu_load, fit_disk_load, fit_kv, kv_table
from loragate.twin.calibrate_lora import (
    R6_ANCHOR,
    fit_lora,
    fit_lora_intercept,
    lora_cost_ratio,
)
from loragate.twin.calibrate_r3 import (
    attribute_r3,
    fit_lora_poisson,
    fit_slot_share,
    r3_consistent_rows,
)
from loragate.twin.calibrate_step import (
    SlotCost,
    fit_base,
    fit_prefill_weight,
    fit_scheduler,
    fit_slot_cost,
)
from loragate.twin.calibration_data import CalibrationData, Table, load_calibration_data
from loragate.twin.profile import (
    KvModel,
    LoadModel,
    LoraModel,
    PerformanceProfile,
    RankCost,
    SchedulerModel,
    StepModel,
)

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


# ---------------------------------------------------------------- everything


def _has_r3_step_rows(table: Table) -> bool:
    """Scheduler-overhead runs with what the joint LoRA fit needs (R3's full columns)."""
    needed = (
        "steps",
        "duration",
        "total_scheduling_time",
        "avg_batch_size",
        "mean_loras_by_batch",
        "gpu_loras",
        "completed_requests",
        "processed_tokens",
    )
    return len(table) >= 10 and all(
        np.isfinite(arr(table.column(name))).sum() >= 10 for name in needed
    )


LoraSource = Literal["batch", "poisson"]
LORA_SOURCES: tuple[LoraSource, ...] = ("batch", "poisson")


def fit_coefficients(data: CalibrationData, *, lora_source: LoraSource = "poisson") -> FitReport:
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
        slots = SlotCost()
        q_slots = quality(arr([]), arr([]), "not used (LoRA cost from R5: lora_source batch)")
    l_0_measured, l0_note = fit_lora_intercept(data.loading, base, sched, slots)
    if poisson and l_0_measured is None:  # the R3 fit needs R6's one-adapter intercept
        poisson, slots = False, SlotCost()
        q_slots = quality(arr([]), arr([]), "not used (no single-request LoRA runs)")
    ref_slots = (
        float(np.nanmedian(arr(data.lora_overhead.column("max_loras")) + 0.0))
        if len(data.lora_overhead)
        else math.nan
    )
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
        l_0, l_tok, l_ad, q_lora = fit_lora(
            data.lora_overhead, base, sched, w_p, l_0_measured, slots, anchor_tokens=one_slot
        )
        if l_0_measured is not None:
            l0_note += (
                f", minus its own token and adapter on R5's prices ({l_0_measured - l_0:.2f} ms)"
            )
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
        "lora_intercept": ComponentFit(
            rows=0, mape_pct=math.nan, max_abs_pct=math.nan, note=l0_note
        ),
        "lora_slots": ComponentFit(
            rows=0, mape_pct=math.nan, max_abs_pct=math.nan, note=share_note
        ),
        "lora_slot_step": q_slots,
        "cpu_load": q_cpu,
        "disk_load": q_disk,
        "kv": q_kv,
    }
    return FitReport(
        model=data.model, coefficients=coefficients, components=components, lora_from_r3=poisson
    )


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
    note = (
        f"its R3 prices ({c.lora_per_token_ms * 1000:.2f} us/token + "
        f"{c.lora_per_token_slot_ms * 1e6:.1f} ns/token/slot + "
        f"{c.lora_per_adapter_ms:.3f} ms/adapter; {fit.rows} R3 runs, {fit.mape_pct:.2f}% "
        f"MAPE) x {ratio:.3f}, this model's R5 LoRA cost over {r3_model}'s at the same "
        f"tokens and adapters ({q_ratio.note}; MAPE here: ratio x reference on this "
        f"model's runs)"
    )
    prices = (
        ratio * c.lora_per_token_ms,
        ratio * c.lora_per_token_slot_ms,
        ratio * c.lora_per_adapter_ms,
    )
    return prices, replace(q_ratio, note=note)


# ---------------------------------------------------------------- profile


# Mean context (prompt + generated so far) of a running request in ShareGPT-like chat traffic;
# used when the caller does not specialize the profile to its workload (validate does).
DEFAULT_CONTEXT_TOKENS_PER_SEQ = 330.0


def build_profile(
    report: FitReport,
    data: CalibrationData,
    *,
    name: str,
    description: str = "",
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
            ms_per_waiting_slots_full=None
            if c.sched_per_waiting_slots_full_ms is None
            else round(c.sched_per_waiting_slots_full_ms, 10),
            max_waiting=c.max_waiting_requests,
        ),
        loading=LoadModel(
            cpu_to_gpu=RankCost(
                intercept_ms=round(c.cpu_load_base_ms, 6),
                ms_per_rank=round(c.cpu_load_per_rank_ms, 8),
            ),
            disk_to_cpu=RankCost(
                intercept_ms=round(c.disk_load_base_ms, 6),
                ms_per_rank=round(c.disk_load_per_rank_ms, 8),
            ),
            cpu_to_gpu_pad_ms=round(c.cpu_load_pad_ms, 6),
        ),
        kv=KvModel(
            kv0_tokens=round(c.kv_base_tokens),
            tokens_per_slot_rank=round(c.kv_per_slot_rank_tokens, 6),
            tokens_per_slot=round(c.kv_per_slot_tokens, 6),
            no_lora_tokens=int(c.kv_no_lora_tokens) if math.isfinite(c.kv_no_lora_tokens) else None,
            table=kv_table(data.kv_capacity),
        ),
        fit={
            "model": report.model,
            "components": {
                k: {
                    "rows": v.rows,
                    "mape_pct": None if math.isnan(v.mape_pct) else round(v.mape_pct, 3),
                    "note": v.note,
                }
                for k, v in report.components.items()
            },
        },
    )


def calibrate_profile(
    folder: str,
    model: str,
    *,
    name: str,
    description: str = "",
    source: str = "",
    lora_source: LoraSource = "poisson",
) -> tuple[PerformanceProfile, FitReport]:
    """Read ``folder``, fit ``model`` and return the profile and the fit report."""
    data = load_calibration_data(folder, model)
    report = fit_coefficients(data, lora_source=lora_source)
    profile = build_profile(report, data, name=name, description=description, source=source)
    return profile, report
