"""Settings of one whole-deployment simulation run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from loragate.core.errors import ConfigError

# The profile made for demos and tests (hand-set ~2 ms steps, calibrated on no hardware):
# ``loragate demo``'s on purpose, and the simulator's default.
DEMO_PROFILE = "fast"


def is_demo_profile(name: str) -> bool:
    """Whether a loaded profile's name is the demo profile's (a run with it sizes nothing)."""
    return name == DEMO_PROFILE


def profile_label(name: str) -> str:
    """A profile's name as run summaries print it: the demo one says what it is."""
    return f"{name} (the demo profile: sizes no real deployment)" if is_demo_profile(name) else name


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaEngineSettings:
    """vLLM settings of every simulated replica (all replicas are identical).

    ``max_lora_rank`` None = the smallest of vLLM's allowed values (1, 8, 16, 32, 64, ...) that
    fits the workload's largest adapter rank (what an operator sets).
    """

    max_loras: int = 4
    max_cpu_loras: int = 8
    max_lora_rank: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    kv_capacity_tokens: int | None = None  # None: from the profile's KV memory model


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationConfig:
    """``policy`` is what ``loragate.routing.build_policy`` takes (a name or a mapping).

    ``scrape_interval_s`` 0 gives routing the engines' state at every arrival; > 0 refreshes the
    engine-side fields of the snapshots only that often (as the gateway's metrics poller does),
    while the gateway-side fields (in-flight, residency) stay fresh. ``drain_s`` bounds how long
    after the last arrival the engines may run to finish outstanding requests.
    """

    replicas: int
    profile: str = DEMO_PROFILE
    policy: str | Mapping[str, Any] = "round_robin"
    engine: ReplicaEngineSettings = ReplicaEngineSettings()
    seed: int | None = None  # None: the workload spec's seed
    ttft_slo_ms: float = 1000.0
    # A request that waits longer than this for its first token (or never gets it) is starved.
    starvation_wait_s: float = 60.0
    scrape_interval_s: float = 0.0
    drain_s: float = 600.0
    preregister: Literal["all", "none"] = "all"

    def check(self) -> None:
        if self.replicas < 1:
            raise ConfigError("must be >= 1", key="replicas")
        if self.ttft_slo_ms <= 0:
            raise ConfigError("must be > 0", key="ttft_slo_ms")
        if self.starvation_wait_s <= 0:
            raise ConfigError("must be > 0", key="starvation_wait_s")
        if self.scrape_interval_s < 0:
            raise ConfigError("must be >= 0", key="scrape_interval_s")
        if self.drain_s < 0:
            raise ConfigError("must be >= 0", key="drain_s")
        if self.seed is not None and self.seed < 0:
            raise ConfigError("must be >= 0", key="seed")


class KvCapacityError(ConfigError):
    """A replica's KV cache cannot hold one sequence of ``max_model_len`` tokens (vLLM refuses
    to start so). ``kv_tokens`` is the cache's size in whole 16-token blocks: from
    ``given_tokens`` (``kv_capacity_tokens``) if set, else from ``profile``'s KV memory model for
    ``max_loras`` x ``max_lora_rank``."""

    def __init__(
        self,
        *,
        max_model_len: int,
        kv_tokens: int,
        given_tokens: int | None,
        profile: str,
        max_loras: int,
        max_lora_rank: int,
    ) -> None:
        self.max_model_len = max_model_len
        self.kv_tokens = kv_tokens
        self.given_tokens = given_tokens
        self.profile = profile
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        if given_tokens is not None:
            source = f"kv_capacity_tokens {given_tokens}"
            fixes = "raise kv_capacity_tokens"
        else:
            source = (
                f"profile {profile}'s KV memory model for max_loras {max_loras} x "
                f"max_lora_rank {max_lora_rank}"
            )
            fixes = (
                "set kv_capacity_tokens, use a profile with more KV memory, or lower "
                "max_loras x max_lora_rank (LoRA slots take KV memory)"
            )
        super().__init__(
            f"{max_model_len} tokens do not fit in a replica's KV cache ({kv_tokens} tokens, "
            f"from {source}): lower max_model_len, or {fixes}",
            key="max_model_len",
        )
