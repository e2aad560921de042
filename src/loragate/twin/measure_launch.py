"""What the calibration sweeps need of a server: the settings a sweep asks for, the server
started with them, and the launcher that starts it.

A sweep varies ``max_loras``, ``max_cpu_loras``, ``max_lora_rank`` and ``max_num_seqs`` (and
needs one server without LoRA), so it asks a :class:`Launcher` for a server per setting. Two
launchers exist: ``loragate twin measure``'s command template
(``measure_template.TemplateLauncher``) and the tiny CPU env of ``bench/calibrate_vllm_cpu.py``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from loragate.core.errors import MeasurementError
from loragate.twin.measure_server import ServerProcess

# The values vLLM 0.32 accepts for --max-lora-rank (config/lora.py ``MaxLoRARanks``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Adapter folders by LoRA rank.
AdapterSet = dict[int, list[Path]]


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds adapters of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise MeasurementError(f"adapter rank {rank} is above vLLM's largest max_lora_rank 512")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The engine settings one sweep needs."""

    enable_lora: bool = True
    max_loras: int = 1
    max_cpu_loras: int = 1
    max_lora_rank: int = 16
    max_num_seqs: int = 32


@dataclass(kw_only=True)
class MeasuredServer:
    """A started server and what the rows record about it (None: not known)."""

    settings: ServerSettings
    process: ServerProcess
    base_model: str
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_bytes: str | None = None

    @property
    def base_url(self) -> str:
        return self.process.base_url

    def stop(self) -> None:
        self.process.stop()


class Launcher(Protocol):
    def start(self, settings: ServerSettings, name: str) -> MeasuredServer:
        """Start a server with ``settings`` (``name``: the sweep, for its log file) and wait
        until it is healthy; raise :class:`MeasurementError` if it does not start."""
        ...


def base_model_card(base_url: str, timeout_s: float = 10.0) -> tuple[str, int | None]:
    """The served base model's name and ``max_model_len`` from ``GET /v1/models`` (the entry
    without a ``parent``; adapters have one)."""
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=timeout_s) as r:
            body = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MeasurementError(f"GET {base_url}/v1/models failed: {exc}") from exc
    cards = body.get("data") if isinstance(body, dict) else None
    for card in cards if isinstance(cards, list) else []:
        if isinstance(card, dict) and not card.get("parent") and isinstance(card.get("id"), str):
            mml = card.get("max_model_len")
            return card["id"], mml if isinstance(mml, int) else None
    raise MeasurementError(f"GET {base_url}/v1/models lists no base model: {body!r:.300}")
