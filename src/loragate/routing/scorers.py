"""Generic load scorers (adapter-blind). Adapter-aware scorers live in their policy modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loragate.core.types import ReplicaId, ReplicaSnapshot, RoutingRequest
from loragate.routing.framework import RoutingContext, load_of


class LoadScorer:
    """Fewer in-flight + waiting requests scores higher: min-max scaled, 1.0 when all equal."""

    bounded_scores = True

    __slots__ = ()

    def score(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Mapping[ReplicaId, float]:
        loads = [load_of(r) for r in replicas]
        lo, hi = min(loads), max(loads)
        if hi == lo:
            return {r.replica_id: 1.0 for r in replicas}
        span = float(hi - lo)
        return {r.replica_id: (hi - x) / span for r, x in zip(replicas, loads, strict=True)}


class QueueScorer:
    """The Gateway API Inference Extension's ``queue-scorer``: waiting-queue length, min-max
    scaled (shortest queue 1.0, longest 0.0, all equal 1.0).

    Source read: kubernetes-sigs/gateway-api-inference-extension,
    pkg/epp/scheduling/framework/plugins/scorer/queue.go.
    """

    bounded_scores = True

    __slots__ = ()

    def score(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Mapping[ReplicaId, float]:
        lo = min(r.num_waiting for r in replicas)
        hi = max(r.num_waiting for r in replicas)
        if hi == lo:
            return {r.replica_id: 1.0 for r in replicas}
        span = float(hi - lo)
        return {r.replica_id: (hi - r.num_waiting) / span for r in replicas}


class KVCacheScorer:
    """The extension's ``kv-cache-utilization-scorer``: ``1 - kv_usage``.

    Source read: kubernetes-sigs/gateway-api-inference-extension,
    pkg/epp/scheduling/framework/plugins/scorer/kvcache_utilization.go.
    """

    __slots__ = ()

    def score(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Mapping[ReplicaId, float]:
        return {r.replica_id: 1.0 - r.kv_usage for r in replicas}
