"""Adapter loads a replica refused, remembered for a while so that routing stops choosing it.

A replica refuses to load an adapter (vLLM's 400/404/500 on ``POST /v1/load_lora_adapter``)
when it runs without ``--enable-lora``, when the adapter's rank is above its
``--max-lora-rank``, or when it cannot read the adapter's folder. None of these pass by
themselves, so the request is retried on another replica and the refusal is remembered per
(adapter, replica) for ``ttl_s``: the proxy leaves such replicas out of that adapter's candidates
(unless no other candidate is left). A refusal is forgotten when it expires, when the replica's
``/v1/models`` lists the adapter (someone loaded it there), when a load there succeeds, when the
adapter's path changes (a config reload, or another gateway's admin API) and when the admin API
registers or deletes the adapter. Local to one gateway instance: another instance learns the
same refusal from its own first refused load.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from loragate.core.clock import Clock
from loragate.core.types import AdapterSpec, ReplicaId


@dataclass(frozen=True, slots=True)
class Refusal:
    """One replica's refusal to load one adapter from ``path``, in force until ``until_s``."""

    path: str
    until_s: float
    error: str


class Refusals:
    """Refused adapter loads per adapter and replica (``ttl_s`` 0: none are remembered, only
    counted)."""

    __slots__ = ("_now", "by_adapter", "counts", "ttl_s")

    def __init__(self, ttl_s: float, clock: Clock) -> None:
        self.ttl_s = ttl_s
        self._now = clock.now
        # Adapter -> replica -> refusal; read-only outside this class (the proxy checks
        # ``name in by_adapter`` before calling :meth:`refusing`: no call while none refused).
        self.by_adapter: dict[str, dict[ReplicaId, Refusal]] = {}
        # Every refused load since start, by (adapter, replica): what /metrics counts.
        self.counts: dict[tuple[str, ReplicaId], int] = {}

    def record(self, spec: AdapterSpec, replica_id: ReplicaId, error: str) -> None:
        key = (spec.name, replica_id)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.ttl_s > 0:
            by_replica = self.by_adapter.setdefault(spec.name, {})
            by_replica[replica_id] = Refusal(spec.path, self._now() + self.ttl_s, error)

    def refusing(self, spec: AdapterSpec) -> Collection[ReplicaId]:
        """The replicas whose refusal of ``spec`` is in force now (the hot path: one dict
        lookup while this adapter has none)."""
        by_replica = self.by_adapter.get(spec.name)
        if not by_replica:
            return ()
        now = self._now()
        stale = [rid for rid, r in by_replica.items() if r.until_s <= now or r.path != spec.path]
        for rid in stale:
            del by_replica[rid]
        if not by_replica:
            del self.by_adapter[spec.name]
            return ()
        return frozenset(by_replica)

    def forget(self, adapter: str, replica_id: ReplicaId | None = None) -> None:
        """Forget the refusals of ``adapter`` (by every replica, or by ``replica_id``)."""
        if replica_id is None:
            self.by_adapter.pop(adapter, None)
            return
        by_replica = self.by_adapter.get(adapter)
        if by_replica is not None and replica_id in by_replica:
            del by_replica[replica_id]
            if not by_replica:
                del self.by_adapter[adapter]

    def listed(self, replica_id: ReplicaId, adapters: Iterable[str]) -> None:
        """A poll found ``adapters`` registered on the replica: it serves them now."""
        if self.by_adapter:
            for name in adapters:
                self.forget(name, replica_id)

    def forget_replica(self, replica_id: ReplicaId) -> None:
        for name in [n for n, by in self.by_adapter.items() if replica_id in by]:
            self.forget(name, replica_id)

    def of_replica(self, replica_id: ReplicaId) -> Mapping[str, tuple[str, float]]:
        """The refusals of the replica in force now: adapter -> (the replica's error, seconds
        until it is forgotten). For the admin API."""
        now = self._now()
        out: dict[str, tuple[str, float]] = {}
        for name, by_replica in self.by_adapter.items():
            refusal = by_replica.get(replica_id)
            if refusal is not None and refusal.until_s > now:
                out[name] = (refusal.error, refusal.until_s - now)
        return out
