"""Where ``POST /admin/adapters`` tries its load first: the order in which it asks the
replicas (``gateway.admin_adapters``), from what the gateway knows without I/O (the pool's
snapshots, the shadow residency, the in-flight counts, the loads under way).

vLLM 0.32 activates what it loads: a load takes a GPU slot at once, evicting the least
recently used adapter from the slots when all are taken, and a place in the CPU cache,
dropping the cache's least recently used adapter when it is full (``state.residency``). So a
registration's load is not free for the replica that takes it, and asking the first healthy
replica in config order every time piles every registration's evictions on that one replica.

The replicas that may take it (healthy, not draining, ``max_lora_rank`` not below the rank)
are asked in this order, each key breaking the ties of the one before:

1. the replicas that already hold the adapter (no load at all);
2. fewest evictions of adapters with requests of this gateway in flight there, then fewest
   adapters dropped from the CPU cache, then fewest pushed out of a GPU slot: the shadow
   residency, with the loads under way there applied first, moved as vLLM moves it;
3. fewest loads under way there (vLLM loads one adapter at a time, inside its engine steps:
   a burst of concurrent registrations spreads instead of queueing on one replica);
4. the replica the routing policy would send the adapter's first request to, when it has a
   preference (so the load is not wasted: e.g. ``consistent_hash``'s ring). The policy is
   asked on a copy of its own built from the ``routing:`` section (again after a reload),
   never the one serving requests (its counters, running means and random draws stay
   untouched), with the snapshots routing would see (in-flight counts, shadow residency with
   the loads under way), twice: once breaking every tie (and every random draw) towards the
   first replica, once towards the last. Only a choice both runs agree on is a preference;
   ``round_robin``, ``random`` or a tie among idle replicas has none;
5. fewest requests in flight and waiting (a load stalls the replica's running batch);
6. most free GPU slots left after the load, then most free CPU cache places (a burst of
   registrations on idle replicas fills them evenly);
7. in turn: the replica after the one that took the previous registration's load, in config
   order (when every replica would evict alike, the evictions rotate over them instead of
   emptying one replica's cache);
8. config order.

A replica that refuses the load, cannot be reached or does not answer in time is passed over
for the next one in this order, as before.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TypeVar

from loragate.core.config import RoutingConfig
from loragate.core.errors import LoragateError
from loragate.core.log_fields import about_request
from loragate.core.types import (
    AdapterId,
    AdapterSpec,
    ReplicaId,
    ReplicaSnapshot,
    Residency,
    RoutingRequest,
)
from loragate.routing import Policy, RoutingContext, build_policy, load_of
from loragate.state import residency as rz

log = logging.getLogger("loragate.gateway.admin")

_T = TypeVar("_T")


class _Extreme(random.Random):
    """A random source that always draws the same end: the first of a range (``last`` False)
    or the last. A picker's ties and random draws then go to the first (or last) candidate."""

    def __init__(self, last: bool) -> None:
        super().__init__(0)
        self._last = last

    def random(self) -> float:
        return 1.0 - 2.0**-53 if self._last else 0.0

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        values = range(start) if stop is None else range(start, stop, step)
        return values[-1] if self._last else values[0]

    def sample(
        self, population: Sequence[_T], k: int, *, counts: Iterable[int] | None = None
    ) -> list[_T]:
        items = list(population)
        return list(reversed(items[-k:])) if self._last else items[:k]


@dataclasses.dataclass(frozen=True, slots=True)
class Harm:
    """What a load would evict on one replica (adapter names, in the LRU's order)."""

    dropped: tuple[AdapterId, ...] = ()  # from the CPU cache (and its GPU slot)
    displaced: tuple[AdapterId, ...] = ()  # from a GPU slot, kept in the CPU cache
    hot: tuple[AdapterId, ...] = ()  # of those, the ones with requests in flight there

    def describe(self) -> str:
        parts = []
        if self.dropped:
            parts.append(f"would drop {', '.join(self.dropped)} from its CPU cache")
        if self.displaced:
            parts.append(f"would push {', '.join(self.displaced)} out of a GPU slot")
        return "; ".join(parts) or "evicts nothing"


def predicted_residency(
    res: Residency, loading: Collection[AdapterId], rp: ReplicaSnapshot
) -> Residency:
    """``res`` once the loads under way there are done (in name order: their order is not
    known)."""
    for name in sorted(loading):
        res = rz.load(res, name, rp.settings)
    return res


def harm_of(
    res: Residency, adapter: AdapterId, rp: ReplicaSnapshot, in_flight: Mapping[AdapterId, int]
) -> tuple[Harm, Residency]:
    """What loading ``adapter`` on a replica whose residency is ``res`` evicts, and the
    residency after."""
    after = rz.load(res, adapter, rp.settings)
    dropped = tuple(a for a in res.cpu if a not in after.cpu and a != adapter)
    displaced = tuple(a for a in res.gpu if a not in after.gpu and a in after.cpu and a != adapter)
    hot = tuple(a for a in (*dropped, *displaced) if in_flight.get(a, 0) > 0)
    return Harm(dropped, displaced, hot), after


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """One replica the load may be tried on, with what ranks it (see the module docstring)."""

    replica_id: ReplicaId
    held: bool
    harm: Harm
    loading: int
    preferred: bool
    load: int
    gpu_free: int
    cpu_free: int
    turn: int
    index: int

    def key(self) -> tuple[int, ...]:
        h = self.harm
        return (
            0 if self.held else 1,
            len(h.hot),
            len(h.dropped),
            len(h.displaced),
            self.loading,
            0 if self.preferred else 1,
            self.load,
            -self.gpu_free,
            -self.cpu_free,
            self.turn,
            self.index,
        )

    def why(self) -> str:
        """Why it is asked first, for the log."""
        if self.held:
            return "it holds the adapter already"
        reasons = [self.harm.describe()]
        if self.preferred:
            reasons.append("the routing policy's choice for its requests")
        reasons.append(f"{self.load} requests in flight or waiting, {self.loading} loads under way")
        reasons.append(f"{self.gpu_free} GPU slots free after it")
        return ", ".join(reasons)


