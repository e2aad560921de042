"""Simulated replicas as real processes (``loragate replica --simulated``), for chaos tests:
each can be SIGKILLed or SIGTERMed and started again on the same port, as an operator or a
crash would do to a vLLM server. Their logs go to a file (a full pipe would stall them).

While a replica is down, its port is held by a socket bound to it (``SO_REUSEADDR``, not
listening: the replica can still bind it): the port was an ephemeral one, and any connection
made meanwhile on this machine may otherwise take it as its local port, so that the restart
fails ("address already in use"; seen once in ~30 runs of the chaos test under load)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

from loragate.commands.replica import READY_PREFIX

BASE = "tiny-llama"
MAX_LORAS = 2
MAX_CPU_LORAS = 4
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 20.0


class SimReplica:
    """One ``loragate replica --simulated`` process; ``port`` is kept across restarts."""

    def __init__(self, name: str, log_dir: Path, *, seed: int, time_scale: float) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.seed = seed
        self.time_scale = time_scale
        self.port = 0  # 0 until the first start picked one
        self.proc: asyncio.subprocess.Process | None = None
        self.exit_codes: list[int] = []
        self._port_hold: socket.socket | None = None  # the port, while the replica is down

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        assert self.proc is None, f"{self.name} is running"
        args = [
            "--simulated", "--host", "127.0.0.1", "--port", str(self.port),
            "--served-model-name", BASE, "--enable-lora",
            "--max-loras", str(MAX_LORAS), "--max-cpu-loras", str(MAX_CPU_LORAS),
            "--max-model-len", "1024", "--profile", "fast",
            "--seed", str(self.seed), "--time-scale", str(self.time_scale),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loragate.cli", "replica", *args,
                stdout=asyncio.subprocess.PIPE, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), _START_TIMEOUT_S)
        finally:
            self._release_port()
        if not line.startswith(READY_PREFIX.encode()):
            await self._reap()
            last = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise AssertionError(f"{self.name} did not start: {line!r}; {self.log_path}: {last}")
        port = int(line.decode().rsplit(":", 1)[-1].strip().rstrip("/"))
        assert self.port in (0, port), (self.port, port)
        self.port = port

    async def kill(self) -> int:
        """SIGKILL (a crash: connections reset, nothing answered); waits for the exit."""
        return await self._signal(signal.SIGKILL)

    async def terminate(self) -> int:
        """SIGTERM (vLLM's shutdown: requests in flight end with finish_reason abort)."""
        return await self._signal(signal.SIGTERM)

    async def _signal(self, sig: signal.Signals) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        self.proc.send_signal(sig)
        return await self._reap()

    async def _reap(self) -> int:
        proc, self.proc = self.proc, None
        assert proc is not None
        try:
            code = await asyncio.wait_for(proc.wait(), _STOP_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            code = await proc.wait()
        self.exit_codes.append(code)
        self._hold_port()
        return code

    def _hold_port(self) -> None:
        if self.port and self._port_hold is None:
            hold = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                hold.bind(("127.0.0.1", self.port))
            except OSError:  # taken already: the restart will say so
                hold.close()
                return
            self._port_hold = hold

    def _release_port(self) -> None:
        hold, self._port_hold = self._port_hold, None
        if hold is not None:
            hold.close()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()
        elif self.proc is not None:
            await self._reap()
        self._release_port()
