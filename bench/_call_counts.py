"""Function calls per request in the gateway's process, for ``bench/gateway_overhead.py --calls``.

CPU time per request on a shared 2-core machine moves ±30 % between rounds of one run, more than
most changes being compared. The number of Python function calls a request costs does not
depend on the machine's load: the gateway runs under cProfile (``bench/_profiled_serve.py``),
the profile is switched on, exactly N requests of one kind are sent one after another on one
keep-alive connection, and the profile is switched off after a short idle pause (so the last
request's bookkeeping after its response is in). The gateway's background work is made rare
enough to stay out of the window (the poller and the state store's housekeeping every hour,
once at start-up: a loop that ran every 50 ms there counted more calls per request the longer
a request took, 3 % more on a busy machine). Calls per request is
the difference of two such profiles, of N and of 2N requests, over N: what a window costs besides
its requests (switching the profile, the idle pause) cancels out. Calls are ``ncalls`` (recursive
ones included). Per function (file relative to its package, function name, no line numbers), two
trees' counts are compared, so an A/B says which functions a change calls more.
"""

from __future__ import annotations

import http.client
import os
import pstats
import signal
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _loadgen import Request

IDLE_BEFORE_STOP_S = 0.3  # the last response is out; the handler's last lines run meanwhile
STATS_WAIT_S = 60.0


@dataclass(slots=True)
class CallCount:
    target: str
    kind: str
    requests: int
    calls_per_request: float
    by_function: dict[str, float] = field(default_factory=dict)  # "file:function" -> per request


def send(conn: http.client.HTTPConnection, req: Request, n: int) -> None:
    """``n`` requests, one after another, each read whole; any other status than 200 stops."""
    headers = {"Content-Type": "application/json", **dict(req.headers)}
    for _ in range(n):
        conn.request("POST", req.path, body=req.body, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{req.path} answered {resp.status}: {body[:300]!r}")


def _wait_for(path: Path, what: str) -> None:
    deadline = time.monotonic() + STATS_WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the profiled gateway did not {what} within {STATS_WAIT_S:g} s")
        time.sleep(0.01)


def profile_requests(
    target: str,
    kind: str,
    conn: http.client.HTTPConnection,
    req: Request,
    n: int,
    pid: int,
    stats_path: Path,
) -> CallCount:
    """Calls per request of ``req`` in the gateway ``pid`` (run by ``_profiled_serve.py``):
    profiles of ``n`` and ``2 n`` requests, their difference over ``n``."""
    once = _profile(conn, req, n, pid, stats_path)
    twice = _profile(conn, req, 2 * n, pid, stats_path)
    names = set(once) | set(twice)
    by_function = {k: (twice.get(k, 0) - once.get(k, 0)) / n for k in names}
    return CallCount(
        target=target,
        kind=kind,
        requests=n,
        calls_per_request=(sum(twice.values()) - sum(once.values())) / n,
        by_function={k: v for k, v in by_function.items() if v},
    )


def _profile(
    conn: http.client.HTTPConnection, req: Request, n: int, pid: int, stats_path: Path
) -> Counter[str]:
    """Calls by function while ``n`` requests are answered."""
    on_path = stats_path.with_name(stats_path.name + ".on")
    stats_path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    _wait_for(on_path, "start profiling")
    send(conn, req, n)
    time.sleep(IDLE_BEFORE_STOP_S)
    os.kill(pid, signal.SIGUSR2)
    _wait_for(stats_path, "write its profile")
    stats = pstats.Stats(str(stats_path))
    calls: Counter[str] = Counter()
    raw: Mapping[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = stats.stats  # type: ignore[attr-defined]
    for (file, _line, name), (_prim, ncalls, _tt, _ct, _callers) in raw.items():
        calls[function_key(file, name)] += ncalls
    return calls


def function_key(file: str, name: str) -> str:
    """``.../src/loragate/gateway/proxy.py`` + ``f`` -> ``loragate/gateway/proxy.py:f``; the same
    for site-packages and the standard library, so two trees' functions match."""
    if file == "~":  # a built-in: "<method 'append' of 'list' objects>"
        return name
    path = file.replace("\\", "/")
    for marker in ("/site-packages/", "/src/"):
        if marker in path:
            path = path.rsplit(marker, 1)[1]
            break
    else:
        if "/lib/python3" in path:  # the standard library: lib/python3.11/asyncio/events.py
            path = path.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return f"{path}:{name}"


def render_calls(rows: Sequence[CallCount], header: str, top: int) -> str:
    cols = ("target", "kind", "calls/request")
    table = [cols] + [(r.target, r.kind, f"{r.calls_per_request:.1f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = [header]
    for j, row in enumerate(table):
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    first = {r.kind: r for r in reversed(rows)}  # the first target's row of each kind
    for r in rows:
        a = first[r.kind]
        if r is a or top <= 0:
            continue
        lines += ["", *diff_lines(a, r, top)]
    return "\n".join(lines)


def diff_lines(a: CallCount, b: CallCount, top: int) -> list[str]:
    """The functions whose calls per request differ most between ``a`` and ``b``."""
    names = set(a.by_function) | set(b.by_function)
    diffs = sorted(
        ((b.by_function.get(n, 0.0) - a.by_function.get(n, 0.0), n) for n in names),
        key=lambda d: (-abs(d[0]), d[1]),
    )
    shown = [(d, n) for d, n in diffs if abs(d) >= 0.05][:top]
    title = f"{b.target} vs {a.target}, {b.kind}: {b.calls_per_request - a.calls_per_request:+.1f}"
    if not shown:
        return [f"{title} calls/request; no function differs by 0.05 call/request or more"]
    out = [f"{title} calls/request; the functions that differ most (calls/request):"]
    for d, n in shown:
        before, after = a.by_function.get(n, 0.0), b.by_function.get(n, 0.0)
        out.append(f"  {d:+8.2f}  {before:8.2f} -> {after:8.2f}  {n}")
    return out
