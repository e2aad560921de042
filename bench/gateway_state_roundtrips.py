"""Redis round trips per routed request through the whole gateway (not just the store).

Starts its own redis-server (or uses ``--url``) and one simulated replica (twin, profile
``fast``), runs a gateway with ``state: {backend: redis}`` in-process, sends ``--requests``
sequential completions (rotating adapters), and counts with MONITOR the commands Redis
receives from clients (commands run inside Lua scripts excluded):

* hot path: the ``begin_request`` script (EVALSHA) and the lease release (ZREM), per request;
* background (refresh of the local view, lease renewal, reconcile after each poll), per
  request and per second, over the same window.

It also prints the gateway's request latency p50 with the embedded store vs Redis (same run).

    .venv/bin/python bench/gateway_state_roundtrips.py [--requests 500]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from _redis_server import redis_url_problem, start_redis, watch_client_commands
from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from loragate.state import lua
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica

BASE = "tiny-llama"
N_ADAPTERS = 8


def _sha(script: str) -> str:
    import hashlib

    return hashlib.sha1(script.encode()).hexdigest()


async def _run(url: str, replica_url: str, adapters_dir: Path, n: int) -> dict[str, object]:
    doc = {
        "base_model": BASE,
        "replicas": [{"id": "r0", "url": replica_url}],
        "adapters": [
            {"name": f"lora-{i}", "path": str(adapters_dir / f"lora-{i}")}
            for i in range(N_ADAPTERS)
        ],
        "routing": "least_loaded",
        "poller": {"interval_s": 0.5},
    }
    results: dict[str, object] = {}
    for backend in ("memory", "redis"):
        state = {"backend": "redis", "redis_url": url} if backend == "redis" else {}
        cfg = config_from_mapping({**doc, "state": state})
        async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:

            async def one(i: int) -> float:
                body = {"model": f"lora-{i % N_ADAPTERS}", "prompt": "x", "max_tokens": 1}
                t0 = time.perf_counter()
                async with http.post(gw.url + "/v1/completions", json=body) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                return time.perf_counter() - t0

            for i in range(2 * N_ADAPTERS):  # warm up: load every adapter, register scripts
                await one(i)
            if backend == "memory":
                lat = [await one(i) for i in range(n)]
                results["memory_p50_ms"] = statistics.median(lat) * 1e3
                continue
            plain = [await one(i) for i in range(n)]  # latency without MONITOR's cost
            seen: list[str] = []
            started = asyncio.Event()
            mon = aioredis.Redis.from_url(url, decode_responses=True)
            marker = aioredis.Redis.from_url(url, decode_responses=True)
            task = asyncio.create_task(watch_client_commands(mon, seen, started))
            await started.wait()
            await marker.echo("bench-start")
            t0 = time.perf_counter()
            lat = [await one(i) for i in range(n)]
            await asyncio.sleep(0.3)  # let the last lease releases land
            window_s = time.perf_counter() - t0
            await marker.echo("bench-end")
            await asyncio.wait_for(task, timeout=30)
            await mon.aclose()
            await marker.aclose()
            cmds = seen[seen.index("ECHO bench-start") + 1 : -1]
            begin_sha = _sha(lua.BEGIN)
            kinds = Counter(
                "begin" if c.startswith(f"EVALSHA {begin_sha}")
                else "release" if c.startswith("ZREM ")
                else "background " + c.split(" ", 2)[0] + (
                    " " + c.split(" ", 2)[1][:8] if c.startswith("EVALSHA") else ""
                )
                for c in cmds
            )  # fmt: skip
            hot = kinds["begin"] + kinds["release"]
            background = len(cmds) - hot
            results.update(
                redis_p50_ms=statistics.median(plain) * 1e3,
                redis_monitored_p50_ms=statistics.median(lat) * 1e3,
                hot_per_request=hot / n,
                begin_per_request=kinds["begin"] / n,
                release_per_request=kinds["release"] / n,
                background_per_request=background / n,
                background_per_s=background / window_s,
                kinds=dict(kinds.most_common()),
            )
    return results


async def main(args: argparse.Namespace) -> None:
    proc, url = (None, args.url) if args.url else start_redis()
    tmp = Path(tempfile.mkdtemp(prefix="loragate-bench-"))
    try:
        for i in range(N_ADAPTERS):
            write_adapter_folder(str(tmp / f"lora-{i}"), rank=8)
        cfg = ReplicaConfig(
            served_model_name=BASE, enable_lora=True, max_loras=4, max_cpu_loras=8,
            max_lora_rank=16, profile="fast",
        )  # fmt: skip
        async with run_replica(cfg, port=0) as replica:
            r = await _run(url, replica.url, tmp, args.requests)
        print(f"requests: {args.requests} (sequential, 1 replica, {N_ADAPTERS} adapters)")
        print(f"Redis round trips per routed request (hot path): {r['hot_per_request']:.3f}")
        print(f"  begin_request (EVALSHA): {r['begin_per_request']:.3f}")
        print(f"  end_request (ZREM):      {r['release_per_request']:.3f}")
        print(
            f"background commands: {r['background_per_request']:.3f} per request, "
            f"{r['background_per_s']:.1f} per second"
        )
        print(f"commands by kind: {r['kinds']}")
        print(
            f"request latency p50: memory {r['memory_p50_ms']:.2f} ms, "
            f"redis {r['redis_p50_ms']:.2f} ms (under MONITOR {r['redis_monitored_p50_ms']:.2f} ms)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--url", default=None, help="existing Redis (default: start one)")
    p.add_argument("--requests", type=int, default=500)
    args = p.parse_args()
    for flag in [k for k in ("requests", "replicas", "adapters") if k in vars(args)]:
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    problem = redis_url_problem(args.url) if args.url else None
    if problem:
        p.error(problem)
    asyncio.run(main(args))
