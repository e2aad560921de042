"""Which replica served each request: a loragate gateway names it in ``X-Loragate-Replica``,
the load test keeps it in every record and breaks the summary down by replica when more than one
served; a target without the header (vLLM itself) leaves it null and shows no breakdown.

Two simulated vLLM replicas behind a real gateway on loopback, routed round robin so both serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from loragate.cli import main
from loragate.core.config import config_from_mapping
from loragate.gateway.runner import running_gateway
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica

BASE = "tiny-llama"

SPEC = """\
name: replicas
seed: 5
duration_s: 3
adapters: {count: 2, base_fraction: 0.5}
arrivals: {process: poisson, rate_rps: 20}
lengths: {prompt: 8, output: 3}
"""


@pytest.fixture
async def replicas() -> AsyncIterator[list[RunningReplica]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                run_replica(ReplicaConfig(served_model_name=BASE, seed=i), host="127.0.0.1", port=0)
            )
            for i in range(2)
        ]


@pytest.fixture
async def gateway_url(replicas: list[RunningReplica]) -> AsyncIterator[str]:
    config = config_from_mapping(
        {
            "base_model": BASE,
            "replicas": [{"id": f"r{i}", "url": r.url} for i, r in enumerate(replicas)],
            "routing": "round_robin",
        }
    )
    async with running_gateway(config, host="127.0.0.1", port=0) as gateway:
        yield gateway.url


async def loadtest(url: str, tmp_path: Path) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """10 requests of :data:`SPEC` to the base model: (exit status, JSON summary, records)."""
    spec, out, recs = tmp_path / "spec.yaml", tmp_path / "summary.json", tmp_path / "rec.jsonl"
    spec.write_text(SPEC, encoding="utf-8")
    code = await asyncio.to_thread(
        main,
        ["loadtest", "--progress-s", "0", "--url", url, "--workload", str(spec), "--base-only",
         "--max-requests", "10", "--json", str(out), "--results", str(recs)],
    )  # fmt: skip
    lines = recs.read_text(encoding="utf-8").splitlines()
    return code, json.loads(out.read_text(encoding="utf-8")), [json.loads(x) for x in lines]


async def test_every_record_names_its_replica_and_the_summary_breaks_down_by_replica(
    gateway_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, summary, records = await loadtest(gateway_url, tmp_path)
    out = capsys.readouterr().out
    assert code == 0
    assert len(records) == 10
    served = Counter(r["replica"] for r in records)
    assert set(served) == {"r0", "r1"}  # round robin: both served
    rows = summary["replicas"]["rows"]
    assert summary["replicas"]["count"] == 2
    assert {row["replica"]: row["requests"] for row in rows} == dict(served)
    assert all(row["ok"] == row["requests"] and row["failed"] == 0 for row in rows)
    assert all(row["ttft_ms"]["p50"] is not None for row in rows)
    text = out.splitlines()
    header = text.index("replicas  2 served (the gateway's X-Loragate-Replica):")
    shown = {line.split()[0]: int(line.split()[1]) for line in text[header + 1 : header + 3]}
    assert shown == dict(served)


async def test_a_target_without_the_header_records_null_and_shows_no_breakdown(
    replicas: list[RunningReplica], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, summary, records = await loadtest(replicas[0].url, tmp_path)
    out = capsys.readouterr().out
    assert code == 0
    assert [r["replica"] for r in records] == [None] * 10
    assert summary["replicas"]["count"] == 0
    assert summary["replicas"]["rows"][0]["replica"] is None
    assert summary["replicas"]["rows"][0]["requests"] == 10
    assert "replicas" not in out
