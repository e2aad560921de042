"""A real ``redis-server`` on a free 127.0.0.1 port, for tests (no mocks).

Registered in ``tests/conftest.py``; use the ``redis_server`` fixture. ``stop()`` and
``start()`` restart it on the same port, with its data lost (``stop()``) or kept
(``stop(save=True)``: ``SHUTDOWN SAVE`` into the fixture's own directory).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ports import unused_port

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


def _command(port: int, *parts: str) -> bytes:
    """Send one command over a raw socket, return the first reply chunk."""
    payload = f"*{len(parts)}\r\n".encode()
    for p in parts:
        payload += f"${len(p.encode())}\r\n{p}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
        s.sendall(payload)
        try:
            return s.recv(1024)
        except (ConnectionResetError, TimeoutError):
            return b""


class RedisServer:
    """One redis-server process, restartable on the same port."""

    def __init__(self, binary: str, port: int, data_dir: Path) -> None:
        self.binary = binary
        self.port = port
        self.data_dir = data_dir
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("redis-server already running")
        log = (self.data_dir / "redis.log").open("ab")
        try:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.data_dir),
                    "--dbfilename",
                    "dump.rdb",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._proc.returncode} on port {self.port}: "
                    + (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                )
            with contextlib.suppress(OSError):
                if _command(self.port, "PING").startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}")

    def stop(self, *, save: bool = False) -> None:
        """Stop it. Without ``save`` the data is lost (as after a crash without persistence)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if save:
                _command(self.port, "SHUTDOWN", "SAVE")
            else:
                proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT_S)
        self._proc = None
        if not save:
            (self.data_dir / "dump.rdb").unlink(missing_ok=True)

    def restart(self, *, save: bool = False) -> None:
        self.stop(save=save)
        self.start()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found on PATH (run scripts/ensure_redis.sh)")
    data_dir = tmp_path_factory.mktemp("redis")
    server: RedisServer | None = None
    for _ in range(5):  # another process may grab the free port between probe and bind
        candidate = RedisServer(binary, unused_port(), data_dir)
        try:
            candidate.start()
        except RuntimeError:
            continue
        server = candidate
        break
    if server is None:
        pytest.fail("could not start redis-server on a free port")
    try:
        yield server
    finally:
        server.stop()
