"""Value types of the twin engine (re-exported by :mod:`loragate.twin.engine`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loragate.core.errors import ConfigError, InvalidRequestError


class EngineStartupError(ConfigError):
    """The engine refuses to start with this configuration (as vLLM does at start-up)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """vLLM engine settings that matter to the twin (names as vLLM's flags)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_lora: bool = True
    max_loras: int = 4
    max_cpu_loras: int = 8
    max_lora_rank: int = 16
    block_size: int = 16
    kv_capacity_tokens: int | None = None  # None: from the profile's KV memory model

    def check(self) -> None:
        """vLLM's argument checks; raises :class:`EngineStartupError`."""
        positive = {
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len,
            "block_size": self.block_size,
        }
        if self.enable_lora:
            positive |= {
                "max_loras": self.max_loras,
                "max_cpu_loras": self.max_cpu_loras,
                "max_lora_rank": self.max_lora_rank,
            }
        for key, value in positive.items():
            if value < 1:
                raise EngineStartupError(f"must be >= 1 (got {value})", key=key)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise EngineStartupError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be greater than "
                f"or equal to max_num_seqs ({self.max_num_seqs})",
                key="max_num_batched_tokens",
            )
        if self.enable_lora and self.max_cpu_loras < self.max_loras:
            raise EngineStartupError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})",
                key="max_cpu_loras",
            )


@dataclass(slots=True, kw_only=True)
class EngineRequest:
    """One generation request: the caller fixes the output length (``max_tokens`` tokens)."""

    request_id: str
    adapter: str | None
    adapter_rank: int = 0
    prompt_tokens: int
    max_tokens: int
    arrival_s: float


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: str
    time_s: float
    n_tokens: int
    finished: bool
    is_first: bool


@dataclass(slots=True)
class RequestRecord:
    """What a finished request experienced (times in engine seconds)."""

    request_id: str
    adapter: str | None
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    output_tokens: int
    deferred_s: float  # time spent waiting while the max_loras budget locked its adapter out
    preemptions: int


@dataclass(slots=True)
class StepResult:
    start_s: float
    duration_s: float
    events: list[TokenEvent] = field(default_factory=list)
    finished: list[RequestRecord] = field(default_factory=list)  # records of requests done


def validate_request(req: EngineRequest, config: EngineConfig) -> None:
    """Reject what vLLM rejects before queueing; raises :class:`InvalidRequestError`."""
    if req.prompt_tokens < 1:
        raise InvalidRequestError("The prompt must contain at least one token.", param="prompt")
    if req.max_tokens < 1:
        raise InvalidRequestError(
            f"max_tokens must be at least 1, got {req.max_tokens}.", param="max_tokens"
        )
    limit = config.max_model_len
    if req.prompt_tokens >= limit:
        raise InvalidRequestError(
            f"This model's maximum context length is {limit} tokens. However, your request has "
            f"{req.prompt_tokens} input tokens. Please reduce the length of the input messages.",
            param="messages",
        )
    if req.prompt_tokens + req.max_tokens > limit:
        raise InvalidRequestError(
            f"'max_tokens' is too large: {req.max_tokens}. This model's maximum context length "
            f"is {limit} tokens and your request has {req.prompt_tokens} input tokens "
            f"({req.max_tokens} > {limit} - {req.prompt_tokens}).",
            param="max_tokens",
        )
    if req.adapter is not None:
        if not config.enable_lora:
            raise InvalidRequestError(
                f"LoRA adapter {req.adapter!r} requested but LoRA is not enabled.", param="model"
            )
        if req.adapter_rank > config.max_lora_rank:
            raise InvalidRequestError(
                f"LoRA rank {req.adapter_rank} is greater than max_lora_rank "
                f"{config.max_lora_rank}.",
                param="model",
            )
