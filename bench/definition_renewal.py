"""What renewing a gateway instance's config-file adapter definitions costs Redis, per round
(``state.lease_renew_s``, 10 s by default), with ``--adapters`` adapters in the file.

Starts its own redis-server (loopback, free port; stopped at the end) and, in a child
process running the loragate of ``--src`` (default this checkout's), one ``RedisStore`` that
claims ``--adapters`` definitions once, then renews them ``--rounds`` times as the gateway
does: ``renew_definitions`` if the tree has it and it succeeds, else the full claim every
round (the trees before it). Redis's SLOWLOG at 0 µs records every command: printed are, for
the renewal rounds, the commands sent, the bytes of their arguments and Redis's execution
time (µs, as SLOWLOG measures it: the time Redis, single-threaded, serves no one else).

    .venv/bin/python bench/definition_renewal.py --adapters 1200
    .venv/bin/python bench/definition_renewal.py --adapters 1200 --src /tmp/old/src

Results (1,200 adapters of paths ``/loras/cust-NNNN``, 20 rounds, runs alternated, 2-core host
shared with other jobs, load ~11; 4656472 = before, then this tree)::

    tree      full claims   per round: commands (scripts' included), bytes, Redis busy
    4656472   20 of 20      3,604 commands, 74,541 bytes, 42.6-61.2 ms (slowest 62-80 ms)
    after      0 of 20      3-4 commands, 101 bytes, 20-27 µs (slowest 58-71 µs)

(A gateway's claim also carries each definition last seen in force, ``known``: the fleet
walk-through's 1,200-adapter claims were 168 KB.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from pathlib import Path

import redis.asyncio as aioredis

from _redis_server import start_redis

HERE = Path(__file__).resolve().parent

CHILD = r"""
import asyncio, sys
from loragate.state.definitions import AdapterDefinition, DefinitionClaim
from loragate.state.keys import KeySpace, Ttls
from loragate.state.redis_store import RedisStore

async def main(url, n, rounds):
    store = RedisStore.from_url(url, keys=KeySpace(prefix="bench:"), instance_id="gw-a",
                                ttls=Ttls())
    claims = [DefinitionClaim(name=f"cust-{i:04}",
                              ours=AdapterDefinition(path=f"/loras/cust-{i:04}", rank=8))
              for i in range(n)]
    await store.claim_definitions(claims)
    print("CLAIMED", flush=True)
    sys.stdin.readline()  # the parent reset the slowlog
    renew = getattr(store, "renew_definitions", None)
    full = 0
    for _ in range(rounds):
        if renew is None or not await renew():
            await store.claim_definitions(claims)
            full += 1
    print("DONE", full, flush=True)
    await store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def _sent_bytes(command: bytes) -> int:
    more = sum(int(n) for n in re.findall(rb"\.\.\. \((\d+) more bytes\)", command))
    return len(command) + more


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=1200)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--src", default=str(HERE.parent / "src"), help="the loragate src/ to run")
    args = p.parse_args()
    server, url = start_redis()
    client = aioredis.Redis.from_url(url)
    try:
        await client.config_set("slowlog-max-len", 100_000)
        child = await asyncio.create_subprocess_exec(
            *[sys.executable, "-c", CHILD, url, str(args.adapters), str(args.rounds)],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=args.src),
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            assert (await child.stdout.readline()).strip() == b"CLAIMED"
            await client.config_set("slowlog-log-slower-than", 0)
            await client.slowlog_reset()
            child.stdin.write(b"\n")
            await child.stdin.drain()
            done = (await child.stdout.readline()).decode().split()
            await client.config_set("slowlog-log-slower-than", 10_000)
            log = await client.slowlog_get(100_000)
        finally:
            child.stdin.close()
            await asyncio.wait_for(child.wait(), 60)
        entries = [e for e in log if not e["command"].upper().startswith((b"CONFIG", b"SLOW"))]
        # (Redis logs the commands a script runs too: the scripts' own lines count once.)
        scripts = [e for e in entries if e["command"].upper().startswith(b"EVALSHA")]
        sent = sum(_sent_bytes(e["command"]) for e in scripts)
        busy = [int(e["duration"]) for e in scripts]
        n = args.rounds
        print(f"{args.adapters} adapters, {n} renewal rounds, src {args.src}")
        print(f"  full claims among them: {done[1]}")
        print(
            f"  per round: {len(scripts) / n:g} script(s), {len(entries) / n:,.0f} commands "
            f"(those the scripts ran included), {sent / n:,.0f} bytes of script arguments"
        )
        print(f"  Redis busy in the scripts per round: {sum(busy) / n:,.0f} µs "
              f"(slowest {max(busy):,} µs)")  # fmt: skip
    finally:
        await client.aclose()
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(main())
