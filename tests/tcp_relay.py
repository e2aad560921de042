"""A TCP relay on loopback, for tests that cut a connection or count its requests (no mocks).

``relay_to(port)`` forwards each connection to ``port``; ``cut()`` closes them all and refuses
new ones, ``restore()`` listens again on the same port. ``requests`` counts what clients sent
after the server's last answer on that connection: the round trips of a request-reply protocol
such as Redis's (a pipelined batch is one, or a few if the server starts answering before the
rest of it has arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Relay:
    """Forwards loopback TCP connections to a port; ``cut()`` closes them all and refuses new
    ones, ``restore()`` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        answered = True  # the server has answered all the client sent so far

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            nonlocal answered
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if up and answered:
                        self.requests += 1
                    answered = not up
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self._writers -= {writer, up_writer}


@contextlib.asynccontextmanager
async def relay_to(port: int) -> AsyncIterator[Relay]:
    relay = Relay(port)
    await relay.restore()
    try:
        yield relay
    finally:
        if relay._server is not None:
            await relay.cut()
