"""Adapter popularity shares and rank assignment."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from loragate.workload.spec import (
    DirichletPopularity,
    ExplicitPopularity,
    Popularity,
    UniformPopularity,
    ZipfPopularity,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def popularity_weights(pop: Popularity, count: int, rng: np.random.Generator) -> FloatArray:
    """Shares summing to 1, one per adapter in index order (index 0 = most popular for Zipf)."""
    if isinstance(pop, UniformPopularity):
        w = np.ones(count)
    elif isinstance(pop, ZipfPopularity):
        w = 1.0 / np.arange(1, count + 1, dtype=np.float64) ** pop.s
    elif isinstance(pop, DirichletPopularity):
        w = rng.dirichlet(np.full(count, pop.alpha))
        if not np.all(np.isfinite(w)) or w.sum() <= 0:  # tiny alpha can underflow
            w = np.zeros(count)
            w[int(rng.integers(count))] = 1.0
    elif isinstance(pop, ExplicitPopularity):
        w = np.asarray(pop.weights, dtype=np.float64)
    else:  # pragma: no cover - exhaustive
        raise TypeError(pop)
    return np.asarray(w / w.sum(), dtype=np.float64)


def assign_ranks(
    mix: tuple[tuple[int, float], ...], count: int, rng: np.random.Generator
) -> IntArray:
    """Ranks in exact proportion to ``mix`` (largest remainder), shuffled by ``rng``.

    With ``{8: 0.34, 16: 0.33, 32: 0.33}`` and 200 adapters: 68 / 66 / 66.
    """
    ranks = np.array([r for r, _ in mix], dtype=np.int64)
    shares = np.array([w for _, w in mix], dtype=np.float64)
    exact = shares * count
    counts = np.floor(exact).astype(np.int64)
    short = count - int(counts.sum())
    if short > 0:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:short]] += 1
    out = np.repeat(ranks, counts)
    rng.shuffle(out)
    return out
