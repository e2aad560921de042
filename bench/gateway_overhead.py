"""What the gateway adds to a request: latency, throughput and CPU (issue 2 item 9).

Run (the first is the reference command; ``--realtime``/``--nice`` need root)::

    .venv/bin/python bench/gateway_overhead.py --baseline-proxy --realtime --nice -10 --rounds 2
    .venv/bin/python bench/gateway_overhead.py --policies least_loaded --check --json out.json
    .venv/bin/python bench/gateway_overhead.py --py-spy /tmp/prof     # + top functions
    .venv/bin/python bench/gateway_overhead.py --extra-src old=/tmp/old/src   # A/B two trees
    .venv/bin/python bench/gateway_overhead.py --calls 500 --extra-src old=/tmp/old/src

``--calls N`` counts instead of timing: Python function calls per request in the gateway's
process (cProfile, N requests of each kind one after another), which do not depend on the
machine's load: an A/B of two trees that CPU µs cannot resolve here (±30 % between rounds) shows
in it, with the functions that differ (``bench/_call_counts.py``).

Latency on a busy shared machine is decided by the run queues unless the c=1 runs are
``--realtime`` (SCHED_FIFO for the proxy, the upstream and wrk): without it the same gateway
measured +4 ms to +11 ms p50 instead of +0.2 ms. In a closed loop (the issue's method: the
aiohttp floor reproduces its 178 µs / +0.33 ms) ``direct`` keeps core 1 busy enough for the
kernel's RT throttling (50 ms pause per second) to hit its p99: read p50 there, or add
``--think-ms 1`` (1 ms pause between requests: no throttling, but every request then starts
from idle cores, which adds ~0.1 ms to every proxy, the floor included). CPU µs per request
is robust either way (±10 % run to run here).

Set-up (everything on 127.0.0.1, ephemeral ports; every child process is stopped at the end,
and dies with the bench if it is killed):

* an *instant upstream* (``bench/_instant_upstream.py``): ``--replicas`` (2) ports answering
  vLLM-shaped bodies from precomputed bytes: a completion JSON, or a short SSE stream (8 token
  events, a usage event, ``[DONE]``, chunked) when the body asks for ``"stream": true``, plus
  ``/health``, ``/metrics`` and ``/v1/models`` (the adapter ``bench-lora`` registered) for the
  gateway's poller;
* the proxy under test in its own process pinned to one core (``--proxy-cpu``, 0):
  ``loragate serve`` (the real entry point: uvloop, config file, tenants with API keys, the
  adapter, the poller at 0.5 s) with routing policy ``loragate`` and/or ``least_loaded``; with
  ``--baseline-proxy`` also a plain aiohttp + uvloop pass-through proxy
  (``bench/_baseline_proxy.py``) as the naive floor measured in the same run;
* the load generator and the upstream on the other core (``--load-cpu``, 1): ``wrk`` when
  installed (``apt-get install wrk``), else a lean asyncio client (a message says so).

For each target (``direct`` = the upstream without a proxy) and each kind (non-stream, stream):
p50/p99 latency of whole responses at concurrency 1, then req/s at concurrency 64; the
proxy's CPU time (``/proc/<pid>/task/*/schedstat``, else ``/proc/<pid>/stat``) over each run
divided by the requests it completed gives CPU µs per request (the headline figure is at
c=64, like the issue's reference numbers). "+p50/+p99" are the target's percentiles minus
direct's, from the same round. The machine is shared and noisy: compare ratios within one
run, and use ``--rounds`` (median per metric over rounds; targets interleaved per round).

Every request is ``POST /v1/completions`` for the adapter ``bench-lora`` with an API key
(``--path /v1/chat/completions`` for chat); the answer is checked once per target before
measuring (status 200, the body or the SSE stream intact).

Results (2 cores shared with other work; medians of 2 rounds; ``--src`` = ``git archive``)::

    .venv/bin/python bench/gateway_overhead.py --baseline-proxy --realtime --nice -10 \
        --rounds 2 --src /tmp/lg/src                                 # loragate at ba16ac6

    target                 kind        +p50 ms  req/s c=64  CPU µs/req  vs aiohttp
    direct                 non-stream        -       61445           -           -
    aiohttp pass-through   non-stream   +0.259        4567         157       1.00x
    aiohttp pass-through   stream       +0.272        3389         217       1.00x
    loragate least_loaded  non-stream   +0.214        6543          99       0.63x
    loragate least_loaded  stream       +0.248        4849         141       0.65x
    loragate loragate      non-stream   +0.218        5872         116       0.74x
    loragate loragate      stream       +0.249        4468         159       0.73x

The run before it (e072812, same command) gave 178 µs / +0.332 ms for the aiohttp floor (the
issue's figures exactly), least_loaded 104 µs / +0.207 ms, loragate 113 µs / +0.223 ms. Target
(<= 120 µs, <= +0.25 ms, non-stream, routing on): met with both policies, with ~5-20 µs of
CPU margin. With ``--think-ms 1`` (idle cores between requests) the same tree measured
110-116 µs and +0.31 ms against the floor's +0.40 ms. On a heavily loaded machine (load
average 9, before the residency ``touch`` fast path) it was 128-135 µs, 0.67-0.71x the floor.

Where the time goes (``--py-spy``, loragate policy, non-stream, dcf296d at load average 9,
130 µs per request)::

    event loop + socket reads/epoll (uvloop, Runner.run self)          ~28 µs
    upstream request write (UpstreamConn.send: the loopback send)      ~17 µs
    aiohttp server: parse, Request, router, Response, headers, write   ~37 µs
    routing (policy.choose incl. ExpectedTTFTScorer, the view)          ~8 µs
    shared state begin/end (residency touch, demand count, leases)      ~7 µs
    body read, json.loads, auth, catalog, RoutingRequest/dataclasses  ~10 µs
    upstream pool bookkeeping (take/release, head parse)                ~5 µs
    poller (aiohttp client, amortised) and the rest                    ~15 µs

The aiohttp server is the largest removable share: a minimal aiohttp app answering a fixed
body costs 55-58 µs per request on this machine (``web.Server`` low-level: 55 µs), a bare
``asyncio.Protocol`` doing the same 11.5 µs. A lean HTTP/1.1 front protocol for the two POST
routes (handing any other request or connection to aiohttp) would take the gateway to
~65-75 µs.

Changes measured with this bench (A/B in one run, ``--extra-src``): telemetry as plain
counters rendered at scrape time (3.3 -> 0.7 µs per request, micro-benchmark); in-place
in-flight refresh of the routing view (one ``dataclasses.replace`` per replica per request
avoided, ~-8 % CPU); chunked decoding in one pass with one relay write per read (stream:
255 -> 138 µs CPU, +0.46 -> +0.30 ms p50). The lean upstream client (``backends.upstream``,
~200 -> ~130 µs) and the residency ``touch`` fast path were done alongside by their owners.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _call_counts import CallCount, profile_requests, render_calls
from _call_counts import send as send_requests
from _instant_upstream import ADAPTER, BASE_MODEL
from _loadgen import LoadResult, Request, run_python, run_wrk, set_realtime, wrk_path

HERE = Path(__file__).resolve().parent
API_KEY = "sk-bench-0123456789"
TARGET_CPU_US = 120.0
TARGET_ADDED_P50_MS = 0.25
# Issue 2 item 9, measured on these machines: (proxy, CPU µs/request at c=64, added p50 ms).
REFERENCE: tuple[tuple[str, float, float], ...] = (
    ("nginx", 26.0, 0.08),
    ("vllm-router (Rust)", 64.0, 0.19),
    ("aiohttp+uvloop pass-through", 178.0, 0.33),
    ("production-stack router", 1350.0, 1.2),
    ("LiteLLM", 15200.0, 14.5),
)
KINDS = ("non-stream", "stream")
_PR_SET_PDEATHSIG = 1


# -- processes --------------------------------------------------------------------------------


def _preexec(cpu: int | None, nice: int = 0) -> Callable[[], None]:
    def setup() -> None:
        if nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        with contextlib.suppress(OSError, AttributeError):  # die with the bench, however it ends
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return setup


@dataclass(slots=True)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ports: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def spawn(
    name: str,
    cmd: Sequence[str],
    *,
    cpu: int | None,
    workdir: Path,
    env: dict[str, str] | None = None,
    wait_ports: bool = True,
    nice: int = 0,
) -> Iterator[Child]:
    """Start ``cmd`` (stdin held open by us, stdout parsed for ``PORTS ...``, stderr to a log)
    and stop it at the end of the block."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if wait_ports else log,
            stderr=log,
            preexec_fn=_preexec(cpu, nice),
            env=env,
        )
    child = Child(name=name, proc=proc, log_path=log_path)
    try:
        if wait_ports:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode().strip()  # the child prints it when ready
            if not line.startswith("PORTS "):
                raise RuntimeError(f"{name} did not start:\n{child.log_tail()}")
            child.ports = [int(p) for p in line.split()[1:]]
        yield child
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_ns(pid: int) -> int:
    """CPU time (user + system) of every thread of ``pid`` so far, in ns."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        return total
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


# -- requests and checks ----------------------------------------------------------------------


def make_request(path: str, stream: bool) -> Request:
    prompt = (
        "You are a helpful assistant. Summarise the following support ticket in one sentence: "
        "the customer cannot log in after resetting the password twice today."
    )
    payload: dict[str, object]
    if path.endswith("/chat/completions"):
        payload = {"model": ADAPTER, "messages": [{"role": "user", "content": prompt}]}
    else:
        payload = {"model": ADAPTER, "prompt": prompt}
    payload.update({"max_tokens": 16, "temperature": 0})
    if stream:
        payload.update({"stream": True, "stream_options": {"include_usage": True}})
    return Request(
        path=path,
        body=json.dumps(payload).encode(),
        headers=(("Authorization", f"Bearer {API_KEY}"),),
    )


def check_answers(url: str, path: str) -> None:
    """One request of each kind must come back whole before anything is measured."""
    for stream in (False, True):
        req = make_request(path, stream)
        headers = {"Content-Type": "application/json", **dict(req.headers)}
        http_req = urllib.request.Request(url + path, data=req.body, headers=headers)
        try:
            with urllib.request.urlopen(http_req, timeout=10) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        ok = status == 200 and (
            body.endswith(b"data: [DONE]\n\n") if stream else b'"choices"' in body
        )
        if not ok:
            kind = "stream" if stream else "non-stream"
            raise RuntimeError(f"{url}{path} ({kind}) answered {status}: {body[:300]!r}")


def wait_healthy(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout_s:g} s ({last})")


# -- measuring --------------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    target: str
    kind: str
    p50_ms: float
    p99_ms: float
    rate_rps: float
    cpu_us: float | None  # proxy CPU per request at c=64 (None for direct)
    cpu_us_c1: float | None  # ... at c=1
    upstream_cpu_us: float  # the instant upstream's CPU per request at c=64
    errors: int
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    path: str
    duration_s: float
    warmup_s: float
    load_cpu: int | None
    use_wrk: bool
    nice: int = 0
    realtime: bool = False
    think_ms: int = 0
    profile_dir: Path | None = None


def load(
    url: str,
    req: Request,
    connections: int,
    duration_s: float,
    s: Settings,
    *,
    realtime: bool = False,
    think_ms: int = 0,
) -> LoadResult:
    if s.use_wrk:
        return run_wrk(
            url,
            req,
            connections=connections,
            duration_s=duration_s,
            cpu=s.load_cpu,
            nice=s.nice,
            realtime=realtime,
            think_ms=think_ms,
        )
    return run_python(
        url,
        req,
        connections=connections,
        duration_s=duration_s,
        realtime=realtime,
        think_ms=think_ms,
    )


def latency_run(url: str, req: Request, pids: Sequence[int], s: Settings) -> LoadResult:
    """The c=1 run; with ``--realtime`` the proxy, the upstream and the load generator run
    SCHED_FIFO meanwhile, so a busy machine's run queues do not decide the latency."""
    if not s.realtime:
        return load(url, req, 1, s.duration_s, s, think_ms=s.think_ms)
    for pid in pids:
        set_realtime(pid, True)
    try:
        return load(url, req, 1, s.duration_s, s, realtime=True, think_ms=s.think_ms)
    finally:
        for pid in pids:
            set_realtime(pid, False)


