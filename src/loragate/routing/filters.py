"""Generic filters. A filter that would leave no candidate can fall back to its input."""

from __future__ import annotations

from collections.abc import Sequence

from loragate.core.types import ReplicaSnapshot, RoutingRequest
from loragate.routing.framework import RoutingContext, load_of


class MaxLoadFilter:
    """Keeps replicas whose load (in-flight + waiting) is at most ``max_load``."""

    __slots__ = ("fallback", "max_load")

    def __init__(self, max_load: int, *, fallback: bool = True) -> None:
        self.max_load = max_load
        self.fallback = fallback

    def filter(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Sequence[ReplicaSnapshot]:
        kept = [r for r in replicas if load_of(r) <= self.max_load]
        return kept if kept or not self.fallback else replicas


class KVUsageFilter:
    """Keeps replicas whose KV-cache usage is at most ``max_usage`` (0-1)."""

    __slots__ = ("fallback", "max_usage")

    def __init__(self, max_usage: float, *, fallback: bool = True) -> None:
        self.max_usage = max_usage
        self.fallback = fallback

    def filter(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Sequence[ReplicaSnapshot]:
        kept = [r for r in replicas if r.kv_usage <= self.max_usage]
        return kept if kept or not self.fallback else replicas


class RegisteredFilter:
    """Keeps replicas where the request's adapter is registered (base-model requests pass)."""

    __slots__ = ("fallback",)

    def __init__(self, *, fallback: bool = True) -> None:
        self.fallback = fallback

    def filter(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Sequence[ReplicaSnapshot]:
        adapter = req.adapter
        if adapter is None:
            return replicas
        kept = [r for r in replicas if adapter in r.residency.registered]
        return kept if kept or not self.fallback else replicas
