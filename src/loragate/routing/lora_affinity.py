"""The Kubernetes Gateway API Inference Extension's LoRA affinity scorer, as published.

Read from kubernetes-sigs/gateway-api-inference-extension (no code copied):
``pkg/epp/scheduling/framework/plugins/scorer/lora_affinity.go`` (type ``lora-affinity-scorer``):

* 1.0 — the adapter is active on the model server (in its running-adapters metric);
* 0.8 — the server can load one more adapter: ``len(active) + len(waiting) < max_loras``;
* 0.6 — the adapter is already queued there (in its waiting-adapters metric);
* 0.0 — otherwise.

The extension's default profile pairs it with ``queue-scorer`` (waiting-queue length, min-max
scaled) and ``kv-cache-utilization-scorer`` (``1 - usage``), every scorer at the default weight
1.0 (its ``docs/architecture.md``: "scorer weight defaults to 1"), and ``max-score-picker``
(random among ties). See ``scorers.QueueScorer`` and ``scorers.KVCacheScorer``.

Inputs here: ``active_adapters`` and ``waiting_adapters`` of the snapshot (both from
``vllm:lora_requests_info``; vLLM 0.32 repeats the running list as the waiting list, so against
real 0.32 the free-slot test counts each adapter twice, exactly as the extension would) and
``settings.max_loras``. A base-model request needs no slot and scores 1.0 everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loragate.core.types import ReplicaId, ReplicaSnapshot, RoutingRequest
from loragate.routing.framework import RoutingContext

ACTIVE = 1.0
FREE_SLOT = 0.8
QUEUED = 0.6


class LoraAffinityScorer:
    bounded_scores = True

    __slots__ = ()

    def score(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Mapping[ReplicaId, float]:
        adapter = req.adapter
        if adapter is None:
            return {r.replica_id: ACTIVE for r in replicas}
        scores: dict[ReplicaId, float] = {}
        for r in replicas:
            if adapter in r.active_adapters:
                scores[r.replica_id] = ACTIVE
            elif len(r.active_adapters) + len(r.waiting_adapters) < r.settings.max_loras:
                scores[r.replica_id] = FREE_SLOT
            elif adapter in r.waiting_adapters:
                scores[r.replica_id] = QUEUED
            else:
                scores[r.replica_id] = 0.0
        return scores
