"""Gateway-side in-flight request counts per replica (and per adapter on each replica),
behind a small interface.

These are *this instance's* counts: routing sees them per adapter in
``ReplicaSnapshot.adapter_in_flight`` and ``/metrics`` reports them. The per-replica total that
routing sees in ``ReplicaSnapshot.in_flight`` comes from the shared state store instead
(``gateway.shared.SharedState``: leases of every gateway instance), which calls
``acquire``/``release`` here on each request's begin and end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Protocol

from loragate.core.types import AdapterId, ReplicaId


class InFlightTracker(Protocol):
    def acquire(self, replica_id: ReplicaId, adapter: AdapterId | None) -> None: ...

    def release(self, replica_id: ReplicaId, adapter: AdapterId | None) -> None: ...

    def count(self, replica_id: ReplicaId) -> int: ...

    def adapter_counts(self, replica_id: ReplicaId) -> Mapping[AdapterId, int]:
        """In-flight requests per adapter on the replica (base-model requests not listed).
        May be a live read-only view."""
        ...

    def counts(self) -> Mapping[ReplicaId, int]: ...


class LocalInFlight:
    """Plain counters (one event loop, so no locking)."""

    __slots__ = ("_adapters", "_counts", "_views")

    def __init__(self, replica_ids: Iterable[ReplicaId] = ()) -> None:
        self._counts: dict[ReplicaId, int] = {}
        self._adapters: dict[ReplicaId, dict[AdapterId, int]] = {}
        self._views: dict[ReplicaId, Mapping[AdapterId, int]] = {}
        for rid in replica_ids:
            self._add(rid)

    def _add(self, replica_id: ReplicaId) -> None:
        self._counts[replica_id] = 0
        per_adapter: dict[AdapterId, int] = {}
        self._adapters[replica_id] = per_adapter
        self._views[replica_id] = MappingProxyType(per_adapter)

    def acquire(self, replica_id: ReplicaId, adapter: AdapterId | None) -> None:
        if replica_id not in self._counts:
            self._add(replica_id)
        self._counts[replica_id] += 1
        if adapter is not None:
            per_adapter = self._adapters[replica_id]
            per_adapter[adapter] = per_adapter.get(adapter, 0) + 1

    def release(self, replica_id: ReplicaId, adapter: AdapterId | None) -> None:
        n = self._counts.get(replica_id, 0)
        if n <= 0:
            return
        self._counts[replica_id] = n - 1
        if adapter is not None:
            per_adapter = self._adapters[replica_id]
            left = per_adapter.get(adapter, 0) - 1
            if left > 0:
                per_adapter[adapter] = left
            else:
                per_adapter.pop(adapter, None)

    def count(self, replica_id: ReplicaId) -> int:
        return self._counts.get(replica_id, 0)

    def adapter_counts(self, replica_id: ReplicaId) -> Mapping[AdapterId, int]:
        if replica_id not in self._views:
            self._add(replica_id)
        return self._views[replica_id]

    def counts(self) -> Mapping[ReplicaId, int]:
        return dict(self._counts)
