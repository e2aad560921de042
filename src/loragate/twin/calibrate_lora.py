"""LoRA compute cost from R5 and R6, and the LoRA cost ratio of two models on R5.

- LoRA: the punica/triton kernels do work proportional to the tokens and one extra tile per
  active adapter. R6's one-request step (one token, one adapter, one slot; its median ITL, see
  ``fit_lora_intercept``) minus the base step already holds one token's, slot's and adapter's
  cost: the fits count those terms from there (``R6_ANCHOR``), not on top.
  ``lora_source="batch"`` fits them on R5 (``fit_lora``: all prompts at once, max_loras 300: an
  overhead linear in the per-step unique adapters, no LoRA intercept at tiny batches); the
  default fits them on R3 (``calibrate_r3``). The compute data holds rank 8 only, so no rank
  term is fitted (the R6 ITLs show no rank effect at small batches either).
- A model that did not run R3 gets R3's prices scaled by the two models' LoRA cost ratio on
  matched R5 runs (``lora_cost_ratio``; applied by ``calibrate.transferred_r3_prices``).
"""

from __future__ import annotations

import math

import numpy as np

from loragate.twin.calibrate_fit import (
    TRIM_PCT,
    ComponentFit,
    FloatArray,
    arr,
    expected_distinct,
    quality,
    wlstsq_rel_total,
)
from loragate.twin.calibrate_step import BaseStepFit, SchedulerFit, SlotCost, steady_rows
from loragate.twin.calibration_data import Table

# R6's single-request runs (``fit_lora_intercept``) measure the LoRA step at one scheduled token
# (T), max_loras 1 (T * max_loras) and one adapter (A): the LoRA fits count their per-token,
# per-token-per-slot and per-adapter costs from this point, and the profile's intercept is
# l_0 minus their value there.
R6_ANCHOR = (1.0, 1.0, 1.0)


def _lora_run_adapters(table: Table) -> FloatArray:
    """Distinct adapters per step of the R5 runs (all prompts at once).

    Where the server log is missing, the per-step unique adapters are not known: the
    expectation for a batch drawn uniformly over the requested adapters is used (checked
    against the rows where both exist, see ``fit_lora``'s note). Closed-loop runs whose client
    w always uses adapter w mod n (``concurrency`` recorded) hold exactly min(n, batch)
    adapters.
    """
    running = arr(table.column("mean_running_batch"))
    unique = arr(table.column("mean_unique_adapters_per_step"))
    n_distinct = arr(table.column("n_distinct_adapters"))
    clients = arr(table.column("concurrency"))
    guess = np.where(
        np.isfinite(clients),
        np.minimum(n_distinct, np.maximum(np.nan_to_num(running), 1.0)),
        expected_distinct(n_distinct, running),
    )
    return np.asarray(np.where(np.isfinite(unique), unique, guess), dtype=np.float64)


