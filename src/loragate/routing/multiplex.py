"""Ray Serve's model multiplexing, applied to LoRA adapters.

Ray Serve routes a request carrying a multiplexed model id to a replica that already has that
model loaded; if none has it (or all those are at ``max_ongoing_requests``) it falls back to
the replicas with the fewest models loaded, then to any replica, choosing among candidates by
queue length with "power of two choices". Each replica keeps at most
``max_num_models_per_replica`` models and evicts the least recently used. (Read from
ray-project/ray ``python/ray/serve/_private/request_router`` — ``MultiplexMixin`` and
``PowerOfTwoChoicesRequestRouter`` — and the Serve "Model Multiplexing" guide; no code copied.)

Here "has the model loaded" means the adapter is in the replica's shadow residency: its GPU
slots or CPU cache (``Residency.gpu`` / ``Residency.cpu``; the LRU eviction is modelled there by
whoever maintains the residency after each routing decision, e.g. ``state.residency.touch``).
Setting ``include_registered`` also counts adapters only registered (on disk). Ray Serve LLM's
default ``max_ongoing_requests`` is effectively unbounded (1e9), which ``None`` mirrors.

The synchronous router cannot wait out Ray's matching timeout, so the fallback is immediate:
``least_loaded`` (all replicas, the default, as the architecture describes) or
``fewest_models`` (Ray's first fallback tier).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from loragate.core.types import ReplicaSnapshot, RoutingRequest
from loragate.routing.framework import RoutingContext, load_of

Fallback = Literal["least_loaded", "fewest_models"]
FALLBACKS: tuple[Fallback, ...] = ("least_loaded", "fewest_models")


class MultiplexFilter:
    """Keeps replicas holding the adapter (and below ``max_ongoing_requests``), else falls back."""

    __slots__ = ("fallback", "include_registered", "max_ongoing_requests")

    def __init__(
        self,
        *,
        max_ongoing_requests: int | None = None,
        include_registered: bool = False,
        fallback: Fallback = "least_loaded",
    ) -> None:
        self.max_ongoing_requests = max_ongoing_requests
        self.include_registered = include_registered
        self.fallback = fallback

    def _holds(self, r: ReplicaSnapshot, adapter: str) -> bool:
        res = r.residency
        if adapter in res.gpu or adapter in res.cpu:
            return True
        return self.include_registered and adapter in res.registered

    def filter(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Sequence[ReplicaSnapshot]:
        cap = self.max_ongoing_requests
        if cap is not None:
            open_ = [r for r in replicas if load_of(r) < cap]
            replicas = open_ or replicas
        adapter = req.adapter
        if adapter is None:
            return replicas
        holders = [r for r in replicas if self._holds(r, adapter)]
        if holders:
            return holders
        if self.fallback == "fewest_models":
            counts = [len(set(r.residency.cpu) | set(r.residency.gpu)) for r in replicas]
            fewest = min(counts)
            return [r for r, c in zip(replicas, counts, strict=True) if c == fewest]
        return replicas
