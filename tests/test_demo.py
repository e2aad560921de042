"""`loragate demo` end to end: replicas + gateway + load on loopback, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_runs_and_reports_every_request() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "demo", "--duration", "4", "--json",
         "--no-progress", "--replicas", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["requests"] > 10
    assert summary["errors"] == 0
    assert summary["succeeded"] == summary["requests"]
    assert summary["ttft_p50_ms"] <= summary["latency_p50_ms"]
    replicas = summary["replicas"]
    assert [r["replica"] for r in replicas] == ["r0", "r1"]
    # Every successful request was served by one of the replicas.
    assert sum(r["requests"] for r in replicas) == summary["succeeded"]
    # More adapters than GPU slots: the gateway had to load adapters through the admin API.
    assert sum(r["adapter_loads"] for r in replicas) >= 2


def test_demo_rejects_bad_duration() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "demo", "--duration", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "--duration must be > 0" in proc.stderr
