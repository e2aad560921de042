"""Fixtures for the simulated-replica tests: adapter folders built in a temp dir."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica

MakeAdapterDir = Callable[..., str]


def make_adapter_dir(
    root: Path, name: str, rank: int = 8, *, base_model_name_or_path: str | None = None
) -> str:
    """Create ``root/name`` as a minimal LoRA adapter folder and return its path."""
    return write_adapter_folder(
        str(root / name), rank=rank, base_model_name_or_path=base_model_name_or_path
    )


@pytest.fixture
def adapter_dir(tmp_path: Path) -> MakeAdapterDir:
    """``adapter_dir(name, rank=8, base_model_name_or_path=None) -> path`` under tmp_path."""

    def make(name: str, rank: int = 8, *, base_model_name_or_path: str | None = None) -> str:
        return make_adapter_dir(
            tmp_path / "loras", name, rank, base_model_name_or_path=base_model_name_or_path
        )

    return make


BASE_MODEL = "tiny-llama"
MODEL_PATH = "/models/tiny-llama"


def replica_config(**overrides: Any) -> ReplicaConfig:
    """A fast replica like the recorded one (tiny-llama, max_model_len 512, LoRA on)."""
    settings: dict[str, Any] = {
        "model": MODEL_PATH,
        "served_model_name": BASE_MODEL,
        "enable_lora": True,
        "max_loras": 2,
        "max_cpu_loras": 4,
        "max_lora_rank": 16,
        "max_num_seqs": 16,
        "max_model_len": 512,
        "profile": "fast",
        "time_scale": 10.0,
        "seed": 0,
    }
    settings.update(overrides)
    return ReplicaConfig(**settings)


StartReplica = Callable[..., AbstractAsyncContextManager[RunningReplica]]


@pytest.fixture
def start_replica() -> StartReplica:
    """``async with start_replica(**config_overrides) as replica:`` on 127.0.0.1, free port."""

    def start(**overrides: Any) -> AbstractAsyncContextManager[RunningReplica]:
        return run_replica(replica_config(**overrides), host="127.0.0.1", port=0)

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
