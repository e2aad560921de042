"""Every Redis await is bounded even if the awaited code swallows cancellation."""

from __future__ import annotations

import asyncio

import pytest

from loragate.state.redis_store import bounded


async def _swallows_cancellation(release: asyncio.Event) -> str:
    while True:
        try:
            await release.wait()
            return "late"
        except asyncio.CancelledError:  # the misbehaviour: cancellation is ignored
            continue


async def test_times_out_although_the_call_ignores_cancellation() -> None:
    # With a plain asyncio.timeout around the call this test hangs (the ignored cancel) and
    # pytest-timeout fails it.
    release = asyncio.Event()
    with pytest.raises(TimeoutError):
        await bounded(_swallows_cancellation(release), 0.05)
    release.set()  # let the abandoned task finish so the loop closes cleanly
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_returns_the_result_and_raises_the_error() -> None:
    async def ok() -> int:
        return 7

    async def fails() -> None:
        raise OSError("reset")

    assert await bounded(ok(), 1.0) == 7
    with pytest.raises(OSError, match="reset"):
        await bounded(fails(), 1.0)
