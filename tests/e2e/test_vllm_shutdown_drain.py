"""Real vLLM 0.32 started with ``--shutdown-timeout 10`` and SIGTERMed with requests in flight,
and the simulated replica with the same ``shutdown_timeout`` leaving ``run_replica``: while
they drain, both answer ``/health`` and ``/v1/models`` 200, a new completion or chat vLLM's 500
"cannot schedule new futures after shutdown", a load its 500 "Server shutting down", an unload
200. Status and body compared exactly.

This test starts (and stops) a vLLM server of its own: run it alone, not beside the session's
(``LORAGATE_VLLM_DIR=... pytest -m vllm tests/e2e/test_vllm_shutdown_drain.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from vllm_e2e import BASE, REAL_CONFIG

from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica
from vllm_cpu.replica import start_replica

pytestmark = pytest.mark.vllm

LONG = {"model": BASE, "prompt": "hi", "max_tokens": 480, "ignore_eos": True}
SERVER = dataclasses.replace(REAL_CONFIG, extra_args=("--shutdown-timeout", "10"))
_RUNNING = re.compile(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)$", re.MULTILINE)


async def _answer(http: aiohttp.ClientSession, method: str, url: str, body: Any) -> Any:
    async with http.request(method, url, json=body) as resp:
        text = await resp.text()
        if url.endswith("/v1/models") and resp.status == 200:
            return resp.status, [m["id"] for m in (await resp.json())["data"]]
        return resp.status, text


async def _fresh(method: str, url: str, body: Any) -> Any:
    """On a connection of its own: vLLM closes the one its 500 "cannot schedule new futures
    after shutdown" went out on (an exception its handlers do not catch), and the next request
    on it, kept alive, is reset."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as own:
        return await _answer(own, method, url, body)


async def _drain_answers(
    http: aiohttp.ClientSession,
    base: str,
    adapter: str,
    sigterm: Callable[[], Awaitable[None]],
) -> list[Any]:
    """Load ``a``, put 24 long requests in flight, SIGTERM, then the probes' answers."""
    load = {"lora_name": "a", "lora_path": adapter}
    assert (await _answer(http, "POST", base + "/v1/load_lora_adapter", load))[0] == 200
    flying = [
        asyncio.create_task(_answer(http, "POST", base + "/v1/completions", LONG))
        for _ in range(24)
    ]
    try:
        for _ in range(600):  # bounded: 60 s
            async with http.get(base + "/metrics") as resp:
                if sum(float(v) for v in _RUNNING.findall(await resp.text())) >= 16:
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the requests did not run")
        await sigterm()
        chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        probes = [
            ("GET", "/health", None),
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", {"model": BASE, "prompt": "new", "max_tokens": 3}),
            ("POST", "/v1/chat/completions", chat),
            ("POST", "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": adapter}),
            ("POST", "/v1/unload_lora_adapter", {"lora_name": "a"}),
        ]
        return [await _fresh(m, base + path, body) for m, path, body in probes]
    finally:
        for task in flying:
            task.cancel()
        await asyncio.gather(*flying, return_exceptions=True)


async def test_a_drain_answers_as_vllm_does(
    vllm_work_dir: Path, http: aiohttp.ClientSession, lora_paths: dict[int, list[str]]
) -> None:
    adapter = lora_paths[8][0]
    c = REAL_CONFIG
    cfg = ReplicaConfig(
        model=str(vllm_work_dir / "models" / BASE), served_model_name=BASE, enable_lora=True,
        max_loras=c.max_loras, max_cpu_loras=c.max_cpu_loras, max_lora_rank=c.max_lora_rank,
        max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len, profile="fast",
        shutdown_timeout=10.0,
    )  # fmt: skip
    ctx = run_replica(cfg, host="127.0.0.1", port=0)
    twin = await ctx.__aenter__()
    stopping: list[asyncio.Task[Any]] = []

    async def leave() -> None:
        stopping.append(asyncio.create_task(ctx.__aexit__(None, None, None)))
        for _ in range(1000):
            if twin.state.phase == "draining":
                return
            await asyncio.sleep(0.01)

    try:
        sim = await _drain_answers(http, twin.url, adapter, leave)
        assert twin.state.phase == "draining", "the twin's drain ended before the probes"
    finally:
        if stopping:
            await stopping[0]
        else:
            await ctx.__aexit__(None, None, None)

    rep = await asyncio.to_thread(
        start_replica, SERVER, work_dir=vllm_work_dir, log_name="e2e-shutdown-drain.log"
    )
    try:

        async def sigterm() -> None:
            os.kill(rep.proc.pid, signal.SIGTERM)
            await asyncio.sleep(0.2)  # (vLLM's signal handler starts the drain)

        real = await _drain_answers(http, rep.base_url, adapter, sigterm)
    finally:
        await asyncio.to_thread(rep.stop)
    assert "[shutdown] EngineCore: draining in-flight requests" in rep.log_text()
    assert real == sim
    assert real[0] == (200, "") and real[2][0] == 500
