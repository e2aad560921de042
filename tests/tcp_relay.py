"""A TCP relay on loopback, for tests that cut a connection or count its requests (no mocks).

``relay_to(port)`` forwards each connection to ``port``; ``cut()`` closes them all and refuses
new ones, ``restore()`` listens again on the same port. ``requests`` counts what clients sent
after the server's last answer on that connection: the round trips of a request-reply protocol
such as Redis's (a pipelined batch is one, or a few if the server starts answering before the
rest of it has arrived).

``hold()`` delays what the clients of the connections open at that moment send next (a
segment delayed on its way: a retransmission), until the event it returns is set; then it is
forwarded in order, even if the client closed meanwhile (its bytes were on the wire), and
``forwarded_held`` counts such pieces. Connections opened later are not held.
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
        self._gates: dict[asyncio.StreamWriter, asyncio.Event] = {}  # by client connection
        self._open: set[asyncio.StreamWriter] = set()  # the client connections open now
        self.held = 0  # pieces waiting for a hold's end now
        self.forwarded_held = 0  # pieces forwarded after a hold

    def hold(self) -> asyncio.Event:
        """Hold what the clients of the connections open now send next; set the event to
        forward it (see the module docstring)."""
        gate = asyncio.Event()
        for writer in self._open:
            self._gates[writer] = gate
        return gate

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
        self._open.add(writer)
        answered = True  # the server has answered all the client sent so far
        held = False  # some of what this client sent was held

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            nonlocal answered, held
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if up and answered:
                        self.requests += 1
                    answered = not up
                    gate = self._gates.get(writer) if up else None
                    was_held = gate is not None and not gate.is_set()
                    if gate is not None and was_held:
                        held = True
                        self.held += 1
                        try:
                            await gate.wait()
                        finally:
                            self.held -= 1
                    dst.write(data)
                    await dst.drain()
                    if was_held:
                        self.forwarded_held += 1
                if up and held:  # the client closed after bytes that were on the wire
                    dst.write_eof()
                    return
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        up_writer.transport.abort()  # (closed already unless held: then the server closed)
        self._writers -= {writer, up_writer}
        self._open.discard(writer)
        self._gates.pop(writer, None)


@contextlib.asynccontextmanager
async def relay_to(port: int) -> AsyncIterator[Relay]:
    relay = Relay(port)
    await relay.restore()
    try:
        yield relay
    finally:
        if relay._server is not None:
            await relay.cut()
