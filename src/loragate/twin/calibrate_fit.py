"""Least-squares and fit-quality helpers shared by the calibration fits (``calibrate_*``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Rows a fit misses by more than this (% of the measured step) are dropped once and the fit is
# repeated, so a single odd probe cannot drag the coefficients.
TRIM_PCT = 25.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ComponentFit:
    """Quality of one component's fit on its own calibration rows."""

    rows: int
    mape_pct: float
    max_abs_pct: float
    note: str = ""


def arr(values: list[float]) -> FloatArray:
    return np.asarray(values, dtype=np.float64)


def wlstsq(x: FloatArray, y: FloatArray, *, relative: bool = True) -> FloatArray:
    """Least squares, weighted by 1/y so that relative errors are minimised."""
    if relative:
        w = 1.0 / np.maximum(np.abs(y), 1e-9)
        coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    else:
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return np.asarray(coef, dtype=np.float64)


def quality(pred: FloatArray, y: FloatArray, note: str = "") -> ComponentFit:
    if y.size == 0:
        return ComponentFit(rows=0, mape_pct=math.nan, max_abs_pct=math.nan, note=note)
    rel = np.abs(pred - y) / np.maximum(np.abs(y), 1e-12) * 100.0
    return ComponentFit(
        rows=int(y.size), mape_pct=float(rel.mean()), max_abs_pct=float(rel.max()), note=note
    )


def expected_distinct(n_adapters: FloatArray, batch: FloatArray) -> FloatArray:
    """Expected distinct adapters among ``batch`` requests drawn uniformly from ``n``."""
    n = np.maximum(n_adapters, 1.0)
    return np.minimum(n * (1.0 - np.power(1.0 - 1.0 / n, batch)), np.maximum(batch, 1.0))


def wlstsq_rel_total(x: FloatArray, y: FloatArray, offset: FloatArray) -> FloatArray:
    """Fit y ~ x @ c minimising errors relative to the total (offset + y)."""
    w = 1.0 / np.maximum(np.abs(offset + y), 1e-9)
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    return np.asarray(coef, dtype=np.float64)
