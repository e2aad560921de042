"""Settings of one simulated vLLM replica (``loragate replica``), mirroring vLLM 0.32's flags.

Defaults follow vLLM where vLLM has the flag (``--enable-lora`` off, ``--max-loras 1``,
``--max-lora-rank 16``, ``--max-cpu-loras`` = ``--max-loras``); the rest are the twin's own
knobs (``profile``, ``resolver_dir``, ``seed``, ``time_scale``, ``mean_output_tokens``,
``add_bos``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from loragate.core.errors import ConfigError
from loragate.core.types import max_lora_rank_problem
from loragate.twin.synthetic_text import TINY_LLAMA_FORMAT, PromptFormat

DEFAULT_MODEL = "loragate/sim-base"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoraModule:
    """One ``--lora-modules`` entry: an adapter registered at start-up."""

    name: str
    path: str


def parse_lora_module(text: str) -> LoraModule:
    """Parse ``name=path`` or vLLM's JSON form ``{"name": ..., "path": ...}``."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid JSON: {exc.msg}", key="lora_modules") from exc
        if not isinstance(data, dict):
            raise ConfigError("JSON form must be an object", key="lora_modules")
        name, path = data.get("name"), data.get("path")
    else:
        name, sep, path = stripped.partition("=")
        if not sep:
            raise ConfigError(f"expected name=path, got {text!r}", key="lora_modules")
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise ConfigError(f"expected a non-empty name and path, got {text!r}", key="lora_modules")
    return LoraModule(name=name, path=path)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaConfig:
    """Everything ``create_replica_app`` needs. Build it in code or from CLI flags."""

    host: str = "127.0.0.1"
    port: int = 8000
    # --model: only used as the base card's ``root`` and for the resolver's
    # ``base_model_name_or_path`` check (as in vLLM, the model *path*, not the served name).
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    enable_lora: bool = False
    # vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: the admin routes (load, unload, /adapters)
    # exist; without it they are FastAPI's 404 {"detail":"Not Found"}.
    runtime_lora_updating: bool = True
    max_loras: int = 1
    max_cpu_loras: int | None = None  # None -> max_loras, as in vLLM
    max_lora_rank: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    block_size: int = 16
    num_gpu_blocks_override: int | None = None  # KV capacity = blocks * block_size
    lora_modules: tuple[LoraModule, ...] = ()
    enable_server_load_tracking: bool = False
    # --shutdown-timeout: seconds (of the replica's time, like every duration: wall seconds
    # times time_scale) that a SIGTERM lets requests in flight finish before the engine is
    # killed; 0 aborts them at once (vLLM's default).
    shutdown_timeout: float = 0.0
    # Twin-only knobs.
    profile: str = "fast"
    resolver_dir: str | None = None
    seed: int = 0
    time_scale: float = 1.0  # speed factor: 10.0 runs the engine ten times faster than real time
    mean_output_tokens: float = 128.0  # mean of the sampled EOS position when ignore_eos is false
    # Whether the served model's tokenizer adds a BOS token to a completion prompt (it is the
    # tokenizer's config: Llama's do, the bundled tiny-llama's and Qwen's do not). It changes
    # only the synthetic prompt token counts (usage, prefill, the context-window checks).
    add_bos: bool = TINY_LLAMA_FORMAT.add_bos

    def __post_init__(self) -> None:
        positive = {
            "max_loras": self.max_loras,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len,
            "block_size": self.block_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"must be >= 1, got {value}", key=key)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"must be in 0..65535, got {self.port}", key="port")
        rank_problem = max_lora_rank_problem(self.max_lora_rank)
        if rank_problem is not None:
            raise ConfigError(rank_problem, key="max_lora_rank")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})",
                key="max_cpu_loras",
            )
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ConfigError("must be >= 1", key="num_gpu_blocks_override")
        if self.shutdown_timeout < 0:
            raise ConfigError(f"must be >= 0, got {self.shutdown_timeout}", key="shutdown_timeout")
        if self.time_scale <= 0:
            raise ConfigError(f"must be > 0, got {self.time_scale}", key="time_scale")
        if self.mean_output_tokens <= 0:
            raise ConfigError("must be > 0", key="mean_output_tokens")
        if self.lora_modules and not self.enable_lora:
            raise ConfigError("--lora-modules needs --enable-lora", key="lora_modules")
        if not self.model:
            raise ConfigError("must not be empty", key="model")

    @property
    def base_model_name(self) -> str:
        """The name clients use for the base model (``--served-model-name`` or ``--model``)."""
        return self.served_model_name or self.model

    @property
    def prompt_format(self) -> PromptFormat:
        """What the served model's tokenizer and chat template add around a prompt's text."""
        return PromptFormat(add_bos=self.add_bos)

    @property
    def effective_max_cpu_loras(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    @property
    def kv_capacity_tokens(self) -> int | None:
        """Explicit KV capacity, or None to let the profile's memory model decide."""
        if self.num_gpu_blocks_override is None:
            return None
        return self.num_gpu_blocks_override * self.block_size
