"""Plain value types shared across packages. No I/O, no third-party imports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

AdapterId = str
ReplicaId = str
TenantId = str


# Largest adapter rank accepted from config files and the admin API: far above any real LoRA
# rank (vLLM takes at most 512), small enough that cost models stay finite.
MAX_ADAPTER_RANK = 65536

# vLLM 0.32's --max-lora-rank choices (vllm/config/lora.py: ``MaxLoRARanks = Literal[1, 8, 16,
# 32, 64, 128, 256, 320, 512]``, the type of ``LoRAConfig.max_lora_rank``): it refuses to start
# with another. The one definition: gateway configs, simulated replicas and simulations check it.
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank_problem(rank: int) -> str | None:
    """Why vLLM would refuse ``--max-lora-rank rank`` (None: it takes it)."""
    if rank in VLLM_LORA_RANKS:
        return None
    choices = list(VLLM_LORA_RANKS)
    return f"must be one of vLLM's {choices} (its --max-lora-rank choices), got {rank}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterSpec:
    """A LoRA adapter the deployment serves.

    ``tenants`` is the set of tenants allowed to use it; ``None`` means every tenant.
    """

    name: AdapterId
    path: str
    rank: int = 8
    tenants: frozenset[TenantId] | None = None

    def allows(self, tenant: TenantId | None) -> bool:
        return self.tenants is None or (tenant is not None and tenant in self.tenants)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaSettings:
    """The LoRA-relevant engine settings of one replica (from config or discovered).

    ``max_lora_rank_known``: ``max_lora_rank`` is the replica's ``--max-lora-rank`` as its
    config says it (``settings.max_lora_rank``), not vLLM's default assumed (vLLM does not
    report it). Routing then never sends the replica an adapter of a higher rank, which it would
    refuse to load; an assumed one keeps every rank allowed."""

    max_loras: int = 4
    max_cpu_loras: int = 8
    max_lora_rank: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_lora_rank_known: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Residency:
    """loragate's model of which adapters a replica holds.

    ``gpu`` and ``cpu`` are in LRU order: least recently used first, most recent last.
    """

    registered: frozenset[AdapterId] = frozenset()
    gpu: tuple[AdapterId, ...] = ()
    cpu: tuple[AdapterId, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaSnapshot:
    """What routing knows about one replica at one moment."""

    replica_id: ReplicaId
    url: str
    healthy: bool = True
    settings: ReplicaSettings = field(default_factory=ReplicaSettings)
    # From the replica's /metrics (may lag by one poll interval).
    num_running: int = 0
    num_waiting: int = 0
    num_deferred: int = 0
    kv_usage: float = 0.0
    active_adapters: frozenset[AdapterId] = frozenset()
    # Adapters listed as waiting by the replica (``waiting_lora_adapters``; vLLM 0.32 repeats
    # the running list there). Optional; read by the ``lora_affinity`` scorer.
    waiting_adapters: frozenset[AdapterId] = frozenset()
    # Gateway-side bookkeeping (fresh on every request).
    in_flight: int = 0
    # In-flight requests per adapter on this replica (optional; base-model requests are not
    # listed). Fresher than ``active_adapters``; the ``loragate`` policy uses it when given.
    adapter_in_flight: Mapping[AdapterId, int] = field(default_factory=lambda: MappingProxyType({}))
    residency: Residency = field(default_factory=Residency)
    scraped_at_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingRequest:
    """The part of a client request that routing looks at."""

    request_id: str
    adapter: AdapterId | None
    tenant: TenantId | None = None
    prompt_tokens: int = 0
    max_tokens: int = 16
    stream: bool = False
    # LoRA rank of ``adapter`` if known (from its AdapterSpec); routing's load-cost estimates
    # use it, falling back to a default rank when ``None``.
    adapter_rank: int | None = None
