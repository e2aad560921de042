"""Adapter load times and KV capacity.

- loads: CPU->GPU swap time per (adapter rank, max_lora_rank) from R6 (padding an adapter to a
  larger max rank costs extra), disk->CPU linear in rank.
- KV: ``KV0 - max_loras * (c_rank * max_lora_rank + c_slot)`` from the R7 start-up sweep.
"""

from __future__ import annotations

import math

import numpy as np

from loragate.twin.calibrate_fit import ComponentFit, arr, quality, wlstsq
from loragate.twin.calibration_data import Table

# ---------------------------------------------------------------- adapter loads


def fit_cpu_load(table: Table) -> tuple[float, float, float, ComponentFit]:
    """swap_ms = c0 + c_rank*rank + c_pad*[rank < max_lora_rank] (R6 swap increments)."""
    rank = arr(table.column("adapter_rank"))
    max_rank = arr(table.column("max_lora_rank"))
    swap = arr(table.column("swap_ms_mean"))
    swap = np.where(np.isfinite(swap), swap, arr(table.column("swap_ms_paper_method")))
    # Where the per-request noise exceeds the effect (std > |mean|: TTFT differences on a
    # contended CPU, ``data/tiny-llama-cpu``), the mean is dragged by outliers: use the median,
    # a negative median read as a free swap.
    std = arr(table.column("swap_ms_std"))
    median = arr(table.column("swap_ms_median"))
    noisy = np.isfinite(std) & np.isfinite(median) & (std > np.abs(np.nan_to_num(swap)))
    swap = np.where(noisy, np.maximum(median, 0.0), swap)
    ok = np.isfinite(rank) & np.isfinite(swap) & ((swap > 0) | noisy)
    if not ok.any():
        return 0.0, 0.0, 0.0, quality(arr([]), arr([]), "no loading rows: loads are free")
    max_rank = np.where(np.isfinite(max_rank), max_rank, rank)
    pad = (rank < max_rank).astype(np.float64)
    cols = [np.ones(int(ok.sum())), rank[ok]]
    if 0 < pad[ok].sum() < ok.sum() and ok.sum() > 2:  # a padding term needs a third row
        cols.append(pad[ok])
    x = np.column_stack(cols)
    if ok.sum() < x.shape[1] or np.unique(rank[ok]).size < 2:
        x = x[:, :1] if np.unique(rank[ok]).size < 2 else x
    c = wlstsq(x, swap[ok], relative=not noisy[ok].any())
    coef = [float(v) for v in c] + [0.0] * (3 - len(c))
    c0, c_rank, c_pad = coef[0], coef[1], coef[2] if x.shape[1] == 3 else 0.0
    pred = c0 + c_rank * rank[ok] + c_pad * pad[ok]
    return c0, c_rank, c_pad, quality(pred, swap[ok], "CPU->GPU swap ms")


def fit_disk_load(table: Table) -> tuple[float, float, ComponentFit]:
    """disk_ms = d0 + d_rank*rank from the start-up disk loads (first load excluded)."""
    rank = arr(table.column("adapter_rank"))
    disk = arr(table.column("disk_load_ms_mean_excl_first"))
    ok = np.isfinite(rank) & np.isfinite(disk) & (disk > 0)
    if not ok.any():
        return 0.0, 0.0, quality(arr([]), arr([]), "no disk-load rows: disk loads are free")
    if np.unique(rank[ok]).size < 2:
        d0 = float(np.mean(disk[ok]))
        return d0, 0.0, quality(np.full(int(ok.sum()), d0), disk[ok], "one rank only")
    c = wlstsq(np.c_[np.ones(int(ok.sum())), rank[ok]], disk[ok])
    pred = c[0] + c[1] * rank[ok]
    return float(c[0]), float(c[1]), quality(pred, disk[ok], "disk->CPU ms")


# ---------------------------------------------------------------- KV memory


def fit_kv(table: Table) -> tuple[float, float, float, float, ComponentFit]:
    """KV tokens = KV0 - L*(c_rank*R + c_slot); no-LoRA capacity as the median of those rows."""
    groups = [t.get("group", "") for t in table.text]
    kv = arr(table.column("kv_tokens"))
    loras = arr(table.column("max_loras"))
    rank = arr(table.column("max_lora_rank"))
    lora_on = arr(table.column("enable_lora"))
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
            return (
                base,
                0.0,
                0.0,
                plain,
                quality(
                    np.full(int(ok.sum()), base),
                    kv[ok],
                    f"{int(ok.sum())} LoRA start-ups: constant capacity, no slot/rank term",
                ),
            )
        base = kv_no_lora if math.isfinite(kv_no_lora) else 0.0
        return base, 0.0, 0.0, base, quality(arr([]), arr([]), "too few KV rows")
    x = np.c_[np.ones(int(ok.sum())), -loras[ok] * rank[ok], -loras[ok]]
    c = wlstsq(x, kv[ok])
    pred = x @ c
    kv0 = float(c[0])
    return (
        kv0,
        float(c[1]),
        float(c[2]),
        kv_no_lora if math.isfinite(kv_no_lora) else kv0,
        quality(pred, kv[ok], "KV tokens vs max_loras x max_lora_rank"),
    )


# ---------------------------------------------------------------- KV table of a profile


def kv_table(table: Table) -> tuple[tuple[int, int, int | None], ...]:
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
