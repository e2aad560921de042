"""When a chat stream's first chunk leaves: real vLLM 0.32 and the simulated replica side by side.

vLLM 0.32 sends the response head at once but the role chunk only with the request's first
output (``chat_completion/serving.py``, ``first_iteration``). Measured on 2026-11-28 (real
vLLM, tiny-llama, ``max_loras`` 2): a chat on a third adapter, deferred behind two 480-token
completions on two others, got its head after 11 ms and its role chunk after 4.03 s, with its
first token, as the two completions ended (4.02 s); the twin sent the role chunk after 3 ms.

No clock is read: each server's ``/metrics`` says the chat waits while only its head has come,
and waits no more once its first data line has.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest
from vllm_e2e import BASE, REAL_CONFIG

from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica
from vllm_cpu.replica import Replica

pytestmark = pytest.mark.vllm


async def _gauge(http: aiohttp.ClientSession, base: str, name: str) -> float:
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    match = re.search(rf"^vllm:{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"no vllm:{name}"
    return float(match.group(1))


async def _waiting(http: aiohttp.ClientSession, base: str) -> float:
    return await _gauge(http, base, "num_requests_waiting")


async def _observe(
    http: aiohttp.ClientSession, base: str, names: list[str], paths: list[str]
) -> dict[str, Any]:
    """A chat on ``names[2]`` behind long completions on ``names[0]`` and ``names[1]``
    (``max_loras`` 2: it is deferred until one of them ends)."""
    for name, path in zip(names, paths, strict=True):
        async with http.post(
            base + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
        ) as r:
            assert r.status == 200, await r.text()

    async def blocker(name: str) -> None:
        body = {"model": name, "prompt": "hi", "max_tokens": 480, "ignore_eos": True}
        async with http.post(base + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()

    blockers = [asyncio.create_task(blocker(n)) for n in names[:2]]
    for _ in range(500):  # both run before the chat comes (bounded polling)
        if await _gauge(http, base, "num_requests_running") >= 2:
            break
        await asyncio.sleep(0.01)
    chat = {"model": names[2], "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3, "ignore_eos": True, "stream": True}  # fmt: skip
    seen: dict[str, Any] = {}
    try:
        async with http.post(base + "/v1/chat/completions", json=chat) as resp:
            seen["status"] = resp.status
            for _ in range(500):  # the chat is queued (bounded polling, no time measured)
                if await _waiting(http, base) >= 1:
                    break
                await asyncio.sleep(0.01)
            received = resp.content.total_bytes  # then: was it still waiting?
            seen["queued with its head alone"] = await _waiting(http, base) >= 1 and not received
            first = await resp.content.readuntil(b"\n\n")
            seen["waiting after the first data line"] = await _waiting(http, base)
            rest = await resp.read()
    finally:
        await asyncio.gather(*blockers)
    events = [e.removeprefix(b"data: ") for e in (first + rest).strip().split(b"\n\n")]
    chunks = [json.loads(e) for e in events[:-1]]
    seen["deltas"] = [list(c["choices"][0]["delta"]) for c in chunks]
    seen["last"] = events[-1]
    return seen


async def test_a_deferred_chat_stream_gets_its_role_chunk_with_its_first_token(
    real_vllm: Replica,
    http: aiohttp.ClientSession,
    lora_paths: dict[int, list[str]],
    unique_name: str,
) -> None:
    c = REAL_CONFIG
    twin_cfg = ReplicaConfig(
        model=str(real_vllm.model_dir), served_model_name=BASE, enable_lora=True,
        max_loras=c.max_loras, max_cpu_loras=c.max_cpu_loras, max_lora_rank=c.max_lora_rank,
        max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len, profile="tiny-llama-cpu",
    )  # fmt: skip
    names = [f"{unique_name}-{i}" for i in range(3)]
    paths = [lora_paths[8][0], lora_paths[16][0], lora_paths[8][1]]
    real = await _observe(http, real_vllm.base_url, names, paths)
    async with run_replica(twin_cfg, host="127.0.0.1", port=0) as twin:
        sim = await _observe(http, twin.url, names, paths)
    expected = {
        "status": 200,
        "queued with its head alone": True,
        "waiting after the first data line": 0.0,
        "deltas": [["role", "content"], ["content"], ["content"], ["content"]],
        "last": b"[DONE]",
    }
    assert real == expected
    assert sim == expected
