"""Pickers: choose one replica from the weighted score totals.

``scored`` keeps candidate order (the order of the replicas the caller passed in, minus the ones
filtered out), which makes the deterministic tie-breaks stable.

A picker class that ignores the scores says so with ``uses_scores = False``: a composed
``routing:`` section then must name no scorer, and one whose picker uses scores must name one
(``routing.config``), so neither is computed for nothing or left to pick at random unsaid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from loragate.core.types import ReplicaId
from loragate.routing.framework import RoutingContext

TieBreak = Literal["random", "first"]
TIE_BREAKS: tuple[TieBreak, ...] = ("random", "first")
# Totals closer than this count as equal (weighted sums of floats are not exact).
EPSILON = 1e-9


class MaxScorePicker:
    """The highest total wins; ties go to a random one (``random``) or the first (``first``)."""

    __slots__ = ("tie_break",)

    def __init__(self, tie_break: TieBreak = "random") -> None:
        self.tie_break = tie_break

    def pick(self, ctx: RoutingContext, scored: Mapping[ReplicaId, float]) -> ReplicaId:
        best = max(scored.values())
        threshold = best - EPSILON
        if self.tie_break == "first":
            for rid, v in scored.items():
                if v >= threshold:
                    return rid
        ties = [rid for rid, v in scored.items() if v >= threshold]
        if len(ties) == 1:
            return ties[0]
        return ties[ctx.rng.randrange(len(ties))]


class RoundRobinPicker:
    """Cycles through the candidates, ignoring scores. The counter lives in this object."""

    # A composed routing section with this picker takes no scorer (``routing.config``).
    uses_scores = False
    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, ctx: RoutingContext, scored: Mapping[ReplicaId, float]) -> ReplicaId:
        ids = list(scored)
        rid = ids[self._next % len(ids)]
        self._next = (self._next + 1) % (1 << 30)
        return rid


class RandomPicker:
    """Uniformly random among the candidates, ignoring scores."""

    uses_scores = False
    __slots__ = ()

    def pick(self, ctx: RoutingContext, scored: Mapping[ReplicaId, float]) -> ReplicaId:
        ids = list(scored)
        return ids[ctx.rng.randrange(len(ids))]


class WeightedRandomPicker:
    """Random with probability proportional to the total; uniform when every total is 0."""

    __slots__ = ()

    def pick(self, ctx: RoutingContext, scored: Mapping[ReplicaId, float]) -> ReplicaId:
        total = sum(scored.values())
        if total <= 0.0:
            ids = list(scored)
            return ids[ctx.rng.randrange(len(ids))]
        x = ctx.rng.random() * total
        last = ""
        for rid, v in scored.items():
            last = rid
            x -= v
            if x < 0.0:
                return rid
        return last


class PowerOfTwoPicker:
    """Two distinct candidates drawn at random; the higher total wins (ties: the first drawn).

    The "power of two choices" of Mitzenmacher (2001), as used by Ray Serve's request router.
    """

    __slots__ = ()

    def pick(self, ctx: RoutingContext, scored: Mapping[ReplicaId, float]) -> ReplicaId:
        ids = list(scored)
        if len(ids) == 1:
            return ids[0]
        i, j = ctx.rng.sample(range(len(ids)), 2)
        a, b = ids[i], ids[j]
        return b if scored[b] > scored[a] + EPSILON else a
