"""State store hot-path cost: Redis round trips and latency per routed request.

Starts its own redis-server on a free 127.0.0.1 port (or uses ``--url``) and measures:
* client commands (= round trips: no pipelining on the hot path) Redis receives per routed
  request (begin + end), counted with MONITOR (commands run inside Lua scripts excluded);
* latency of begin_request + end_request (RedisStore), of RedisStore.snapshot() and of
  ResilientStore.view() (what the gateway calls per request), and of MemoryStore.

    .venv/bin/python bench/state_roundtrips.py [--requests 2000] [--replicas 16]
                                               [--op-timeout-s 10]

Each store call is bounded by ``--op-timeout-s`` (default 10 s: the bench measures latency, it
does not fail over; the gateway's ``state.op_timeout_s`` of 0.5 s timed out under load on a busy
machine, a traceback). A store error or timeout is one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.utils import HIREDIS_AVAILABLE

from _redis_server import redis_url_problem, start_redis, watch_client_commands
from loragate.core.types import ReplicaSettings
from loragate.state import (
    KeySpace,
    MemoryStore,
    RedisStore,
    ReplicaRecord,
    ResilientStore,
    StateUnavailableError,
)


def _us(samples: list[float]) -> str:
    s = sorted(samples)
    p50 = statistics.median(s) * 1e6
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6
    return f"p50 {p50:8.1f} µs   p99 {p99:8.1f} µs"


async def _timed(n: int, fn: Callable[[int], Awaitable[object]]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await fn(i)
        out.append(time.perf_counter() - t0)
    return out


async def _count_round_trips(url: str, n: int, one: Callable[[int], Awaitable[object]]) -> float:
    """Client-issued commands per call of ``one``, seen by MONITOR between two markers."""
    mon_client = aioredis.Redis.from_url(url, decode_responses=True)
    marker = aioredis.Redis.from_url(url, decode_responses=True)
    seen: list[str] = []
    started = asyncio.Event()
    task = asyncio.create_task(watch_client_commands(mon_client, seen, started))
    await started.wait()
    await marker.echo("bench-start")
    for i in range(n):
        await one(i)
    await marker.echo("bench-end")
    await asyncio.wait_for(task, timeout=30)
    await mon_client.aclose()
    await marker.aclose()
    begin = seen.index("ECHO bench-start")
    return (len(seen) - begin - 2) / n


async def main(args: argparse.Namespace) -> None:
    proc, url = (None, args.url) if args.url else start_redis()
    try:
        store = RedisStore.from_url(
            url, keys=KeySpace(prefix="bench:"), op_timeout_s=args.op_timeout_s
        )
        settings = ReplicaSettings(max_loras=8, max_cpu_loras=32)
        replicas = [f"r{i}" for i in range(args.replicas)]
        for r in replicas:
            await store.upsert_replica(ReplicaRecord(replica_id=r, url=r, settings=settings))
        rng = random.Random(0)
        plan = [
            (rng.choice(replicas), f"lora-{rng.randrange(args.adapters)}")
            for _ in range(args.requests)
        ]

        async def one(i: int) -> None:
            r, a = plan[i]
            await store.begin_request(r, a, f"q{i}", time.time())
            await store.end_request(r, f"q{i}")

        await one(0)  # load scripts
        counted = min(200, args.requests)
        per_request = await _count_round_trips(url, counted, one)
        print(f"hiredis parser: {HIREDIS_AVAILABLE}")
        print(f"client commands per routed request (begin+end): {per_request:.2f}")
        lat = await _timed(args.requests, one)
        print(f"RedisStore begin+end            {_us(lat)}")
        snap = await _timed(200, lambda i: store.snapshot())
        print(f"RedisStore.snapshot ({args.replicas} replicas) {_us(snap)}")

        resilient = ResilientStore(
            RedisStore.from_url(url, keys=KeySpace(prefix="bench:"), op_timeout_s=args.op_timeout_s)
        )
        await resilient.start()
        view_lat = []
        for _ in range(2000):
            t0 = time.perf_counter()
            resilient.view()
            view_lat.append(time.perf_counter() - t0)
        print(f"ResilientStore.view()           {_us(view_lat)}")

        mem = MemoryStore()
        for r in replicas:
            await mem.upsert_replica(ReplicaRecord(replica_id=r, url=r, settings=settings))

        async def mem_one(i: int) -> None:
            r, a = plan[i]
            await mem.begin_request(r, a, f"q{i}", 0.0)
            await mem.end_request(r, f"q{i}")

        print(f"MemoryStore begin+end           {_us(await _timed(args.requests, mem_one))}")
        await resilient.close()
        await store.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="existing Redis (default: start one)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--replicas", type=int, default=16)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument(
        "--op-timeout-s",
        type=float,
        default=10.0,
        help="bound of each store call (default 10 s; the gateway's state.op_timeout_s is 0.5)",
    )
    args = p.parse_args()
    if not args.op_timeout_s > 0:
        p.error(f"--op-timeout-s must be > 0 (got {args.op_timeout_s})")
    for flag in [k for k in ("requests", "replicas", "adapters") if k in vars(args)]:
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    problem = redis_url_problem(args.url) if args.url else None
    if problem:
        p.error(problem)
    try:
        asyncio.run(main(args))
    except StateUnavailableError as exc:  # Redis gone, refusing, or slower than --op-timeout-s
        print(
            f"state_roundtrips.py: error: the state store failed: {exc} (--op-timeout-s "
            f"{args.op_timeout_s:g})",
            file=sys.stderr,
        )
        sys.exit(1)
