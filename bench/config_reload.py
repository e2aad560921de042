"""What reading a big gateway config costs a running gateway: ``loragate serve`` with
``--adapters`` adapters and as many tenants (one API key each), then ``POST /admin/reload`` of
the same file ``--reloads`` times while ``/livez`` is asked every 20 ms. Reports, per reload,
how long the reload took to answer and the slowest ``/livez`` answer meanwhile (how long the
gateway's event loop was held), and the start-up time (spawn to "listening").

Run::

    .venv/bin/python bench/config_reload.py --adapters 1200
    .venv/bin/python bench/config_reload.py --adapters 1200 --src /tmp/old/src   # another tree

Set-up (127.0.0.1, ephemeral ports, every child stopped at the end): one instant upstream
(``bench/_instant_upstream.py``) as the only replica, ``loragate serve`` of ``--src`` (default
this checkout's). Wall-clock numbers: they scale with the host's load; compare trees in one
session, alternating.

Results (1,200 adapters + 1,200 tenants, 3 reloads each, 2-core host shared with other jobs,
load average 11-12; runs alternated, two per tree; 83ff796 = before: the file read on the
event loop by the pure-Python YAML reader; after: libyaml, in a worker thread)::

    tree      start-up (s)   reload answered (s)   slowest /livez during a reload (ms)
    83ff796   6.39, 5.63     2.28 - 3.64           2,269 - 3,626 (= the whole reload)
    after     4.17, 4.43     0.95 - 1.40             225 -   346
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from _child_process import child, drain, line_matching

HERE = Path(__file__).resolve().parent
TOKEN = "bench-admin"


def _config(port: int, n: int) -> dict[str, object]:
    return {
        "base_model": "bench-model",
        "replicas": [{"id": "r0", "url": f"http://127.0.0.1:{port}"}],
        "adapters": [
            {"name": f"cust-{i:04}", "path": f"/loras/cust-{i:04}", "rank": 8, "tenants": [t]}
            for i, t in enumerate(f"t{i:04}" for i in range(n))
        ],
        "tenants": [{"name": f"t{i:04}", "api_keys": [f"sk-{i:04}"]} for i in range(n)],
        "poller": {"interval_s": 3600},
        "admin": {"token": TOKEN},
    }


async def _probe(http: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> tuple[float, int]:
    """Ask ``/livez`` every 20 ms until ``stop`` (the request under way finishes): the slowest
    answer and how many."""
    worst, count = 0.0, 0
    while not stop.is_set():
        start = time.perf_counter()
        async with http.get(url + "/livez") as resp:
            await resp.read()
        worst, count = max(worst, time.perf_counter() - start), count + 1
        await asyncio.sleep(0.02)
    return worst, count


async def _measure(src: str, n: int, reloads: int) -> None:
    env = dict(os.environ, PYTHONPATH=src)
    upstream = [sys.executable, str(HERE / "_instant_upstream.py"), "--replicas", "1"]
    async with child(upstream, env) as up:
        port = int(
            (await line_matching(up.stdout, r"PORTS (\d+)", lines=500, line_timeout_s=300)).group(1)
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "gw.yaml"
            path.write_text(yaml.safe_dump(_config(port, n), sort_keys=False))
            serve = [sys.executable, "-m", "loragate.cli", "serve", "--config", str(path),
                     "--host", "127.0.0.1", "--port", "0"]  # fmt: skip
            started = time.perf_counter()
            async with child(serve, env) as gw:
                url = (
                    await line_matching(
                        gw.stderr, r"listening on (http://\S+)", lines=500, line_timeout_s=300
                    )
                ).group(1)
                print(f"  start-up {time.perf_counter() - started:.2f} s")
                reader = asyncio.create_task(drain(gw.stderr))
                async with aiohttp.ClientSession() as http:
                    for i in range(reloads):
                        stop = asyncio.Event()
                        probe = asyncio.create_task(_probe(http, url, stop))
                        await asyncio.sleep(0.2)
                        start = time.perf_counter()
                        auth = {"Authorization": f"Bearer {TOKEN}"}
                        async with http.post(url + "/admin/reload", headers=auth) as resp:
                            await resp.read()
                            status = resp.status
                        took = time.perf_counter() - start
                        stop.set()
                        worst, count = await probe
                        print(f"  reload {i + 1}: {status} in {took:.2f} s, slowest /livez "
                              f"meanwhile {worst * 1000:.0f} ms ({count} probes)")  # fmt: skip
                reader.cancel()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=1200)
    p.add_argument("--reloads", type=int, default=3)
    p.add_argument("--src", default=str(HERE.parent / "src"), help="the loragate src/ to run")
    args = p.parse_args()
    print(f"{args.adapters} adapters + {args.adapters} tenants, src {args.src}, load "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    await _measure(args.src, args.adapters, args.reloads)


if __name__ == "__main__":
    asyncio.run(main())
