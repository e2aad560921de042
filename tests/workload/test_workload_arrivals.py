"""Statistical properties of generated streams (fixed seeds, large samples, loose tolerances)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from loragate.workload import BASE, Workload, spec_from_mapping


def _workload(arrivals: dict[str, Any], **top: Any) -> Workload:
    data: dict[str, Any] = {
        "duration_s": 3600,
        "seed": 11,
        "adapters": {"count": 20},
        "arrivals": arrivals,
        "lengths": {"prompt": 10, "output": 5},
    }
    data.update(top)
    return Workload(spec_from_mapping(data))


def _arrays(wl: Workload) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    batches = list(wl.batches())
    return (
        np.concatenate([b.t_s for b in batches]),
        np.concatenate([b.adapter_index for b in batches]),
    )


def _cv(x: npt.NDArray[np.float64]) -> float:
    return float(np.std(x) / np.mean(x))


def test_poisson_total_and_per_adapter_rates() -> None:
    wl = _workload({"process": "poisson", "rate_rps": 40})
    t, a = _arrays(wl)
    assert np.all(np.diff(t) >= 0)
    expected = 40 * 3600
    assert abs(len(t) - expected) < 4 * math.sqrt(expected)
    counts = np.bincount(a, minlength=20)
    want = wl.mean_rates_rps * 3600
    assert np.all(np.abs(counts - want) < 5 * np.sqrt(want))
    # Poisson: inter-arrival CV ~ 1 (the gamma tests below must differ from this).
    assert _cv(np.diff(t)) == pytest.approx(1.0, abs=0.03)


def test_zipf_popularity_shape() -> None:
    wl = _workload(
        {"process": "poisson", "rate_rps": 50},
        adapters={"count": 50, "popularity": {"kind": "zipf", "s": 1.2}},
    )
    _, a = _arrays(wl)
    counts = np.bincount(a, minlength=50).astype(float)
    # log(count) vs log(popularity rank) has slope -s.
    slope = np.polyfit(np.log(np.arange(1, 51)), np.log(counts), 1)[0]
    assert slope == pytest.approx(-1.2, abs=0.05)
    assert counts[0] / counts[1] == pytest.approx(2**1.2, rel=0.05)
    shares = wl.mean_rates_rps / wl.offered_rate_rps
    h = np.sum(1.0 / np.arange(1, 51) ** 1.2)
    assert shares[0] == pytest.approx(1 / h)


def test_dirichlet_popularity_spread_follows_alpha() -> None:
    k = 400

    def shares(alpha: float, seed: int) -> npt.NDArray[np.float64]:
        wl = _workload(
            {"process": "poisson", "rate_rps": 10},
            adapters={"count": k, "popularity": {"kind": "dirichlet", "alpha": alpha}},
            seed=seed,
            duration_s=1,
        )
        return wl.mean_rates_rps / wl.offered_rate_rps

    for alpha in (0.2, 5.0):
        w = shares(alpha, 3)
        # Var of a symmetric Dirichlet component: (1/k)(1 - 1/k) / (k alpha + 1).
        want = (1 / k) * (1 - 1 / k) / (k * alpha + 1)
        assert np.var(w) == pytest.approx(want, rel=0.35)
    assert not np.allclose(shares(1.0, 3), shares(1.0, 4))
    assert np.allclose(shares(1.0, 3), shares(1.0, 3))


def test_dirichlet_counts_follow_drawn_shares() -> None:
    wl = _workload(
        {"process": "poisson", "rate_rps": 50},
        adapters={"count": 30, "popularity": {"kind": "dirichlet", "alpha": 0.5}},
    )
    _, a = _arrays(wl)
    counts = np.bincount(a, minlength=30)
    want = wl.mean_rates_rps * 3600
    assert np.all(np.abs(counts - want) < 5 * np.sqrt(want) + 5)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_per_adapter_cv(cv: float) -> None:
    wl = _workload(
        {"process": "gamma", "rate_rps": 20, "cv": cv},
        adapters={"count": 4},
        duration_s=20_000,
    )
    t, a = _arrays(wl)
    for i in range(4):
        ti = t[a == i]
        iat = np.diff(ti)
        assert _cv(iat) == pytest.approx(cv, rel=0.1)
        assert len(ti) / 20_000 == pytest.approx(5.0, rel=0.1)


def test_gamma_aggregate_cv() -> None:
    wl = _workload(
        {"process": "gamma", "rate_rps": 20, "cv": 2.5, "scope": "aggregate"},
        duration_s=10_000,
    )
    t, a = _arrays(wl)
    assert _cv(np.diff(t)) == pytest.approx(2.5, rel=0.1)
    # The marking thins the total stream: per-adapter streams are much less bursty.
    assert _cv(np.diff(t[a == 0])) < 2.0
    assert len(t) / 10_000 == pytest.approx(20, rel=0.1)


@pytest.mark.parametrize("process", ["poisson", "gamma"])
def test_diurnal_modulation_visible(process: str) -> None:
    arrivals: dict[str, Any] = {
        "process": process,
        "rate_rps": 30,
        "diurnal": {"period_s": 1200, "amplitude": 0.6, "phase_s": 100},
    }
    if process == "gamma":
        arrivals["cv"] = 1.5
    wl = _workload(arrivals, duration_s=12_000)
    t, _ = _arrays(wl)
    # Fold into 12 phase bins; compare with 1 + A sin(2 pi (t - phase) / P) averaged per bin.
    phase = ((t - 100) % 1200) / 1200
    counts = np.bincount((phase * 12).astype(int), minlength=12)
    centers = (np.arange(12) + 0.5) / 12
    bin_avg = 1 + 0.6 * np.sin(2 * np.pi * centers) * np.sinc(1 / 12)
    want = 30 * 12_000 / 12 * bin_avg
    assert np.corrcoef(counts, want)[0, 1] > 0.98
    assert np.max(np.abs(counts / want - 1)) < 0.1
    assert len(t) == pytest.approx(30 * 12_000, rel=0.03)
    assert wl.offered_rate_rps == pytest.approx(30, rel=1e-6)


def test_onoff_bursts() -> None:
    wl = _workload(
        {
            "process": "poisson",
            "onoff": {"on_s": 10, "off_s": 30, "on_rate_rps": 100, "off_rate_rps": 4},
        },
        duration_s=4000,
    )
    t, _ = _arrays(wl)
    on = (t % 40) < 10
    on_rate = on.sum() / (100 * 10)
    off_rate = (~on).sum() / (100 * 30)
    assert on_rate == pytest.approx(100, rel=0.03)
    assert off_rate == pytest.approx(4, rel=0.1)
    assert wl.offered_rate_rps == pytest.approx((10 * 100 + 30 * 4) / 40)


def test_onoff_exponential_phases_with_gamma() -> None:
    wl = _workload(
        {
            "process": "gamma",
            "cv": 2.0,
            "onoff": {
                "on_s": 20,
                "off_s": 20,
                "on_rate_rps": 50,
                "off_rate_rps": 0,
                "durations": "exponential",
                "start": "off",
            },
        },
        duration_s=5000,
    )
    t, _ = _arrays(wl)
    # Counts per second: silent seconds (off) and busy seconds (on) both occur.
    per_s = np.bincount(t.astype(int), minlength=5000)
    assert (per_s == 0).mean() > 0.3
    assert np.percentile(per_s, 90) > 30
    assert len(t) == pytest.approx(wl.offered_rate_rps * 5000, rel=0.1)


def test_base_fraction() -> None:
    wl = _workload(
        {"process": "poisson", "rate_rps": 20}, adapters={"count": 5, "base_fraction": 0.25}
    )
    _, a = _arrays(wl)
    assert (a == BASE).mean() == pytest.approx(0.25, abs=0.01)
    reqs = list(wl.requests())
    base = [r for r in reqs if r.adapter is None]
    assert base and all(r.rank == 0 for r in base)
    assert wl.base_rate_rps == pytest.approx(5.0)


def test_determinism_and_seed() -> None:
    arrivals = {"process": "gamma", "rate_rps": 20, "cv": 2}
    lengths = {"prompt": {"kind": "lognormal", "mean": 200, "sigma": 1}, "output": 10}
    a = list(_workload(arrivals, lengths=lengths, duration_s=300).requests())
    b = list(_workload(arrivals, lengths=lengths, duration_s=300).requests())
    wl = _workload(arrivals, lengths=lengths, duration_s=300)
    c1, c2 = list(wl.requests()), list(wl.requests())
    assert a == b == c1 == c2
    other = list(_workload(arrivals, lengths=lengths, duration_s=300, seed=12).requests())
    assert other != a


def test_rank_mix_exact_and_shuffled() -> None:
    wl = _workload(
        {"process": "poisson", "rate_rps": 1},
        adapters={"count": 200, "ranks": {8: 0.34, 16: 0.33, 32: 0.33}},
        duration_s=1,
    )
    ranks = np.array([ad.rank for ad in wl.adapters])
    assert [(ranks == r).sum() for r in (8, 16, 32)] == [68, 66, 66]
    assert not np.all(np.diff(ranks) >= 0)  # not sorted: ranks independent of popularity


def test_lengths_distributions() -> None:
    lengths = {
        "prompt": {"kind": "lognormal", "mean": 500, "sigma": 0.7, "min": 1, "max": 100_000},
        "output": {"kind": "empirical", "values": [10, 100], "weights": [3, 1]},
    }
    wl = _workload({"process": "poisson", "rate_rps": 50}, lengths=lengths, duration_s=400)
    reqs = list(wl.requests())
    prompt = np.array([r.prompt_tokens for r in reqs])
    out = np.array([r.max_tokens for r in reqs])
    assert prompt.mean() == pytest.approx(500, rel=0.03)
    assert np.median(prompt) == pytest.approx(500 * math.exp(-(0.7**2) / 2), rel=0.05)
    assert (out == 10).mean() == pytest.approx(0.75, abs=0.02)
    assert set(out.tolist()) == {10, 100}


def test_max_total_tokens_clips() -> None:
    lengths = {
        "prompt": {"kind": "uniform", "min": 50, "max": 200},
        "output": 100,
        "max_total_tokens": 180,
    }
    wl = _workload({"process": "poisson", "rate_rps": 50}, lengths=lengths, duration_s=100)
    for b in wl.batches():
        assert np.all(b.prompt_tokens + b.max_tokens <= 180)
        assert np.all(b.max_tokens >= 1) and np.all(b.prompt_tokens <= 179)


def test_stream_is_lazy_and_chunked() -> None:
    # One simulated day at 100 req/s: the first batch arrives without building the whole day.
    wl = _workload({"process": "poisson", "rate_rps": 100}, duration_s=86_400)
    first = next(wl.batches())
    assert 0 < len(first) < 100 * 86_400 / 10
    assert first.t_s[-1] < 86_400 / 10
