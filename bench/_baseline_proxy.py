"""The naive floor for ``bench/gateway_overhead.py``: a plain aiohttp + uvloop pass-through proxy.

``python bench/_baseline_proxy.py --upstream http://127.0.0.1:P0 --upstream ...`` listens on an
ephemeral port of 127.0.0.1 and prints ``PORTS p`` once ready. What a careful but ordinary
aiohttp proxy does, and nothing more: no auth, no parsing, no routing (upstreams are cycled),
no metrics. Per request: ``await request.read()``, ``session.post(...)`` on one pooled
keep-alive ``ClientSession`` (no cookie jar, no decompression), then ``await resp.read()``
into a ``web.Response``, or, for an ``text/event-stream`` answer, ``iter_any()`` chunks into a
``web.StreamResponse``. Access log off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys

import aiohttp
from aiohttp import web

from _instant_upstream import wait_for_stop


async def serve(upstreams: list[str], *, watch_stdin: bool) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1024, limit_per_host=0),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    bases = itertools.cycle(upstreams)
    json_headers = {"Content-Type": "application/json"}

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with session.post(
            next(bases) + request.path, data=body, headers=json_headers
        ) as resp:
            ctype = resp.headers.get("Content-Type", "application/json")
            if ctype.startswith("text/event-stream"):
                out = web.StreamResponse(status=resp.status, headers={"Content-Type": ctype})
                await out.prepare(request)
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
            data = await resp.read()
            return web.Response(body=data, status=resp.status, headers={"Content-Type": ctype})

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(f"PORTS {runner.addresses[0][1]}", flush=True)
    try:
        await wait_for_stop(watch_stdin)
    finally:
        await runner.cleanup()
        await session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", action="append", required=True, help="upstream base URL")
    parser.add_argument("--watch-stdin", action="store_true", help="stop when stdin closes")
    args = parser.parse_args()
    import uvloop

    with (
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        contextlib.suppress(KeyboardInterrupt),
    ):
        runner.run(serve([u.rstrip("/") for u in args.upstream], watch_stdin=args.watch_stdin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
