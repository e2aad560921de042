"""``bench/state_roundtrips.py`` when the state store fails mid-run (a real redis-server): one
line on stderr naming the failure, exit 1, no traceback. Before: a ``StateTimeoutError``
traceback under load (each call bounded by the gateway's 0.5 s; now ``--op-timeout-s``,
default 10 s), and a ``StateUnavailableError`` traceback for an error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from redis_fixture import RedisServer

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / "state_roundtrips.py"), "--requests", "20", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_store_error_mid_run_is_one_line_and_exit_1(redis_server: RedisServer) -> None:
    # A user that may PING (the bench's check of --url passes) and nothing else: the first
    # store write is refused (NOPERM).
    admin = redis.Redis.from_url(redis_server.url)
    try:
        admin.execute_command("ACL", "SETUSER", "pingonly", "on", ">pw", "+ping", "~*")
    finally:
        admin.close()
    url = f"redis://pingonly:pw@127.0.0.1:{redis_server.port}/0"
    done = _run("--url", url)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("state_roundtrips.py: error: the state store failed: redis:")
    assert "NoPermissionError" in lines[0] and "(--op-timeout-s 10)" in lines[0]


def test_a_store_call_slower_than_op_timeout_is_one_line_and_exit_1(
    redis_server: RedisServer,
) -> None:
    # No round trip to Redis answers within a microsecond: the first call times out.
    done = _run("--url", redis_server.url, "--op-timeout-s", "0.000001")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "state_roundtrips.py: error: the state store failed: redis: TimeoutError: no answer "
        "within 1e-06 s (--op-timeout-s 1e-06)"
    ]


def test_op_timeout_must_be_positive() -> None:
    done = _run("--op-timeout-s", "0")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "state_roundtrips.py: error: --op-timeout-s must be > 0 (got 0.0)"
    )
