"""A load test cancelled mid-run (Ctrl-C, an outer timeout, its own deadline) ends its requests
in flight in order: each is cancelled, awaited and recorded before the HTTP session closes.

The target is a slow simulated replica (the twin server at 1/20 of real time: a 200-token answer
takes seconds), so the requests are still streaming when the run is cancelled; the replica's own
counters (every request it received ends as finished or aborted) say how many were sent.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from loragate.loadtest.openloop import OpenLoopConfig, RequestResult, run_open_loop
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica
from loragate.workload.generator import WorkloadRequest

BASE = "tiny-llama"
OUTPUT_TOKENS = 200  # seconds of decoding at time_scale 0.05

SPEC = f"""\
name: slow
seed: 3
duration_s: 600
adapters: {{count: 2, base_fraction: 0.5}}
arrivals: {{process: poisson, rate_rps: 10}}
lengths: {{prompt: 16, output: {OUTPUT_TOKENS}}}
"""

# What an unorderly end leaves on stderr (asyncio's and aiohttp's complaints).
COMPLAINTS = ("Exception in callback", "Unclosed", "Task was destroyed", "Traceback")


@pytest.fixture
async def slow_replica() -> AsyncIterator[RunningReplica]:
    config = ReplicaConfig(served_model_name=BASE, time_scale=0.05)
    async with run_replica(config, host="127.0.0.1", port=0) as replica:
        yield replica


def received(replica: RunningReplica) -> int:
    """Requests the replica received, once none is running or waiting (each has ended)."""
    return sum(replica.state.counters.success_by_reason.values())


async def until(what: str, check: Any, bound_s: float = 60.0) -> None:
    for _ in range(int(bound_s * 20)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {bound_s} s: {what}")


def in_flight(replica: RunningReplica) -> int:
    gauges = replica.state.gauges()
    return gauges.num_running + gauges.num_waiting


def sigint_as_by_default() -> None:
    """A job runner may start the tests with SIGINT ignored; a terminal gives the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_ctrl_c_records_every_request_in_flight_before_the_session_closes(
    slow_replica: RunningReplica, tmp_path: Path
) -> None:
    spec = tmp_path / "slow.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    out_records = tmp_path / "records.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-W", "default", "-m", "loragate.cli", "loadtest",
        "--url", slow_replica.url, "--workload", str(spec), "--max-requests", "4",
        "--progress-s", "0", "--results", str(out_records),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=sigint_as_by_default,
    )  # fmt: skip
    try:
        await until("4 requests streaming", lambda: in_flight(slow_replica) == 4)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await until("the replica saw the requests end", lambda: in_flight(slow_replica) == 0)
    stderr = err.decode()
    assert proc.returncode == 130, stderr
    for complaint in COMPLAINTS:
        assert complaint not in stderr, stderr
    records = [json.loads(line) for line in out_records.read_text().splitlines()]
    assert received(slow_replica) == 4 == len(records)
    assert {r["error_type"] for r in records} == {"interrupted"}
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3]
    assert "requests  sent 4, ok 0, failed 4 (interrupted: 4)" in out.decode()
    assert "requests in flight are counted as failed (interrupted)" in stderr


def requests_then_a_late_one(n: int) -> list[WorkloadRequest]:
    """``n`` requests at once, then one an hour later (the run waits for it when cancelled)."""
    now = [WorkloadRequest(0.01 * i, None, 0, 16, OUTPUT_TOKENS) for i in range(n)]
    return [*now, WorkloadRequest(3600.0, None, 0, 16, OUTPUT_TOKENS)]


def config(url: str, **overrides: Any) -> OpenLoopConfig:
    return OpenLoopConfig(
        base_url=url + "/v1", base_model=BASE, deadline_s=7200, request_timeout_s=600,
        **overrides,
    )  # fmt: skip


async def test_a_cancelled_run_reports_its_requests_in_flight_before_it_ends(
    slow_replica: RunningReplica,
) -> None:
    reported: list[RequestResult] = []
    run = asyncio.create_task(
        run_open_loop(
            config(slow_replica.url), requests_then_a_late_one(3), on_result=reported.append
        )
    )
    await until("3 requests streaming", lambda: in_flight(slow_replica) == 3)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    # Reported by the time the cancellation came through, not later by stray tasks.
    assert sorted(r.index for r in reported) == [0, 1, 2]
    assert {r.error_type for r in reported} == {"interrupted"}
    assert all(r.status == 0 and not r.ok for r in reported)
    gc.collect()  # an unclosed session would warn now (an error under filterwarnings)
    await until("the replica saw the requests end", lambda: in_flight(slow_replica) == 0)
    assert received(slow_replica) == 3


async def test_an_outer_timeout_ends_the_run_with_every_request_reported(
    slow_replica: RunningReplica,
) -> None:
    reported: list[RequestResult] = []

    async def bounded() -> None:
        async with asyncio.timeout(None) as bound:

            async def expire_once_streaming() -> None:
                await until("2 requests streaming", lambda: in_flight(slow_replica) == 2)
                bound.reschedule(asyncio.get_running_loop().time())

            expiry = asyncio.create_task(expire_once_streaming())
            try:
                await run_open_loop(
                    config(slow_replica.url), requests_then_a_late_one(2), on_result=reported.append
                )
            finally:
                expiry.cancel()

    with pytest.raises(TimeoutError):
        await bounded()
    assert sorted(r.index for r in reported) == [0, 1]
    assert {r.error_type for r in reported} == {"interrupted"}
    await until("the replica saw the requests end", lambda: in_flight(slow_replica) == 0)
    assert received(slow_replica) == 2


async def test_the_deadline_ends_a_run_waiting_for_a_slot(slow_replica: RunningReplica) -> None:
    """One slot, taken by a request far longer than the run's deadline: the run ends at the
    deadline, the request cancelled (it waited for the slot past the deadline, so until the
    request's answer had ended)."""
    cfg = OpenLoopConfig(
        base_url=slow_replica.url + "/v1", base_model=BASE, max_concurrency=1, deadline_s=1.0,
        request_timeout_s=600,
    )  # fmt: skip
    two = [WorkloadRequest(0.0, None, 0, 16, OUTPUT_TOKENS)] * 2
    results = await run_open_loop(cfg, two)
    assert [(r.index, r.error_type) for r in results] == [(0, "deadline")]
    await until("the replica saw the request end", lambda: in_flight(slow_replica) == 0)
    assert received(slow_replica) == 1
    assert slow_replica.state.counters.success_by_reason.get("abort") == 1
