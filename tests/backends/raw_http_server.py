"""Helpers of the raw-socket upstream servers in the upstream client tests."""

from __future__ import annotations

import asyncio


async def read_request_body(reader: asyncio.StreamReader) -> bytes:
    """Read one HTTP/1.1 request (its head, then a Content-Length body); return the body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length)
