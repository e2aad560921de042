"""How fast adapters can be registered through the admin API (``POST /admin/adapters``, one
adapter per request; each registration also loads the adapter on one replica), and what a
registration naming a tenant the config file lacks answers.

Run::

    .venv/bin/python bench/admin_register_rate.py --adapters 200 --concurrency 4

Set-up (127.0.0.1, ephemeral ports, every child stopped at the end): ``--replicas``
simulated replicas (``loragate replica --enable-lora``, ``--max-loras 8 --max-cpu-loras 64``)
and ``loragate serve`` (embedded state; ``--redis``: on a throwaway redis-server) with one
tenant ``t0000`` and an admin token. Then
``--adapters`` adapter folders (rank 8) are registered, ``--concurrency`` at a time, each
``{"name", "path", "tenants": ["t0000"]}``; reported: registrations per second, latency
p50/p99, status codes. Then one registration naming tenant ``t9999`` (not in the file).

Results: see the commit message that adds this file (wall-clock: they scale with the host).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import yaml

from _child_process import child, drain, line_matching
from _redis_server import start_redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
TOKEN = "bench-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--redis", action="store_true", help="state on a throwaway redis-server")
    p.add_argument(
        "--file-adapters", type=int, default=0, help="adapters the config file defines too"
    )
    p.add_argument("--src", default=str(HERE.parent / "src"), help="the loragate src/ to run")
    args = p.parse_args()
    from loragate.twin.adapters import write_adapter_folder

    env = dict(os.environ, PYTHONPATH=args.src)
    cli = [sys.executable, "-m", "loragate.cli"]
    drains: list[asyncio.Task[None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_adapter_folder(f"{tmp}/cust-{i:04}", rank=8) for i in range(args.adapters)]
        async with contextlib.AsyncExitStack() as stack:
            urls = []
            for _ in range(args.replicas):
                argv = [*cli, "replica", "--port", "0", "--served-model-name", "base",
                        "--enable-lora", "--max-loras", "8", "--max-cpu-loras", "64"]  # fmt: skip
                rep = await stack.enter_async_context(child(argv, env, stdin=None))
                streams = (rep.stdout, rep.stderr)
                url = await asyncio.wait_for(_first_url(streams), 120)
                urls.append(url)
                drains += [asyncio.create_task(drain(s)) for s in streams]
            config = {
                "base_model": "base",
                "replicas": [{"id": f"r{i}", "url": u} for i, u in enumerate(urls)],
                "tenants": [{"name": "t0000", "api_keys": ["sk-t0000"]}],
                "adapters": [
                    {"name": f"file-{i:04}", "path": f"/loras/file-{i:04}", "rank": 8}
                    for i in range(args.file_adapters)
                ],
                "poller": {"interval_s": 1.0},
                "admin": {"token": TOKEN},
            }
            if args.redis:
                server, redis_url = start_redis()
                stack.callback(server.wait, 10)
                stack.callback(server.terminate)
                config["state"] = {"backend": "redis", "redis_url": redis_url}
            path = Path(tmp) / "gw.yaml"
            path.write_text(yaml.safe_dump(config))
            gw = await stack.enter_async_context(child(
                [*cli, "serve", "--config", str(path), "--host", "127.0.0.1", "--port", "0"],
                env, stdin=None))  # fmt: skip
            gw_url = (
                await line_matching(
                    gw.stderr, r"listening on (http://\S+)", lines=500, line_timeout_s=120
                )
            ).group(1)
            drains += [asyncio.create_task(drain(s)) for s in (gw.stdout, gw.stderr)]
            await _register(gw_url, paths, args)
    for task in drains:
        task.cancel()


async def _first_url(streams: tuple[asyncio.StreamReader | None, ...]) -> str:
    """The replica's ready line (stdout) names its URL."""
    return (
        await line_matching(streams[0], r"(http://127\.0\.0\.1:\d+)", lines=500, line_timeout_s=120)
    ).group(1)


async def _register(url: str, paths: list[str], args: argparse.Namespace) -> None:
    lat: list[float] = []
    codes: Counter[int] = Counter()
    todo = iter(enumerate(paths))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def worker() -> None:
            for i, path in todo:
                body = {"name": f"cust-{i:04}", "path": path, "tenants": ["t0000"]}
                start = time.perf_counter()
                async with http.post(url + "/admin/adapters", json=body, headers=AUTH) as resp:
                    await resp.read()
                    codes[resp.status] += 1
                lat.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
        body = {"name": "cust-x", "path": paths[0], "tenants": ["t9999"]}
        async with http.post(url + "/admin/adapters", json=body, headers=AUTH) as resp:
            unknown = (resp.status, await resp.json())
    lat.sort()
    n = len(lat)
    print(f"{n} registrations, {args.concurrency} at a time, {args.replicas} replicas, "
          f"{args.file_adapters} adapters in the file, {'redis' if args.redis else 'embedded'}, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"  {n / wall:.1f} per second ({wall:.1f} s), latency p50 {lat[n // 2] * 1000:.0f} ms, "
          f"p99 {lat[min(n - 1, int(n * 0.99))] * 1000:.0f} ms; status {dict(codes)}")  # fmt: skip
    print(f"  tenant not in the file: {unknown[0]} {unknown[1]}")


if __name__ == "__main__":
    asyncio.run(main())
