"""Stationary arrival sources, drawn chunk by chunk (vectorised over streams).

A *stream* is one adapter (or the base model). A source returns the arrivals in ``[u0, u1)`` of
operational time and the stream of each, unsorted; the caller sorts and time-warps them.
Renewal sources carry their next arrival across chunks, so chunking does not change the process.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class Source(Protocol):
    def draw(self, u0: float, u1: float) -> tuple[FloatArray, IntArray]: ...


def _mark(cdf: FloatArray, rng: np.random.Generator, n: int) -> IntArray:
    """Stream index for ``n`` arrivals with probabilities given by ``cdf``."""
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(idx, len(cdf) - 1).astype(np.int64)


def _cdf(rates: FloatArray) -> FloatArray:
    return np.asarray(np.cumsum(rates / rates.sum()), dtype=np.float64)


class PoissonSource:
    """Independent Poisson streams = one Poisson stream at the total rate, marked by share."""

    __slots__ = ("_cdf", "_rng", "_total")

    def __init__(self, rates_rps: FloatArray, rng: np.random.Generator) -> None:
        self._total = float(rates_rps.sum())
        self._cdf = _cdf(rates_rps)
        self._rng = rng

    def draw(self, u0: float, u1: float) -> tuple[FloatArray, IntArray]:
        n = int(self._rng.poisson(self._total * (u1 - u0)))
        times = u0 + self._rng.random(n) * (u1 - u0)
        return times, _mark(self._cdf, self._rng, n)


class GammaRenewalSource:
    """One Gamma renewal process per stream with the given rates and inter-arrival CV.

    Starts in equilibrium: the first arrival is ``U * X`` with ``X`` length-biased
    (Gamma(k + 1, θ) for Gamma(k, θ) gaps), so the rate is flat from time 0.
    """

    __slots__ = ("_cv", "_next", "_rates", "_rng", "_scale", "_shape", "_streams")

    def __init__(
        self, rates_rps: FloatArray, cv: float, rng: np.random.Generator, start_u: float = 0.0
    ) -> None:
        self._streams = np.nonzero(rates_rps > 0)[0].astype(np.int64)
        self._rates = rates_rps[self._streams]
        self._cv = cv
        self._shape = 1.0 / (cv * cv)
        self._scale = 1.0 / (self._shape * self._rates)
        self._rng = rng
        first = rng.gamma(self._shape + 1.0, self._scale) * rng.random(len(self._streams))
        self._next: FloatArray = start_u + first

    def draw(self, u0: float, u1: float) -> tuple[FloatArray, IntArray]:
        active = np.nonzero(self._next < u1)[0]
        if len(active) == 0:
            return np.empty(0), np.empty(0, dtype=np.int64)
        start = self._next[active]
        expected = (u1 - start) * self._rates[active]
        extra = np.ceil(expected + 4.0 * self._cv * np.sqrt(expected) + 4.0).astype(np.int64)
        sizes = extra + 1  # the known next arrival, then `extra` fresh gaps
        ends = np.cumsum(sizes)
        starts = ends - sizes
        incr = self._rng.gamma(self._shape, 1.0, size=int(ends[-1]))
        incr *= np.repeat(self._scale[active], sizes)
        incr[starts] = 0.0
        cs = np.cumsum(incr)
        vals = cs - np.repeat(cs[starts], sizes) + np.repeat(start, sizes)
        below = vals < u1
        counts = np.add.reduceat(below.astype(np.int64), starts)
        times = [vals[below]]
        streams = [np.repeat(self._streams[active], sizes)[below]]
        full = counts == sizes  # ran out of draws before u1 (rare): continue one by one
        done = ~full
        self._next[active[done]] = vals[starts[done] + counts[done]]
        for j in np.nonzero(full)[0]:
            t = float(vals[ends[j] - 1])
            scale = float(self._scale[active[j]])
            more: list[float] = []
            while True:
                t += float(self._rng.gamma(self._shape, scale))
                if t >= u1:
                    break
                more.append(t)
            self._next[active[j]] = t
            times.append(np.asarray(more, dtype=np.float64))
            streams.append(np.full(len(more), self._streams[active[j]], dtype=np.int64))
        return np.concatenate(times), np.concatenate(streams)


class AggregateGammaSource:
    """The total stream is one Gamma renewal process; each arrival picks a stream by share."""

    __slots__ = ("_cdf", "_inner", "_rng")

    def __init__(self, rates_rps: FloatArray, cv: float, rng: np.random.Generator) -> None:
        self._inner = GammaRenewalSource(np.array([float(rates_rps.sum())]), cv, rng)
        self._cdf = _cdf(rates_rps)
        self._rng = rng

    def draw(self, u0: float, u1: float) -> tuple[FloatArray, IntArray]:
        times, _ = self._inner.draw(u0, u1)
        return times, _mark(self._cdf, self._rng, len(times))


def chunk_length_s(mean_rate_rps: float, *, target_events: int = 50_000) -> float:
    """Chunk length so a chunk holds about ``target_events`` arrivals (at most 600 s; no lower
    bound, so that a chunk's arrays stay that small at any rate)."""
    if mean_rate_rps <= 0:
        return 600.0
    return float(min(600.0, target_events / mean_rate_rps))
