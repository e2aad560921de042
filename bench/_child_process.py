"""Child processes for the benches that start `loragate` servers: start and stop one, wait for
a line it prints, read its output to the end (so a full pipe never blocks it)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def child(
    args: list[str], env: dict[str, str], *, stdin: int | None = asyncio.subprocess.PIPE
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``args``; on leaving, SIGTERM it, then SIGKILL after 10 s."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        limit=1 << 24,  # (a log line may name every adapter)
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def line_matching(
    stream: asyncio.StreamReader | None, pattern: str, *, lines: int, line_timeout_s: float
) -> re.Match[str]:
    """The first of the next ``lines`` lines that matches ``pattern``, each awaited at most
    ``line_timeout_s``."""
    assert stream is not None
    for _ in range(lines):
        line = (await asyncio.wait_for(stream.readline(), line_timeout_s)).decode()
        if match := re.search(pattern, line):
            return match
    raise RuntimeError(f"no line matching {pattern!r}")


async def drain(stream: asyncio.StreamReader | None) -> None:
    """Read ``stream`` to its end."""
    assert stream is not None
    while await stream.readline():
        pass
