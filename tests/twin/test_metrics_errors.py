"""Error metrics on hand-computed examples."""

from __future__ import annotations

import math

import pytest

from loragate.twin.metrics_errors import mape, median_bias, smape, summarize


def test_mape_hand_computed() -> None:
    # |110-100|/100 = 0.1, |45-50|/50 = 0.1, |200-200| = 0 -> mean 0.0667
    assert mape([100, 50, 200], [110, 45, 200]) == pytest.approx(100 * 0.2 / 3)


def test_smape_conventions() -> None:
    real, pred = [100.0, 50.0], [150.0, 50.0]
    # standard: 2*50/250 = 0.4 and 0 -> 20 %; the paper's convention has no factor 2 -> 10 %
    assert smape(real, pred) == pytest.approx(20.0)
    assert smape(real, pred, factor=1.0) == pytest.approx(10.0)


def test_median_bias_is_signed() -> None:
    # signed errors -10 %, +20 %, +5 % -> median +5 %
    assert median_bias([100, 100, 100], [90, 120, 105]) == pytest.approx(5.0)
    assert median_bias([100, 100], [80, 90]) == pytest.approx(-15.0)


def test_non_finite_and_zero_real_values_are_skipped() -> None:
    s = summarize([100.0, math.nan, 0.0, 200.0], [110.0, 5.0, 3.0, math.inf])
    assert s.n == 1
    assert s.mape_pct == pytest.approx(10.0)
    assert s.smape_paper_pct == pytest.approx(100 * 10 / 210)


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="length mismatch"):
        mape([1.0, 2.0], [1.0])