@dataclasses.dataclass(slots=True, kw_only=True)
class ReplicaView:
    """The gateway's no-I/O reads a placement needs (bound methods of the pool, the shared
    state and the in-flight tracker)."""

    in_flight_of: Callable[[ReplicaId], int]
    residency_of: Callable[[ReplicaId], Residency]
    adapter_counts: Callable[[ReplicaId], Mapping[AdapterId, int]]
    loading: Callable[[ReplicaId], Collection[AdapterId]]
    is_registered: Callable[[ReplicaId, AdapterId], bool]
    now_s: float


class LoadPlacer:
    """Orders the replicas for a registration's load (one per gateway: it keeps whose turn it
    is and its copy of the routing policy)."""

    def __init__(self) -> None:
        self._last: ReplicaId | None = None
        self._policy: Policy | None = None
        self._policy_of: RoutingConfig | None = None  # the routing section it was built from

    def took(self, replica_id: ReplicaId) -> None:
        """The load went to ``replica_id``: the turn passes to the replica after it."""
        self._last = replica_id

    def order(
        self,
        spec: AdapterSpec,
        replicas: Sequence[ReplicaSnapshot],
        view: ReplicaView,
        routing: RoutingConfig,
        request_id: str | None = None,
    ) -> list[Candidate]:
        """``replicas`` (those that may take ``spec``, config order) best first.
        ``request_id``: the admin request it is for (its log lines carry it)."""
        n = len(replicas)
        ids = [r.replica_id for r in replicas]
        start = ids.index(self._last) + 1 if self._last in ids else 0
        snaps: list[ReplicaSnapshot] = []
        scored: list[tuple[ReplicaSnapshot, Harm, Residency, bool, int]] = []
        for rp in replicas:
            rid = rp.replica_id
            counts = view.adapter_counts(rid)
            loading = [a for a in view.loading(rid) if a != spec.name]
            res = predicted_residency(view.residency_of(rid), loading, rp)
            harm, after = harm_of(res, spec.name, rp, counts)
            snap = dataclasses.replace(
                rp, in_flight=view.in_flight_of(rid), residency=res, adapter_in_flight=counts
            )
            snaps.append(snap)
            scored.append((snap, harm, after, view.is_registered(rid, spec.name), len(loading)))
        preferred = self._preference(spec, snaps, routing, view.now_s, request_id)
        out = []
        for i, (snap, harm, after, held, loading_n) in enumerate(scored):
            gpu_cap, cpu_cap = rz.capacities(snap.settings)
            out.append(
                Candidate(
                    replica_id=snap.replica_id,
                    held=held,
                    harm=Harm() if held else harm,
                    loading=loading_n,
                    preferred=snap.replica_id == preferred,
                    load=load_of(snap),
                    gpu_free=gpu_cap - len(after.gpu),
                    cpu_free=cpu_cap - len(after.cpu),
                    turn=(i - start) % n,
                    index=i,
                )
            )
        out.sort(key=Candidate.key)
        return out

    def _preference(
        self,
        spec: AdapterSpec,
        snaps: Sequence[ReplicaSnapshot],
        routing: RoutingConfig,
        now_s: float,
        request_id: str | None = None,
    ) -> ReplicaId | None:
        """The replica the policy would send ``spec``'s first request to, if it has a
        preference (see the module docstring); None: none, or it could not say."""
        if len(snaps) < 2:
            return None
        about = about_request(request_id)
        policy = self._policy_for(routing, about)
        if policy is None:
            return None
        req = RoutingRequest(
            request_id=f"admin-load-{spec.name}", adapter=spec.name, adapter_rank=spec.rank
        )
        try:
            picks = {
                policy.choose(req, snaps, RoutingContext(now_s, _Extreme(last), {}))
                for last in (False, True)
            }
        except LoragateError as exc:  # e.g. a filter without fallback left no replica
            log.debug(
                "admin: no routing preference for adapter %s: %s", spec.name, exc, extra=about
            )
            return None
        except Exception:  # a fault in a plugin must not fail a registration already stored
            log.warning(
                "admin: the routing policy failed on adapter %s's placement; its load is "
                "placed without the policy's preference",
                spec.name,
                exc_info=True,
                extra=about,
            )
            return None
        return picks.pop() if len(picks) == 1 else None

    def _policy_for(
        self, routing: RoutingConfig, about: Mapping[str, object] | None = None
    ) -> Policy | None:
        """The placements' own policy from the ``routing:`` section, built again after a
        reload changed it (kept: ``consistent_hash`` builds its ring once, ~8 ms for 16
        replicas). Its state (counters, running means) is that of these dry runs alone."""
        if routing is not self._policy_of:
            self._policy_of = routing
            try:
                self._policy = build_policy(routing.build_spec(), seed=routing.seed)
            except LoragateError as exc:  # validated with the config: not expected
                log.warning(
                    "admin: routing policy not consulted for adapter loads: %s", exc, extra=about
                )
                self._policy = None
        return self._policy