def measure(
    target: str, url: str, proxy_pid: int | None, upstream_pid: int, s: Settings
) -> list[Row]:
    check_answers(url, s.path)
    for stream in (False, True):  # warm-up: connection pools, caches, lazily built children
        load(url, make_request(s.path, stream), 64, s.warmup_s, s)
    rows = []
    for kind in KINDS:
        req = make_request(s.path, kind == "stream")
        p0 = cpu_ns(proxy_pid) if proxy_pid else 0
        c1 = latency_run(url, req, [p for p in (proxy_pid, upstream_pid) if p], s)
        p1 = cpu_ns(proxy_pid) if proxy_pid else 0
        u1 = cpu_ns(upstream_pid)
        c64 = load(url, req, 64, s.duration_s, s)
        p2 = cpu_ns(proxy_pid) if proxy_pid else 0
        u2 = cpu_ns(upstream_pid)
        for run, result in (("c=1", c1), ("c=64", c64)):
            if result.errors:
                detail = result.error_detail or f"{result.errors} errors"
                print(f"  warning: {target} {kind} {run}: {detail}", file=sys.stderr)
        rows.append(
            Row(
                target=target,
                kind=kind,
                p50_ms=c1.p50_ms,
                p99_ms=c1.p99_ms,
                rate_rps=c64.rate_rps,
                cpu_us=(p2 - p1) / 1e3 / max(1, c64.requests) if proxy_pid else None,
                cpu_us_c1=(p1 - p0) / 1e3 / max(1, c1.requests) if proxy_pid else None,
                upstream_cpu_us=(u2 - u1) / 1e3 / max(1, c64.requests),
                errors=c1.errors + c64.errors,
            )
        )
        if s.profile_dir is not None and proxy_pid:
            profile(target, kind, url, req, proxy_pid, rows[-1].cpu_us or 0.0, s)
    return rows


