"""Fixtures that start REAL vLLM (CPU build) replicas for the ``vllm``-marked end-to-end tests.

The environment (venv + tiny model + adapters, ~2.5 GB, ~2 min) is built outside the repo by
``scripts/vllm_cpu_env.sh`` into ``$LORAGATE_VLLM_DIR`` (default ``/tmp/loragate-vllm``);
``make test-vllm`` builds it and runs ``pytest -m vllm tests/e2e``. Without it every test here
is skipped with the reason. One replica is shared by the whole session (start-up ~30-60 s):
tests use their own adapter names (``unique_name``) so they do not see each other's state.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from vllm_e2e import REAL_CONFIG

from vllm_cpu.replica import (
    Replica,
    adapter_dirs,
    env_problem,
    start_replica,
    work_dir_from_env,
)


@pytest.fixture(scope="session")
def vllm_work_dir() -> Path:
    wd = work_dir_from_env()
    problem = env_problem(wd)
    if problem:
        pytest.skip(problem)
    return wd


@pytest.fixture(scope="session")
def real_vllm(vllm_work_dir: Path) -> Iterator[Replica]:
    """One real vLLM replica (tiny-llama, LoRA on, max_loras 2, max_cpu_loras 4)."""
    rep = start_replica(REAL_CONFIG, work_dir=vllm_work_dir, log_name="e2e-replica.log")
    try:
        yield rep
    finally:
        rep.stop()


@pytest.fixture(scope="session")
def lora_paths(vllm_work_dir: Path) -> dict[int, list[str]]:
    """Adapter folders of the env by rank: {8: [...], 16: [...]}."""
    return {rank: [str(p) for p in paths] for rank, paths in adapter_dirs(vllm_work_dir).items()}


@pytest.fixture
def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session
