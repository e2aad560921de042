"""Talking to replicas: the vLLM HTTP client, the ``/metrics`` parser, the replica pool."""

from loragate.backends.client import ModelCard, ModelList, VllmClient, parse_models
from loragate.backends.metrics import VllmMetrics, parse_vllm_metrics
from loragate.backends.pool import ReplicaPool

__all__ = [
    "ModelCard",
    "ModelList",
    "ReplicaPool",
    "VllmClient",
    "VllmMetrics",
    "parse_models",
    "parse_vllm_metrics",
]
