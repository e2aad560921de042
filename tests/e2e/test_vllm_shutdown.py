"""Real vLLM 0.32 stopped with requests in flight, and the simulated replica stopped alike.

vLLM 0.32 on SIGTERM with its default ``--shutdown-timeout 0`` aborts every unfinished request
(``EngineCore._handle_shutdown``, logged ``aborting in-flight requests count=N``): a
non-streaming request gets a 200 with the text so far and ``finish_reason: "abort"``; a stream
ends with a chunk of the text not sent yet (the twin's: none) and ``finish_reason: "abort"``,
the usage chunk if asked, and ``[DONE]``. The simulated replica, stopped (leaving
``run_replica``), must answer the same.
That is when EngineCore's abort outputs reach the API server before it closes its engine
client: with ``--shutdown-timeout 0`` the process manager kills EngineCore at once, and when
they do not, the requests get no answer and hang until the server is killed (then this test
checks the simulated replica and skips the comparison, saying so).

This test starts (and stops) a vLLM server of its own: run it alone, not beside the session's
(``LORAGATE_VLLM_DIR=... pytest -m vllm tests/e2e/test_vllm_shutdown.py``), as only one vLLM
fits this machine at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
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

PLAIN = {"model": BASE, "prompt": "hi", "n": 2, "max_tokens": 480, "ignore_eos": True}
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 480,
        "ignore_eos": True}  # fmt: skip
STREAM = {"model": BASE, "prompt": "hi", "max_tokens": 480, "ignore_eos": True, "stream": True,
          "stream_options": {"include_usage": True}}  # fmt: skip
SERVER = dataclasses.replace(REAL_CONFIG, enable_lora=False)  # (no adapter is used)
_RUNNING = re.compile(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)$", re.MULTILINE)


class NotAnsweredError(Exception):
    """A request in flight answered other than 200 (real vLLM: its engine-dead 500)."""


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with http.post(url, json=body) as resp:
        if resp.status != 200:
            raise NotAnsweredError(f"{resp.status} {await resp.text()}")
        return await resp.json()


async def _scenario(
    http: aiohttp.ClientSession,
    base: str,
    running: Callable[[], Awaitable[int]],
    stop: Callable[[], Awaitable[None]],
) -> tuple[Any, Any, list[Any]]:
    """A completion (n=2), a chat and a stream in flight, then ``stop``: their answers."""
    plain = asyncio.create_task(_post(http, base + "/v1/completions", PLAIN))
    chat = asyncio.create_task(_post(http, base + "/v1/chat/completions", CHAT))
    try:
        async with http.post(base + "/v1/completions", json=STREAM) as resp:
            assert resp.status == 200
            first = await resp.content.readuntil(b"\n\n")
            for _ in range(600):  # every request running (bounded: 60 s)
                if await running() >= 4:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the requests did not all run")
            # Two more of the stream's tokens: two decode steps of the batch all four are in.
            first += await resp.content.readuntil(b"\n\n")
            first += await resp.content.readuntil(b"\n\n")
            await stop()
            raw = (first + await resp.read()).decode()
    except BaseException:
        await asyncio.gather(plain, chat, return_exceptions=True)
        raise
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]", events[-3:]
    return await plain, await chat, [json.loads(e) for e in events[:-1]]


def _check(name: str, plain: Any, chat: Any, chunks: list[Any]) -> list[str]:
    problems: list[str] = []
    reasons = [c["finish_reason"] for c in plain["choices"]] + [chat["choices"][0]["finish_reason"]]
    if reasons != ["abort"] * 3:
        problems.append(f"{name}: finish reasons {reasons}")
    if not 0 < plain["usage"]["completion_tokens"] < 960 or not plain["choices"][0]["text"]:
        problems.append(f"{name}: completion {plain['usage']} {plain['choices'][0]['text']!r}")
    if (
        not 0 < chat["usage"]["completion_tokens"] < 480
        or not chat["choices"][0]["message"]["content"]
    ):
        problems.append(f"{name}: chat {chat['usage']}")
    abort, usage = chunks[-2], chunks[-1]
    want = {"index": 0, "logprobs": None, "finish_reason": "abort", "stop_reason": None,
            "prompt_token_ids": None, "token_ids": None}  # fmt: skip
    # The abort chunk carries whatever text the engine had not sent yet: real vLLM's often has
    # the last token (measured: '46'), the twin's none, as it sends every token at its step.
    (choice,) = abort["choices"] if len(abort["choices"]) == 1 else (None,)
    text_ok = choice is not None and isinstance(choice.get("text"), str)
    rest = {k: v for k, v in (choice or {}).items() if k != "text"}
    if not text_ok or rest != want or "system_fingerprint" in abort:
        problems.append(f"{name}: the stream's abort chunk {abort}")
    tokens = chunks[:-2]
    if usage["choices"] != [] or usage["usage"]["completion_tokens"] < len(tokens):
        problems.append(f"{name}: the usage chunk {usage} after {len(tokens)} token chunks")
    if any(c["choices"][0]["finish_reason"] is not None for c in tokens):
        problems.append(f"{name}: a token chunk with a finish reason")
    return problems


async def test_stopped_with_requests_in_flight(
    vllm_work_dir: Path, http: aiohttp.ClientSession
) -> None:
    c = REAL_CONFIG
    cfg = ReplicaConfig(
        served_model_name=BASE, max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len,
        profile="fast", time_scale=0.2,
    )  # fmt: skip
    ctx = run_replica(cfg, host="127.0.0.1", port=0)
    twin = await ctx.__aenter__()
    left: list[bool] = []

    async def twin_running() -> int:
        return int(twin.state.engine.num_running)

    async def leave() -> None:  # the replica shutting down
        if not left:
            left.append(True)
            await ctx.__aexit__(None, None, None)

    try:
        problems = _check("twin", *await _scenario(http, twin.url, twin_running, leave))
    finally:
        await leave()
    assert not problems, "\n".join(problems)

    rep = await asyncio.to_thread(
        start_replica, SERVER, work_dir=vllm_work_dir, log_name="e2e-shutdown.log"
    )
    try:

        async def real_running() -> int:
            async with http.get(rep.base_url + "/metrics") as resp:
                text = await resp.text()
            return int(sum(float(v) for v in _RUNNING.findall(text)))

        async def sigterm() -> None:
            await asyncio.to_thread(rep.stop)

        try:
            real = await _scenario(http, rep.base_url, real_running, sigterm)
        except (aiohttp.ClientError, NotAnsweredError) as exc:
            failed: BaseException | None = exc
        else:
            failed = None
    finally:
        await asyncio.to_thread(rep.stop)
    log = rep.log_text()
    # The rendezvous file (vllm_dist_*, tempfile.gettempdir()) is in the run's own TMPDIR,
    # removed with it (bench/vllm_cpu/replica.py).
    assert f"distributed_init_method=file://{rep.tmp_dir}/vllm_dist_" in log
    assert not rep.tmp_dir.exists()
    if failed is not None:
        # vLLM 0.32's process manager SIGTERMs EngineCore and, with --shutdown-timeout 0, kills
        # it at once (v1/utils.py shutdown(): no wait), and the API server closes its engine
        # client right after: unless EngineCore's abort outputs reach the API server first,
        # nothing answers the requests, which hang until the server is killed (here:
        # Replica.stop's SIGKILL, 30 s later). Seen 3 times of 3 on 2026-11-28 (once after
        # "aborting in-flight requests count=4"); the abort answers were seen on 6c0e5b2's run.
        # A third outcome: the API server sees the engine die first and answers a request in
        # flight with its EngineDeadError 500 (seen once in 3 runs at d601859).
        aborted = "aborting in-flight requests" in log
        pytest.skip(
            f"vLLM did not give the requests in flight its abort answers ({failed!r}; EngineCore "
            f"{'aborted them, too late' if aborted else 'was killed before it aborted them'})"
        )
    assert failed is None, failed
    assert "aborting in-flight requests count=4" in log, log[-2000:]
    problems = _check("real", *real)
    assert not problems, "\n".join(problems)
