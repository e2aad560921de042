"""Redis load of idle gateways: commands per second with no traffic at all.

Starts its own redis-server (or uses ``--url``), ``--replicas`` simulated replicas (twin,
profile ``fast``) each with ``--adapters`` adapters registered at start-up (vLLM's
``--lora-modules``), and ``--instances`` gateways in-process on that Redis (``state: {backend:
redis}``, every other setting default: poller every 0.5 s, refresh every 0.25 s). After a
warm-up it resets Redis's statistics (CONFIG RESETSTAT), waits ``--seconds`` with no request,
and prints Redis's INFO commandstats over that window: calls per second of each command (those
run inside Lua scripts included, as Redis counts them) and the microseconds per EVALSHA.

    .venv/bin/python bench/state_idle_cost.py [--instances 2 --replicas 4 --adapters 40
                                               --seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from _redis_server import redis_url_problem, start_redis
from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import LoraModule, ReplicaConfig
from loragate.twin.server import run_replica

BASE = "tiny-llama"


async def _measure(args: argparse.Namespace, url: str, tmp: Path) -> dict[str, dict[str, float]]:
    names = [f"lora-{i}" for i in range(args.adapters)]
    for name in names:
        write_adapter_folder(str(tmp / name), rank=8)
    modules = tuple(LoraModule(name=n, path=str(tmp / n)) for n in names)
    async with contextlib.AsyncExitStack() as stack:
        replicas = []
        for seed in range(args.replicas):
            cfg = ReplicaConfig(
                served_model_name=BASE, enable_lora=True, max_loras=4, max_cpu_loras=8,
                max_lora_rank=16, profile="fast", seed=seed, lora_modules=modules,
            )  # fmt: skip
            replicas.append(await stack.enter_async_context(run_replica(cfg, port=0)))
        doc: dict[str, Any] = {
            "base_model": BASE,
            "replicas": [{"id": f"r{i}", "url": r.url} for i, r in enumerate(replicas)],
            "adapters": [{"name": n, "path": str(tmp / n)} for n in names],
            "routing": "least_loaded",
            "state": {
                "backend": "redis",
                "redis_url": url,
                "key_prefix": f"idle-{uuid.uuid4().hex[:8]}:",
            },
        }
        for _ in range(args.instances):
            await stack.enter_async_context(running_gateway(config_from_mapping(doc), port=0))
        await asyncio.sleep(args.warmup)
        client = aioredis.Redis.from_url(url, decode_responses=True)
        stack.push_async_callback(client.aclose)
        await client.config_resetstat()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(args.seconds)
        stats: dict[str, dict[str, float]] = await client.info("commandstats")
        window_s = loop.time() - t0
    out: dict[str, dict[str, float]] = {}
    for key, row in stats.items():
        name = key.removeprefix("cmdstat_")
        if name in ("config", "info"):
            continue  # ours
        out[name] = {"per_s": float(row["calls"]) / window_s, "usec_per_call": row["usec_per_call"]}
    return out


async def main(args: argparse.Namespace) -> None:
    if args.url and (problem := redis_url_problem(args.url)):
        raise SystemExit(problem)
    proc, url = (None, args.url) if args.url else start_redis()
    tmp = Path(tempfile.mkdtemp(prefix="loragate-bench-"))
    try:
        rows = await _measure(args, url, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
    total = sum(r["per_s"] for r in rows.values())
    print(
        f"idle: {args.instances} gateways, {args.replicas} replicas x {args.adapters} adapters, "
        f"{args.seconds:g} s window (after {args.warmup:g} s warm-up), no request"
    )
    print(f"Redis commands/s (INFO commandstats, inside scripts included): {total:.1f}")
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["per_s"]):
        print(f"  {name:16s} {r['per_s']:9.1f}/s  {r['usec_per_call']:8.2f} us/call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an existing Redis (default: start a throwaway one)")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    asyncio.run(main(parser.parse_args()))
