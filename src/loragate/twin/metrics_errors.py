"""Error metrics for twin-vs-real comparisons.

Conventions (``y`` real, ``p`` predicted, over pairs where both are finite and ``y != 0``):

- MAPE  = 100 * mean(|p - y| / |y|)
- SMAPE (standard) = 100 * mean(2 |p - y| / (|y| + |p|))
- SMAPE (paper)    = 100 * mean(|p - y| / (|y| + |p|)), the convention of every script of
  Agulló et al. (arXiv 2508.08343): half the standard value.
- median signed bias = 100 * median((p - y) / y)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorSummary:
    n: int
    mape_pct: float
    smape_pct: float
    smape_paper_pct: float
    median_bias_pct: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _pairs(real: Sequence[float], pred: Sequence[float]) -> list[tuple[float, float]]:
    if len(real) != len(pred):
        raise ValueError(f"length mismatch: {len(real)} real vs {len(pred)} predicted values")
    return [
        (y, p)
        for y, p in zip(real, pred, strict=True)
        if math.isfinite(y) and math.isfinite(p) and y != 0.0
    ]


def _median(values: list[float]) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2.0


def mape(real: Sequence[float], pred: Sequence[float]) -> float:
    pairs = _pairs(real, pred)
    if not pairs:
        return math.nan
    return 100.0 * sum(abs(p - y) / abs(y) for y, p in pairs) / len(pairs)


def smape(real: Sequence[float], pred: Sequence[float], *, factor: float = 2.0) -> float:
    """SMAPE with the given numerator factor (2 = standard, 1 = the paper's convention)."""
    pairs = _pairs(real, pred)
    if not pairs:
        return math.nan
    total = 0.0
    for y, p in pairs:
        denom = abs(y) + abs(p)
        total += factor * abs(p - y) / denom if denom > 0 else 0.0
    return 100.0 * total / len(pairs)


def median_bias(real: Sequence[float], pred: Sequence[float]) -> float:
    return 100.0 * _median([(p - y) / y for y, p in _pairs(real, pred)])


def summarize(real: Sequence[float], pred: Sequence[float]) -> ErrorSummary:
    return ErrorSummary(
        n=len(_pairs(real, pred)),
        mape_pct=mape(real, pred),
        smape_pct=smape(real, pred, factor=2.0),
        smape_paper_pct=smape(real, pred, factor=1.0),
        median_bias_pct=median_bias(real, pred),
    )
