"""Consistent hashing on the adapter, with bounded loads.

After Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads" (SODA 2018):
replicas sit on a hash ring at ``virtual_nodes`` points each; a request walks clockwise from
the hash of its adapter and goes to the first replica whose load stays within the bound. With
``m`` requests in the system (counting this one) over ``n`` replicas and load factor ``c``, a
replica may hold at most ``ceil(c * m / n)``; so it can take the request only if
``load + 1 <= ceil(c * (total_load + 1) / n)``. At least one replica always qualifies (the least
loaded one), and with the default c = 1.25 no replica gets more than ~25% above the average
while most adapters keep their first-choice replica.

Split into two plugins so compositions can reuse them:

* ``BoundedLoadFilter`` keeps the replicas within the bound;
* ``HashRingScorer`` scores candidates by their position in the adapter's walk order (first
  1.0, then decreasing), so ``max_score`` picks the first eligible one on the ring.

Load is ``in_flight + num_waiting`` (``framework.load_of``), as for ``least_loaded``.

Cost: the ring is rebuilt only when a replica id not seen before appears; each adapter's walk
order over all known replicas is computed once and cached, so a decision is O(replicas).
Replicas that are unhealthy or filtered out are skipped in the walk, so their adapters move to
the next replica on the ring and come back when they recover.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping, Sequence

from loragate.core.types import ReplicaId, ReplicaSnapshot, RoutingRequest
from loragate.routing.framework import RoutingContext, load_of

BASE_MODEL_KEY = "\x00base"
# Bound on cached walk orders (one per adapter); cleared wholesale when exceeded.
MAX_CACHED_ORDERS = 100_000


def ring_hash(text: str) -> int:
    """A stable 64-bit hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Replicas at ``virtual_nodes`` points each; ``order(key)`` is the clockwise walk."""

    __slots__ = ("_known", "_orders", "_owners", "_points", "virtual_nodes")

    def __init__(self, virtual_nodes: int = 160) -> None:
        self.virtual_nodes = virtual_nodes
        self._known: set[ReplicaId] = set()
        self._points: list[int] = []
        self._owners: list[ReplicaId] = []
        self._orders: dict[str, tuple[ReplicaId, ...]] = {}

    def ensure(self, replica_ids: Sequence[ReplicaId]) -> None:
        """Add any replica not on the ring yet (rebuilding it and dropping cached orders)."""
        if self._known.issuperset(replica_ids):
            return
        self._known.update(replica_ids)
        points = sorted(
            (ring_hash(f"{rid}#{i}"), rid)
            for rid in sorted(self._known)
            for i in range(self.virtual_nodes)
        )
        self._points = [p for p, _ in points]
        self._owners = [rid for _, rid in points]
        self._orders.clear()

    def order(self, key: str) -> tuple[ReplicaId, ...]:
        """Every known replica once, in the order met walking clockwise from ``key``'s hash."""
        cached = self._orders.get(key)
        if cached is not None:
            return cached
        total = len(self._known)
        seen: dict[ReplicaId, None] = {}
        n_points = len(self._owners)
        start = bisect.bisect_left(self._points, ring_hash(key))
        for i in range(n_points):
            rid = self._owners[(start + i) % n_points]
            if rid not in seen:
                seen[rid] = None
                if len(seen) == total:
                    break
        order = tuple(seen)
        if len(self._orders) >= MAX_CACHED_ORDERS:
            self._orders.clear()
        self._orders[key] = order
        return order


class BoundedLoadFilter:
    """Keeps replicas with ``load + 1 <= ceil(c * (total + 1) / n)`` (never empties the list)."""

    __slots__ = ("load_factor",)

    def __init__(self, load_factor: float = 1.25) -> None:
        self.load_factor = load_factor

    def filter(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Sequence[ReplicaSnapshot]:
        loads = [load_of(r) for r in replicas]
        cap = math.ceil(self.load_factor * (sum(loads) + 1) / len(replicas))
        kept = [r for r, x in zip(replicas, loads, strict=True) if x + 1 <= cap]
        return kept or replicas


class HashRingScorer:
    """1.0 for the candidate met first walking the ring from the adapter, then decreasing."""

    __slots__ = ("ring",)

    def __init__(self, virtual_nodes: int = 160) -> None:
        self.ring = HashRing(virtual_nodes)

    def score(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Mapping[ReplicaId, float]:
        ids = [r.replica_id for r in replicas]
        self.ring.ensure(ids)
        candidates = set(ids)
        n = len(ids)
        scores: dict[ReplicaId, float] = {}
        rank = 0
        for rid in self.ring.order(req.adapter if req.adapter is not None else BASE_MODEL_KEY):
            if rid in candidates:
                scores[rid] = 1.0 - rank / n
                rank += 1
        return scores