def fit_lora(
    table: Table,
    base: BaseStepFit,
    sched: SchedulerFit,
    w_p: float,
    intercept_ms: float | None = 0.0,
    slots: SlotCost | None = None,
    anchor_tokens: float = 1.0,
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
    ``TRIM_PCT`` are dropped once and the fit is repeated (reported in the note), so a
    single odd probe cannot drag the coefficients.
    Returns (l_0, l_tok, l_ad, quality).
    """
    tokens_eff, ctx, compute, ok = steady_rows(table, sched, w_p)
    tokens = steady_rows(table, sched, 1.0)[0]  # every scheduled token
    running = arr(table.column("mean_running_batch"))
    unique = arr(table.column("mean_unique_adapters_per_step"))
    n_distinct = arr(table.column("n_distinct_adapters"))
    adapters = _lora_run_adapters(table)
    # Base-model requests on a LoRA server (no adapter) are another regime (no LoRA kernels
    # for the batch's tokens): not part of this fit.
    ok &= np.isfinite(adapters) & (np.nan_to_num(n_distinct, nan=1.0) > 0)
    fit_l0 = intercept_ms is None
    if ok.sum() < (3 if fit_l0 else 2):
        return 0.0, 0.0, 0.0, quality(arr([]), arr([]), "no LoRA rows: no LoRA overhead")
    y = compute - base.predict(tokens_eff, ctx) - (intercept_ms or 0.0)
    if slots is not None:
        y = y - slots.predict(arr(table.column("max_loras")), arr(table.column("max_lora_rank")))
    total = compute
    x = (
        np.c_[np.ones_like(tokens), tokens, adapters]
        if fit_l0
        else np.c_[tokens - anchor_tokens, adapters - R6_ANCHOR[2]]
    )
    keep = ok.copy()
    for _ in range(2):
        c = wlstsq_rel_total(x[keep], y[keep], total[keep] - y[keep])
        rel = np.abs(x @ c - y) / np.maximum(total, 1e-9) * 100.0
        new_keep = ok & (rel <= TRIM_PCT)
        if new_keep.sum() < 2 or (new_keep == keep).all():
            break
        keep = new_keep
    if fit_l0:
        l_0, c = max(float(c[0]), 0.0), c[1:]
    l_tok, l_ad = max(float(c[0]), 0.0), max(float(c[1]), 0.0)
    if not fit_l0:
        l_0 = float(intercept_ms or 0.0) - l_tok * anchor_tokens - l_ad * R6_ANCHOR[2]
    pred = (
        total
        - y
        - (0.0 if fit_l0 else float(intercept_ms or 0.0))
        + l_0
        + l_tok * tokens
        + l_ad * adapters
    )
    both = np.isfinite(unique) & np.isfinite(n_distinct) & np.isfinite(running)
    note = f"ITL of LoRA runs; {int(ok.sum() - keep.sum())} rows beyond {TRIM_PCT:.0f}% dropped"
    if both.any():
        est = expected_distinct(n_distinct[both], running[both])
        note += (
            f"; expected-distinct estimate vs logged unique adapters: "
            f"{float(np.mean(np.abs(est - unique[both]) / unique[both]) * 100):.1f}% MAPE"
        )
    if fit_l0:
        note += f"; LoRA intercept {l_0:.2f} ms fitted on these rows"
    return l_0, l_tok, l_ad, quality(pred[keep], total[keep], note)


def fit_lora_intercept(
    table: Table, base: BaseStepFit, sched: SchedulerFit, slots: SlotCost | None = None
) -> tuple[float | None, str]:
    """LoRA cost of a one-request batch from the R6 runs (max_loras 1: requests run alone).

    A swap happens between requests, so it is in the TTFT, not in the ITL: the ITL of these
    runs is the step time of a single decode with one adapter. Its median, where recorded
    (``itl_median_ms``), not its mean: R6 sends all 50 requests at once, and in all 12 runs
    the client's mean ITL lies 0.7-0.9 ms above the median and above the 99th percentile (a
    few very long gaps), while the median agrees with the engine's own median step interval
    (server log) to 0.02 ms; a single request's client ITL (R7) equals the engine's step.
    """
    loras = arr(table.column("max_loras"))
    mean = arr(table.column("itl_mean_ms"))
    median = arr(table.column("itl_median_ms"))
    itl = np.where(np.isfinite(median), median, mean)
    ok = (loras == 1) & np.isfinite(itl)
    if not ok.any():
        return None, "no single-request LoRA runs"
    one = np.ones(1)
    plain = float(base.predict(one, np.zeros(1))[0] + sched.predict(one, np.zeros(1))[0])
    if slots is not None:
        itl = itl - slots.predict(loras, arr(table.column("max_lora_rank")))
    value = max(float(np.median(itl[ok])) - plain, 0.0)
    which = (
        "median"
        if np.isfinite(median[ok]).all()
        else "mean"
        if not np.isfinite(median[ok]).any()
        else "median (else mean)"
    )
    return value, (
        f"median over {int(ok.sum())} max_loras=1 runs of their {which} ITL, minus the base step"
    )


# R5 runs of two models are the same experiment when these settings agree.
_R5_RUN_KEYS = (
    "n_distinct_adapters",
    "input_len",
    "output_len",
    "max_loras",
    "max_lora_rank",
    "adapter_rank",
)


def _r5_lora_extra(table: Table) -> dict[tuple[float | None, ...], tuple[float, float, float]]:
    """R5 runs by their settings: (scheduled tokens T, adapters per step A, LoRA extra ms).

    The extra is the run's ITL minus the ITL of the no-LoRA run of the same family
    (``base_itl_ms``: same model, ``max_num_seqs`` and lengths); T counts every scheduled token
    (decode plus the turnover prefill, as ``fit_lora``), A as ``fit_lora``.
    """
    tokens, _, _, ok = steady_rows(table, SchedulerFit(s0=0.0, s_run=0.0, s_wait=0.0), 1.0)
    adapters = _lora_run_adapters(table)
    extra = arr(table.column("itl_mean_ms")) - arr(table.column("base_itl_ms"))
    n_distinct = arr(table.column("n_distinct_adapters"))
    ok &= np.isfinite(adapters) & np.isfinite(extra) & (extra > 0) & (n_distinct > 0)
    rows: dict[tuple[float | None, ...], tuple[float, float, float]] = {}
    for i in np.flatnonzero(ok):
        values = table.values[int(i)]
        key = tuple(
            round(v, 6) if math.isfinite(v) else None
            for v in (values.get(k, math.nan) for k in _R5_RUN_KEYS)
        )
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
        return None, quality(arr([]), arr([]), f"{len(keys)} matched R5 runs")
    ref_x = np.array([theirs[k][:2] for k in keys], dtype=np.float64)
    ref_y = arr([theirs[k][2] for k in keys])
    cols = [0, 1]
    while True:  # non-negative prices: drop a negative column and refit
        sol, *_ = np.linalg.lstsq(ref_x[:, cols], ref_y, rcond=None)
        if (sol >= 0).all() or len(cols) == 1:
            price = np.zeros(2)
            price[cols] = np.maximum(sol, 0.0)
            break
        cols = [k for k, v in zip(cols, sol, strict=True) if v >= 0] or cols[:1]
    x = np.array([mine[k][:2] for k in keys], dtype=np.float64)
    y = arr([mine[k][2] for k in keys])
    pred = x @ price
    if float(pred @ pred) <= 0:
        return None, quality(arr([]), arr([]), "reference model shows no LoRA cost in R5")
    ratio = float(pred @ y) / float(pred @ pred)
    note = (
        f"{len(keys)} matched R5 runs; reference {price[0] * 1000:.1f} us/token + "
        f"{price[1]:.3f} ms/adapter ({quality(ref_x @ price, ref_y).mape_pct:.1f}% MAPE "
        f"on its runs)"
    )
    return ratio, quality(ratio * pred, y, note)
