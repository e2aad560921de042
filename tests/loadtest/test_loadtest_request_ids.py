"""Joining a load test's records to a gateway's logs: every request is sent with its own
``X-Request-Id`` (``lt-<run id>-<index>``), each record keeps it and the answer's, and the
wall-clock time of the run's start (summary) and of each send (record).

Two simulated vLLM replicas behind a real gateway on loopback; the gateway's access log (DEBUG)
is read through ``caplog``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest

from loragate.cli import main
from loragate.core.config import config_from_mapping
from loragate.gateway.runner import running_gateway
from loragate.loadtest.openloop import OpenLoopConfig, RunStart, run_open_loop
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica
from loragate.workload.generator import WorkloadRequest
from ports import unused_port

BASE = "tiny-llama"

SPEC = """\
name: ids
seed: 3
duration_s: 3
adapters: {count: 2, base_fraction: 0.5}
arrivals: {process: poisson, rate_rps: 20}
lengths: {prompt: 8, output: 3}
"""

# The gateway's access log line: "request <id> <path> tenant=..."
ACCESS = re.compile(r"request (\S+) /v1/(?:chat/)?completions ")


@pytest.fixture
async def gateway_url() -> AsyncIterator[str]:
    async with contextlib.AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(
                run_replica(ReplicaConfig(served_model_name=BASE, seed=i), host="127.0.0.1", port=0)
            )
            for i in range(2)
        ]
        config = config_from_mapping(
            {
                "base_model": BASE,
                "replicas": [{"id": f"r{i}", "url": r.url} for i, r in enumerate(replicas)],
                "routing": "round_robin",
            }
        )
        gateway = await stack.enter_async_context(running_gateway(config, host="127.0.0.1", port=0))
        yield gateway.url


def logged_ids(caplog: pytest.LogCaptureFixture) -> set[str]:
    ids = set()
    for rec in caplog.records:
        if rec.name == "loragate.gateway.proxy" and (m := ACCESS.match(rec.getMessage())):
            ids.add(m.group(1))
    return ids


async def test_records_carry_the_gateway_request_id_and_wall_clock_times(
    gateway_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="loragate.gateway.proxy")
    spec, out, recs = tmp_path / "spec.yaml", tmp_path / "summary.json", tmp_path / "rec.jsonl"
    spec.write_text(SPEC, encoding="utf-8")
    before = time.time()
    code = await asyncio.to_thread(
        main,
        ["loadtest", "--progress-s", "0", "--url", gateway_url, "--workload", str(spec),
         "--base-only", "--max-requests", "8", "--json", str(out), "--results", str(recs)],
    )  # fmt: skip
    after = time.time()
    assert code == 0
    summary = json.loads(out.read_text(encoding="utf-8"))
    records = [json.loads(x) for x in recs.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 8

    run = summary["run"]
    assert re.fullmatch(r"[0-9a-f]{12}", run["id"])
    assert before <= run["started_epoch_s"] <= after
    started = datetime.fromisoformat(run["started_at"])
    assert started.utcoffset() is not None and started.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs(started.timestamp() - run["started_epoch_s"]) < 0.001  # same instant, ms ISO

    for r in records:
        assert r["sent_request_id"] == f"lt-{run['id']}-{r['index']}"
        assert r["request_id"] == r["sent_request_id"]  # the gateway kept the client's id
        assert run["started_epoch_s"] <= r["sent_at"] <= after
        assert r["sent_at"] == pytest.approx(run["started_epoch_s"] + r["sent_s"], abs=1e-6)
    assert {r["request_id"] for r in records} == logged_ids(caplog)


async def test_an_error_answer_has_the_id_and_a_refused_connection_only_the_sent_one(
    gateway_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="loragate.gateway")
    req = WorkloadRequest(t_s=0.0, adapter="no-such-adapter", rank=8, prompt_tokens=4, max_tokens=2)
    cfg = OpenLoopConfig(base_url=gateway_url + "/v1", base_model=BASE, request_timeout_s=10.0)
    [answered] = await run_open_loop(cfg, [req])
    assert answered.status == 404
    assert answered.request_id == answered.sent_request_id == f"lt-{cfg.run_id}-0"
    assert any(answered.request_id in rec.getMessage() for rec in caplog.records)

    before = time.time()
    start = RunStart.now()
    refused = OpenLoopConfig(
        base_url=f"http://127.0.0.1:{unused_port()}/v1", base_model=BASE, request_timeout_s=10.0
    )
    [lost] = await run_open_loop(refused, [req], started=start)
    assert lost.error_type == "connect"
    assert lost.request_id is None
    assert lost.sent_request_id == f"lt-{refused.run_id}-0"
    assert refused.run_id != cfg.run_id
    assert before <= start.epoch_s <= lost.sent_at <= time.time()
