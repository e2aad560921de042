"""A throwaway redis-server on a free loopback port, and a MONITOR watcher, for the state
benchmarks."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time

import redis.asyncio as aioredis


def redis_url_problem(url: str) -> str | None:
    """Why ``--url`` cannot be used, in one line (a malformed URL, no Redis answering a PING
    within 5 s), or None: for the benchmarks to check before any work."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=5.0)
    except ValueError as exc:
        return f"--url {url}: {exc}"
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"--url {url}: no Redis answers ({type(exc).__name__}: {exc})"
    finally:
        client.close()
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server (no persistence) and wait until it accepts connections."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (scripts/ensure_redis.sh installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tempfile.gettempdir()],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.01)
    return proc, f"redis://127.0.0.1:{port}/0"


async def watch_client_commands(
    mon: aioredis.Redis, seen: list[str], started: asyncio.Event
) -> None:
    """Append every client-issued command MONITOR shows (not those a Lua script runs) to
    ``seen``, until the command ``ECHO bench-end``; ``started`` is set once MONITOR is on."""
    async with mon.monitor() as m:
        started.set()
        while True:
            cmd = await m.next_command()
            if cmd["client_type"] != "lua":
                seen.append(cmd["command"])
            if cmd["command"] == "ECHO bench-end":
                return
