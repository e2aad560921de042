"""Fixtures: scripted vLLM stand-ins (``vllm_stub.StubVllm``) on loopback sockets, and an HTTP
client session for the pools and clients under test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from vllm_stub import StubVllm, serve_app


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def stub_vllm() -> AsyncIterator[StubVllm]:
    stub = StubVllm()
    runner, stub.url = await serve_app(stub.app)
    try:
        yield stub
    finally:
        await runner.cleanup()


@pytest.fixture
async def stub_pair() -> AsyncIterator[tuple[StubVllm, StubVllm, list[web.AppRunner]]]:
    """Two stubs; the list holds their runners so a test can stop one (a dead replica)."""
    stubs = (StubVllm(), StubVllm())
    runners = []
    for stub in stubs:
        runner, stub.url = await serve_app(stub.app)
        runners.append(runner)
    try:
        yield stubs[0], stubs[1], runners
    finally:
        for runner in runners:
            await runner.cleanup()
