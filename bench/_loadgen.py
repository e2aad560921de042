"""Closed-loop HTTP/1.1 keep-alive load for ``bench/gateway_overhead.py``: ``wrk`` when it is
installed (C, one thread, a Lua script for the POST body and the percentiles), else a lean
asyncio client on bare protocols (uvloop when installed) that is good for ~10-20k req/s on one
core — enough for a Python gateway, but say so next to its numbers.

Both send the same request (``Request``) over ``connections`` keep-alive connections, each
waiting for the whole response before sending the next, for ``duration_s`` seconds (and, in
Python, at most ``max_requests`` requests), and report completed requests, elapsed time,
p50/p99 latency of whole responses and error counts.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import cast

_HEAD_END = b"\r\n\r\n"
_LAST_CHUNK = b"\r\n0\r\n\r\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadResult:
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # connect/read/write/timeouts and non-2xx answers
    tool: str
    error_detail: str = ""

    @property
    def rate_rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def set_realtime(pid: int, on: bool) -> None:
    """SCHED_FIFO priority 1 (needs root), or back to the normal policy (niceness kept)."""
    if on:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(1))
    else:
        os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b:03d}" for b in data) + '"'


_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("LOADRESULT %d %d %.1f %.1f %d %d %d %d %d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.timeout, e.status))
end
"""


def run_wrk(
    url: str,
    request: Request,
    *,
    connections: int,
    duration_s: float,
    cpu: int | None,
    nice: int = 0,
    realtime: bool = False,
    think_ms: int = 0,
    timeout_s: float = 5.0,
) -> LoadResult:
    """One ``wrk -t1`` run against ``url`` (``http://host:port``); ``think_ms`` pauses each
    connection between a response and its next request, ``realtime`` runs wrk SCHED_FIFO."""
    exe = wrk_path()
    if exe is None:
        raise RuntimeError("wrk is not installed")
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(request.body)}"]
    lines.append('wrk.headers["Content-Type"] = "application/json"')
    for name, value in request.headers:
        lines.append(f"wrk.headers[{_lua_string(name.encode())}] = {_lua_string(value.encode())}")
    if think_ms > 0:
        lines.append(f"function delay() return {int(think_ms)} end")
    script = "\n".join(lines) + "\n" + _WRK_DONE
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
        script_path = fh.name
    seconds = max(1, round(duration_s))
    cmd = [
        exe,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        script_path,
        url + request.path,
    ]

    def preexec() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        if realtime:
            set_realtime(0, True)

    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=seconds + timeout_s + 30,
            preexec_fn=preexec,
            check=False,
        )
    finally:
        os.unlink(script_path)
    for line in proc.stdout.splitlines():
        if line.startswith("LOADRESULT "):
            n, dur_us, p50_us, p99_us, *errs = line.split()[1:]
            connect, read, write, timeout, status = (int(e) for e in errs[:5])
            detail = ", ".join(
                f"{count} {kind}"
                for kind, count in (("connect", connect), ("read", read), ("write", write),
                                    ("timeout", timeout), ("non-2xx", status))
                if count
            )  # fmt: skip
            return LoadResult(
                requests=int(n),
                duration_s=int(dur_us) / 1e6,
                p50_ms=float(p50_us) / 1e3,
                p99_ms=float(p99_us) / 1e3,
                errors=connect + read + write + timeout + status,
                tool="wrk",
                error_detail=detail,
            )
    raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")


# -- the Python fallback -----------------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """Sends ``raw`` and completes ``waiter`` with the status when the whole answer is in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None
        self._buf = bytearray()
        self._status = 0
        self._body_start = -1
        self._length = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def send(self, raw: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self._buf.clear()
        self._body_start = -1
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._body_start < 0:
            end = buf.find(_HEAD_END)
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self._status = int(head[9:12])
            self._body_start = end + 4
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                self._length = int(head[i + 17 : j if j >= 0 else len(head)])
            else:
                self._length = -1  # chunked: ends with the last-chunk line
        if self._length >= 0:
            done = len(buf) - self._body_start >= self._length
        else:
            whole = len(buf) - self._body_start == 5 and buf.endswith(b"0\r\n\r\n")
            done = whole or buf.endswith(_LAST_CHUNK)
        if done and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self._status)


async def _python_load(
    host: str,
    port: int,
    request: Request,
    connections: int,
    duration_s: float,
    max_requests: int,
    think_ms: int,
) -> LoadResult:
    loop = asyncio.get_running_loop()
    head = f"POST {request.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "Content-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in request.headers)
    head += f"Content-Length: {len(request.body)}\r\n\r\n"
    raw = head.encode("latin-1") + request.body
    latencies: list[int] = []
    errors = 0
    count = 0
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal errors, count
        conn: _Conn | None = None
        while count < max_requests and time.perf_counter() < deadline:
            try:
                if conn is None or conn.transport is None or conn.transport.is_closing():
                    _, conn = await loop.create_connection(_Conn, host, port)
                count += 1
                t0 = time.perf_counter_ns()
                status = await asyncio.wait_for(conn.send(raw), 5.0)
                latencies.append(time.perf_counter_ns() - t0)
                if not 200 <= status < 300:
                    errors += 1
                if think_ms > 0:
                    await asyncio.sleep(think_ms / 1e3)
            except (OSError, TimeoutError):
                errors += 1
                conn = None  # timeouts and connection errors alike

    t_start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - t_start
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return math.nan
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1e6

    return LoadResult(
        requests=len(latencies),
        duration_s=elapsed,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        errors=errors,
        tool="python",
    )


def run_python(
    url: str,
    request: Request,
    *,
    connections: int,
    duration_s: float,
    max_requests: int = 2_000_000,
    realtime: bool = False,
    think_ms: int = 0,
) -> LoadResult:
    """The fallback generator, in this process (pin the process to the load core first)."""
    hostport = url.split("://", 1)[1]
    host, _, port = hostport.rpartition(":")
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    if realtime:
        set_realtime(0, True)
    try:
        with runner:
            return runner.run(
                _python_load(
                    host, int(port), request, connections, duration_s, max_requests, think_ms
                )
            )
    finally:
        if realtime:
            set_realtime(0, False)