def profile(
    target: str, kind: str, url: str, req: Request, pid: int, cpu_us: float, s: Settings
) -> None:
    """Sample the proxy with py-spy during an extra c=64 run (not the measured one) and print
    the top functions by self and inclusive time, in % of samples and µs per request."""
    assert s.profile_dir is not None
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("note: py-spy is not installed (pip install py-spy): no profile", file=sys.stderr)
        return
    raw = s.profile_dir / f"{target.replace(' ', '_')}-{kind}.txt"
    seconds = max(1, round(s.duration_s))
    spy = subprocess.Popen(
        [exe, "record", "--nonblocking", "-r", "997", "-d", str(seconds + 1), "-f", "raw",
         "-o", str(raw), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)  # py-spy attaches
    try:
        load(url, req, 64, seconds, s)
    finally:
        try:
            spy.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    if raw.exists():
        print(summarize_profile(raw, cpu_us, f"{target} {kind}"), file=sys.stderr)


def summarize_profile(raw: Path, cpu_us: float, title: str, top: int = 25) -> str:
    """Top functions of a py-spy ``raw`` (collapsed stacks) file."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return f"profile {title}: no samples"
    out = [f"profile {title}: {total} samples, {cpu_us:.0f} µs CPU/request"]
    for name, table in (("self", own), ("inclusive", incl)):
        out.append(f"  top {top} by {name} time:  % samples  µs/request")
        for fn, n in table.most_common(top):
            out.append(f"    {100 * n / total:6.1f}%  {cpu_us * n / total:7.1f}  {fn}")
    return "\n".join(out)


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``; process/thread frames dropped."""
    name, _, where = frame.partition(" (")
    if not where:
        return ""
    file = where.rsplit(":", 1)[0].rstrip(")")
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{name} ({short})"


def gateway_config(
    upstream_ports: Sequence[int], policy: str, *, quiet: bool = False, src: str = ""
) -> dict[str, object]:
    """The bench's gateway config; ``quiet``: background work kept out of a call count (the
    poller polls at start-up, then hourly; the state store's housekeeping runs once at
    start-up, then hourly: at its default 50 ms it ran once per 50 ms of the counting window,
    ~30 calls a round, so a request that took longer on a busy machine counted more calls; a
    tree that validates the tombstone's lifetime against the poll interval gets one to
    match; the event-loop lag check, every 0.25 s by default, hourly too)."""
    config: dict[str, object] = {
        "base_model": BASE_MODEL,
        "replicas": [
            {"id": f"u{i}", "url": f"http://127.0.0.1:{p}"} for i, p in enumerate(upstream_ports)
        ],
        "adapters": [{"name": ADAPTER, "path": f"/bench/{ADAPTER}", "rank": 8}],
        "tenants": [{"name": "bench", "api_keys": [API_KEY]}],
        "routing": policy,
        "poller": {"interval_s": 3600.0 if quiet else 0.5},
    }
    if quiet:
        state: dict[str, float] = {}
        known = _config_text(src)
        if "maintenance_interval_s" in known:
            state["maintenance_interval_s"] = 3600.0
        if "tombstone_ttl_s" in known:
            state["tombstone_ttl_s"] = 2 * 3600.0 + 60.0
        if state:
            config["state"] = state
        if "loop_lag_interval_s" in known:
            config["metrics"] = {"loop_lag_interval_s": 3600.0}
    return config


def _config_text(src: str) -> str:
    """The config module of the loragate tree at ``src`` ("": the installed one), to tell
    which ``state:`` keys it knows (an older tree refuses a key it does not)."""
    if src:
        config_py = Path(src, "loragate", "core", "config.py")
    else:
        import loragate.core.config as installed

        config_py = Path(installed.__file__)
    return config_py.read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class TargetSpec:
    label: str
    kind: str  # direct | baseline | loragate
    policy: str = ""
    src: str = ""  # PYTHONPATH for an alternative loragate tree ("" = the installed one)


@contextlib.contextmanager
def start_gateway(
    spec: TargetSpec,
    upstream: Child,
    workdir: Path,
    *,
    cpu: int | None,
    nice: int,
    stats_path: Path | None = None,
) -> Iterator[tuple[Child, str]]:
    """``loragate serve`` from ``spec``'s tree, healthy; with ``stats_path``, under
    ``_profiled_serve.py`` (cProfile switched by signals) and with its background work quiet."""
    quiet = stats_path is not None
    cfg = workdir / f"gateway-{spec.policy}.yaml"
    config = gateway_config(upstream.ports, spec.policy, quiet=quiet, src=spec.src)
    cfg.write_text(json.dumps(config, indent=2))
    port = free_port()
    env = dict(os.environ)
    if spec.src:
        env["PYTHONPATH"] = spec.src + os.pathsep + env.get("PYTHONPATH", "")
    if stats_path is None:
        entry = [
            sys.executable,
            "-c",
            "import sys; from loragate.cli import main; sys.exit(main())",
        ]
    else:
        entry = [sys.executable, str(HERE / "_profiled_serve.py"), str(stats_path)]
    cmd = [*entry, "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "WARNING"]  # fmt: skip
    name = spec.label.replace(" ", "_").replace("@", "-")
    with spawn(name, cmd, cpu=cpu, workdir=workdir, env=env, wait_ports=False, nice=nice) as child:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{child.log_tail()}") from exc
        yield child, url


def count_calls(
    specs: Sequence[TargetSpec],
    upstream: Child,
    workdir: Path,
    *,
    path: str,
    requests: int,
    warmup: int,
    cpu: int | None,
) -> list[CallCount]:
    """Function calls per request of each loragate target (``--calls``), by kind."""
    rows: list[CallCount] = []
    for spec in specs:
        print(f"  counting {spec.label} ...", file=sys.stderr, flush=True)
        stats_path = workdir / f"{spec.label.replace(' ', '_')}.pstats"
        with start_gateway(spec, upstream, workdir, cpu=cpu, nice=0, stats_path=stats_path) as (
            child,
            url,
        ):
            try:
                check_answers(url, path)
                conn = http.client.HTTPConnection(
                    "127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30
                )
                try:
                    for kind in KINDS:  # warm-up: connection pools, caches, lazy imports
                        send_requests(conn, make_request(path, kind == "stream"), warmup)
                    for kind in KINDS:
                        req = make_request(path, kind == "stream")
                        rows.append(
                            profile_requests(
                                spec.label, kind, conn, req, requests, child.pid, stats_path
                            )
                        )
                finally:
                    conn.close()
            except RuntimeError as exc:
                raise RuntimeError(f"{spec.label}: {exc}\n{child.log_tail()}") from exc
    return rows


def run_round(
    specs: Sequence[TargetSpec],
    upstream: Child,
    s: Settings,
    workdir: Path,
    proxy_cpu: int | None,
) -> list[Row]:
    upstream_urls = [f"http://127.0.0.1:{p}" for p in upstream.ports]
    rows: list[Row] = []
    for spec in specs:
        print(f"  measuring {spec.label} ...", file=sys.stderr, flush=True)
        if spec.kind == "direct":
            rows += measure(spec.label, upstream_urls[0], None, upstream.pid, s)
            continue
        with contextlib.ExitStack() as stack:
            if spec.kind == "baseline":
                cmd = [sys.executable, str(HERE / "_baseline_proxy.py"), "--watch-stdin"]
                for u in upstream_urls:
                    cmd += ["--upstream", u]
                child = stack.enter_context(
                    spawn("baseline", cmd, cpu=proxy_cpu, workdir=workdir, nice=s.nice)
                )
                url = f"http://127.0.0.1:{child.ports[0]}"
            else:
                child, url = stack.enter_context(
                    start_gateway(spec, upstream, workdir, cpu=proxy_cpu, nice=s.nice)
                )
            try:
                rows += measure(spec.label, url, child.pid, upstream.pid, s)
            except RuntimeError as exc:
                raise RuntimeError(f"{spec.label}: {exc}\n{child.log_tail()}") from exc
    direct = {r.kind: r for r in rows if r.target == "direct"}
    for r in rows:
        d = direct.get(r.kind)
        if d is not None and r.target != "direct":
            r.added_p50_ms = r.p50_ms - d.p50_ms
            added = r.p99_ms - d.p99_ms
            # Negative = direct's p99 was hit by something else (RT throttling): not shown.
            r.added_p99_ms = added if added >= 0 else None
    return rows


def median_rows(rounds: list[list[Row]]) -> list[Row]:
    if len(rounds) == 1:
        return rounds[0]
    out = []
    for i, first in enumerate(rounds[0]):
        same = [r[i] for r in rounds]

        def med(name: str, same: list[Row] = same) -> float | None:
            values = [getattr(r, name) for r in same if getattr(r, name) is not None]
            return statistics.median(values) if values else None

        out.append(
            Row(
                target=first.target,
                kind=first.kind,
                p50_ms=med("p50_ms") or 0.0,
                p99_ms=med("p99_ms") or 0.0,
                rate_rps=med("rate_rps") or 0.0,
                cpu_us=med("cpu_us"),
                cpu_us_c1=med("cpu_us_c1"),
                upstream_cpu_us=med("upstream_cpu_us") or 0.0,
                errors=sum(r.errors for r in same),
                added_p50_ms=med("added_p50_ms"),
                added_p99_ms=med("added_p99_ms"),
            )
        )
    return out


# -- output -----------------------------------------------------------------------------------


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(rows: Sequence[Row], header: str) -> str:
    base = {r.kind: r.cpu_us for r in rows if r.target.startswith("aiohttp")}
    cols = (
        "target",
        "kind",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "+p99 ms",
        "req/s c=64",
        "CPU µs/req",
        "CPU c=1",
        "vs aiohttp",
        "errors",
    )
    table = [cols]
    for r in rows:
        ratio = None
        b = base.get(r.kind)
        if b and r.cpu_us is not None:
            ratio = r.cpu_us / b
        table.append(
            (
                r.target,
                r.kind,
                _f(r.p50_ms, ".3f"),
                _f(r.p99_ms, ".3f"),
                _f(r.added_p50_ms, "+.3f"),
                _f(r.added_p99_ms, "+.3f"),
                _f(r.rate_rps, ".0f"),
                _f(r.cpu_us, ".0f"),
                _f(r.cpu_us_c1, ".0f"),
                "-" if ratio is None else f"{ratio:.2f}x",
                str(r.errors),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = [header]
    for j, row in enumerate(table):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("reference (issue 2 item 9, non-stream, same kind of machine):")
    for name, cpu, added in REFERENCE:
        lines.append(f"  {name:<30} {cpu:>8,.0f} µs CPU/req   +{added:.2f} ms p50")
    lines.append("")
    for r in rows:
        if r.target.startswith("loragate") and r.kind == "non-stream":
            ok_cpu = r.cpu_us is not None and r.cpu_us <= TARGET_CPU_US
            ok_lat = r.added_p50_ms is not None and r.added_p50_ms <= TARGET_ADDED_P50_MS
            lines.append(
                f"target ({r.target}): CPU {_f(r.cpu_us, '.0f')} µs <= {TARGET_CPU_US:.0f}: "
                f"{'met' if ok_cpu else 'NOT met'}; added p50 {_f(r.added_p50_ms, '+.3f')} ms "
                f"<= {TARGET_ADDED_P50_MS} ms: {'met' if ok_lat else 'NOT met'}"
            )
    return "\n".join(lines)


def targets_met(rows: Sequence[Row]) -> bool:
    ours = [r for r in rows if r.target.startswith("loragate") and r.kind == "non-stream"]
    return bool(ours) and all(
        r.cpu_us is not None
        and r.cpu_us <= TARGET_CPU_US
        and r.added_p50_ms is not None
        and r.added_p50_ms <= TARGET_ADDED_P50_MS
        for r in ours
    )


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--policies",
        default="least_loaded,loragate",
        help="comma-separated routing policies to run the gateway with",
    )
    p.add_argument(
        "--baseline-proxy",
        action="store_true",
        help="also measure a plain aiohttp+uvloop pass-through proxy",
    )
    p.add_argument("--no-gateway", action="store_true", help="skip loragate (baseline only)")
    p.add_argument(
        "--extra-src",
        action="append",
        default=[],
        metavar="LABEL=SRC_DIR",
        help="also measure the loragate tree at SRC_DIR (its src/ folder) "
        "with the first policy, e.g. head=/tmp/lg-head/src",
    )
    p.add_argument(
        "--src",
        default="",
        metavar="SRC_DIR",
        help="run loragate from SRC_DIR (e.g. an exported commit's src/) instead of the "
        "installed tree",
    )
    p.add_argument("--replicas", type=int, default=2, help="instant upstream replicas")
    p.add_argument(
        "--path", default="/v1/completions", choices=("/v1/completions", "/v1/chat/completions")
    )
    p.add_argument("--duration-s", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--warmup-s", type=float, default=1.0, help="seconds of warm-up per kind")
    p.add_argument("--rounds", type=int, default=1, help="repeat everything; report medians")
    p.add_argument("--proxy-cpu", type=int, default=0, help="core for the proxy under test")
    p.add_argument("--load-cpu", type=int, default=1, help="core for load generator+upstream")
    p.add_argument("--python-load", action="store_true", help="use the Python load generator")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="also write the results as JSON (to stdout without FILE)",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if the target is not met")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the proxy, upstream and load generator (negative needs "
        "root: steadier latencies on a busy machine)",
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help="run the c=1 latency runs SCHED_FIFO (root): on a busy machine the run queues "
        "otherwise decide the latency, not the proxy",
    )
    p.add_argument(
        "--think-ms",
        type=int,
        default=0,
        help="pause between a response and the next request in the c=1 runs (keeps a "
        "--realtime run from hogging the cores)",
    )
    p.add_argument(
        "--py-spy",
        metavar="DIR",
        help="after each measurement, profile the proxy with py-spy during an "
        "extra c=64 run; raw stacks to DIR, top functions to stderr",
    )
    calls = p.add_argument_group("call counts (instead of timing)")
    calls.add_argument(
        "--calls",
        type=int,
        metavar="N",
        help="count Python function calls per request in the gateway (cProfile, N requests "
        "of each kind one after another), for each loragate target: independent of the "
        "machine's load, unlike CPU µs; no timing runs",
    )
    calls.add_argument(
        "--calls-warmup",
        type=int,
        default=50,
        metavar="N",
        help="requests of each kind before counting (default: %(default)s)",
    )
    calls.add_argument(
        "--calls-top",
        type=int,
        default=12,
        metavar="K",
        help="functions shown whose calls per request differ most from the first target's, "
        "0: none (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.calls is not None and not 1 <= args.calls <= 100_000:
        p.error(f"--calls must be 1..100000 (got {args.calls})")
    if args.calls_warmup < 0 or args.calls_top < 0:
        p.error("--calls-warmup and --calls-top must be >= 0")
    if args.calls is not None and args.no_gateway and not args.extra_src:
        p.error("--calls counts loragate's calls: --no-gateway leaves no loragate target")
    if not 1 <= args.rounds <= 20 or not 0.5 <= args.duration_s <= 120:
        p.error("--rounds must be 1..20 and --duration-s 0.5..120")
    if args.replicas < 1:
        p.error(f"--replicas must be >= 1 (got {args.replicas})")
    # Checked here, not by a gateway that does not start (a traceback after 30 s).
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    if not policies and (args.extra_src or not args.no_gateway):
        p.error("--policies names no policy")
    for src in [args.src, *(e.partition("=")[2] for e in args.extra_src)]:
        if src and not Path(src, "loragate").is_dir():
            p.error(f"no loragate package in {src} (--src and --extra-src take a src/ folder)")
    if any(not e.partition("=")[1] for e in args.extra_src):
        p.error("--extra-src takes LABEL=SRC_DIR")
    if not args.src:  # the installed tree's policies (another tree may have others)
        from loragate.routing import default_registry

        known = list(default_registry().profiles)
        unknown = [x for x in policies if x not in known]
        if unknown:
            p.error(f"--policies: unknown policy {', '.join(unknown)} (known: {', '.join(known)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    proxy_cpu: int | None = args.proxy_cpu
    load_cpu: int | None = args.load_cpu
    available = os.sched_getaffinity(0)
    if proxy_cpu not in available or load_cpu not in available or proxy_cpu == load_cpu:
        print(
            f"note: cores {proxy_cpu}/{load_cpu} not both available ({sorted(available)}): "
            "nothing is pinned",
            file=sys.stderr,
        )
        proxy_cpu = load_cpu = None
    use_wrk = not args.python_load and wrk_path() is not None
    if not use_wrk and not args.python_load:
        print(
            "note: wrk is not installed (Debian: apt-get install -y wrk); using the Python "
            "load generator, which may cap req/s at c=64",
            file=sys.stderr,
        )
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})  # this process (and the Python generator)
    settings = Settings(
        path=args.path,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        load_cpu=load_cpu,
        use_wrk=use_wrk,
        nice=args.nice,
        realtime=args.realtime,
        think_ms=args.think_ms,
        profile_dir=Path(args.py_spy) if args.py_spy else None,
    )
    if settings.profile_dir is not None:
        settings.profile_dir.mkdir(parents=True, exist_ok=True)
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    if args.realtime and not args.think_ms:
        print("note: --realtime closed loop: direct's p99 may show the kernel's RT throttling "
              "(compare p50, or add --think-ms 1)", file=sys.stderr)  # fmt: skip
    specs = [TargetSpec("direct", "direct")]
    if args.baseline_proxy:
        specs.append(TargetSpec("aiohttp pass-through", "baseline"))
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not args.no_gateway:
        specs += [TargetSpec(f"loragate {p}", "loragate", policy=p, src=args.src) for p in policies]
    for extra in args.extra_src:
        label, _, src = extra.partition("=")
        specs.append(TargetSpec(f"loragate@{label} {policies[0]}", "loragate", policies[0], src))
    command = "bench/gateway_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.calls is not None:
        return main_calls(args, [t for t in specs if t.kind == "loragate"], command, load_cpu)
    rounds: list[list[Row]] = []
    with tempfile.TemporaryDirectory(prefix="lg-overhead-") as tmp:
        workdir = Path(tmp)
        upstream_cmd = [
            sys.executable,
            str(HERE / "_instant_upstream.py"),
            "--replicas",
            str(args.replicas),
            "--watch-stdin",
        ]
        with spawn(
            "upstream", upstream_cmd, cpu=load_cpu, workdir=workdir, nice=args.nice
        ) as upstream:
            for i in range(args.rounds):
                print(f"round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
                rounds.append(run_round(specs, upstream, settings, workdir, proxy_cpu))
    rows = median_rows(rounds)
    tool = "wrk" if use_wrk else "python load generator"
    pinned = "unpinned" if proxy_cpu is None else f"proxy on core {proxy_cpu}, load on {load_cpu}"
    header = (
        f"gateway overhead: POST {args.path} ({len(make_request(args.path, False).body)} B body), "
        f"{args.replicas} instant replicas, {tool}, {pinned}, {args.duration_s:g} s per run, "
        f"{args.rounds} round(s){' (medians)' if args.rounds > 1 else ''}\n"
        f"command: .venv/bin/python {command.strip()}\n"
    )
    print(render(rows, header))
    if args.json:
        doc = {
            "command": command.strip(),
            "tool": tool,
            "rounds": args.rounds,
            "rows": [asdict(r) for r in rows],
            "per_round": [[asdict(r) for r in rnd] for rnd in rounds],
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.check and not targets_met(rows):
        return 1
    return 0


def main_calls(
    args: argparse.Namespace, specs: Sequence[TargetSpec], command: str, load_cpu: int | None
) -> int:
    """``--calls``: function calls per request of each loragate target, printed (and JSON)."""
    with tempfile.TemporaryDirectory(prefix="lg-calls-") as tmp:
        workdir = Path(tmp)
        upstream_cmd = [sys.executable, str(HERE / "_instant_upstream.py"), "--replicas",
                        str(args.replicas), "--watch-stdin"]  # fmt: skip
        with spawn("upstream", upstream_cmd, cpu=load_cpu, workdir=workdir) as upstream:
            rows = count_calls(
                specs,
                upstream,
                workdir,
                path=args.path,
                requests=args.calls,
                warmup=args.calls_warmup,
                cpu=args.proxy_cpu if load_cpu is not None else None,
            )
    header = (
        f"gateway call counts: POST {args.path}, {args.replicas} instant replicas, "
        f"{args.calls} requests of each kind one after another (after {args.calls_warmup} of "
        "warm-up), Python function calls in the gateway's process (cProfile) per request\n"
        f"command: .venv/bin/python {command.strip()}\n"
    )
    print(render_calls(rows, header, args.calls_top))
    if args.json:
        doc = {
            "command": command.strip(),
            "mode": "calls",
            "requests": args.calls,
            "rows": [{k: v for k, v in asdict(r).items() if k != "by_function"} for r in rows],
            "by_function": {f"{r.target} {r.kind}": r.by_function for r in rows},
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
