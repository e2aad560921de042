"""A simulated replica draining as vLLM 0.32 does under ``--shutdown-timeout N`` (measured:
after SIGTERM it keeps listening, ``/health`` answers 200, the requests in flight go on, a new
completion gets a 500 "cannot schedule new futures after shutdown")."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from gateway_harness import BASE

from loragate.commands.replica import READY_PREFIX

DRAIN_500 = "cannot schedule new futures after shutdown"


@contextlib.asynccontextmanager
async def draining_replica(http: aiohttp.ClientSession) -> AsyncIterator[str]:
    """``loragate replica --shutdown-timeout 3600``, SIGTERMed while a long request runs
    there: its URL once it refuses a new request with vLLM's drain 500 (killed at the end)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loragate.cli", "replica", "--port", "0", "--profile", "fast",
        "--served-model-name", BASE, "--enable-lora", "--time-scale", "0.05",
        "--shutdown-timeout", "3600",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    long: asyncio.Task[Any] | None = None
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode()
        assert line.startswith(READY_PREFIX), line
        url = line.rsplit(" ", 1)[-1].strip()
        body = {"model": BASE, "prompt": "long", "max_tokens": 2000, "ignore_eos": True}
        long = asyncio.create_task(http.post(url + "/v1/completions", json=body))
        for _ in range(1000):  # until it runs (bounded)
            async with http.get(url + "/metrics") as resp:
                if re.search(r"^vllm:num_requests_running\{[^}]*\} 1\.0$", await resp.text(), re.M):
                    break
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        new = {"model": BASE, "prompt": "new", "max_tokens": 1}
        for _ in range(1000):  # until the signal is handled (bounded)
            async with http.post(url + "/v1/completions", json=new) as resp:
                if resp.status != 200:
                    assert resp.status == 500 and DRAIN_500 in await resp.text()
                    break
            await asyncio.sleep(0.01)
        yield url
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if long is not None:
            long.cancel()
            with contextlib.suppress(BaseException):
                (await long).close()
