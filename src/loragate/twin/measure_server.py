"""Run one real vLLM server process for a measurement: start it in its own session with its
output in a log file, wait for ``/health`` 200, read what its log says about itself (KV
capacity), count the CPU time of its processes, stop it with its whole process tree.

Each server gets a private ``TMPDIR`` (removed when it stops): vLLM 0.32 puts its
``vllm_dist_*`` rendezvous file and its ZMQ IPC sockets in ``tempfile.gettempdir()``, which
would otherwise pile up in ``/tmp``. A server that exits during start-up, or is not healthy in
time, raises :class:`MeasurementError` with the tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loragate.core.errors import MeasurementError

# Characters of the server log shown when it fails to start.
LOG_TAIL_CHARS = 3000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_KV_RE = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: "
    r"([\d.]+)x"
)
_INIT_RE = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s")
_WEIGHTS_RE = re.compile(r"Loading weights took ([\d.]+) seconds")
# "Chunked prefill is enabled with max_num_batched_tokens=N." or the "non-default args" dict
_BUDGET_RE = re.compile(r"max_num_batched_tokens(?:=|': )(\d+)")


@dataclass(frozen=True, kw_only=True)
class StartupFacts:
    """What the server log says about itself (empty fields when a line is absent)."""

    kv_tokens: int | None = None
    max_model_len_logged: int | None = None
    max_concurrency_x: float | None = None
    engine_init_s: float | None = None
    weights_load_s: float | None = None
    max_num_batched_tokens: int | None = None


def parse_log(text: str) -> StartupFacts:
    """vLLM's start-up lines: "GPU KV cache size: N tokens, ..." (CPU: "CPU KV cache size"),
    the engine init time, the weights load time and the chunked-prefill token budget."""
    kv = _KV_RE.search(text)
    init = _INIT_RE.search(text)
    w = _WEIGHTS_RE.search(text)
    budget = _BUDGET_RE.search(text)
    return StartupFacts(
        kv_tokens=int(kv.group(1).replace(",", "")) if kv else None,
        max_model_len_logged=int(kv.group(2).replace(",", "")) if kv else None,
        max_concurrency_x=float(kv.group(3)) if kv else None,
        engine_init_s=float(init.group(1)) if init else None,
        weights_load_s=float(w.group(1)) if w else None,
        max_num_batched_tokens=int(budget.group(1)) if budget else None,
    )


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_s(session_id: int) -> dict[str, float]:
    """CPU seconds (user + system) of the processes of one session, by role: "api" (the
    session leader), "engine" (EngineCore), "worker" (model runner), "other"."""
    out = {"api": 0.0, "engine": 0.0, "worker": 0.0, "other": 0.0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[0] is state (field 3); session is field 6, utime 14, stime 15
        if int(fields[3]) != session_id:
            continue
        cpu = (int(fields[11]) + int(fields[12])) * _TICK_S
        pid = int(stat.parent.name)
        role = (
            "api"
            if pid == session_id
            else "engine"
            if "EngineCor" in comm
            else "worker"
            if "Worker" in comm
            else "other"
        )
        out[role] += cpu
    return out


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass(kw_only=True)
class ServerProcess:
    """One running server. Start with :func:`spawn_server`, wait with :func:`wait_ready`, and
    always :meth:`stop` (or use ``with``)."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    tmp_dir: Path
    startup_s: float = 0.0
    facts: StartupFacts = field(default_factory=StartupFacts)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user+system, s) used so far by the server's processes, by role: "api"
        (API server), "engine" (EngineCore), "worker" (model runner). On a shared machine the
        CPU time per engine step is a contention-free estimate of the step's compute cost."""
        return process_tree_cpu_s(self.proc.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log_text()[-chars:]

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server (vLLM's API server stops EngineCore/Worker), SIGKILL its session
        if stuck; remove its private TMPDIR."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # children left behind (should not happen) share the session we created
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_server(
    cmd: Sequence[str],
    *,
    env: dict[str, str],
    log_path: Path,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session (so its whole tree can be stopped), output to
    ``log_path``. A command that cannot be executed raises :class:`MeasurementError`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        try:
            return subprocess.Popen(
                list(cmd),
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise MeasurementError(f"cannot run the server command {cmd[0]!r}: {exc}") from exc


def wait_ready(server: ServerProcess, *, ready_timeout_s: float, t0: float) -> None:
    """Wait until ``/health`` answers 200 (``t0``: the monotonic start time); on exit or
    time-out :class:`MeasurementError` shows its log's tail. On any error, Ctrl-C or SIGTERM
    (as ``SystemExit``) included, the server is stopped: it runs in a session of its own and
    would outlive us."""
    try:
        _wait_ready(server, ready_timeout_s=ready_timeout_s, t0=t0)
    except BaseException:
        server.stop()
        raise


def _wait_ready(server: ServerProcess, *, ready_timeout_s: float, t0: float) -> None:
    deadline = t0 + ready_timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise MeasurementError(
                f"the server exited with status {server.proc.returncode} during start-up "
                f"(log {server.log_path}); its last lines:\n{server.log_tail()}"
            )
        if http_ok(f"{server.base_url}/health"):
            server.startup_s = time.monotonic() - t0
            server.facts = parse_log(server.log_text())
            return
        time.sleep(0.5)
    raise MeasurementError(
        f"the server did not answer /health 200 within {ready_timeout_s:g} s "
        f"(log {server.log_path}); its last lines:\n{server.log_tail()}"
    )
