"""`loragate loadtest` against a real gateway in front of simulated vLLM replicas, on loopback.

The gateway has tenants: ``sk-acme`` may use lora-0 and lora-1, lora-2 belongs to another
tenant, so ``GET /v1/models`` with acme's key lists exactly the fleet the workload must be mapped
onto. The command runs in a worker thread (its own event loop, as from the shell) while the
gateway serves in the test's loop; one case runs it as a subprocess, as a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from loadtest_files import write_spec

from loragate.cli import main
from loragate.core.config import config_from_mapping
from loragate.gateway.runner import running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica

BASE = "tiny-llama"
KEY = "sk-acme"

# 6 adapters (adapter-000 the most popular), 20% base model, Poisson 40 req/s: 3 s of arrivals
# hold ~120 requests; the runs below take the first 30 (--max-requests bounds them).
SPEC = """\
name: tiny
seed: 5
duration_s: 3
adapters:
  count: 6
  popularity: {kind: zipf, s: 1.2}
  base_fraction: 0.2
arrivals: {process: poisson, rate_rps: 40}
lengths: {prompt: 16, output: {kind: uniform, min: 2, max: 8}}
"""


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return write_spec(tmp_path, SPEC)


@pytest.fixture
async def gateway_url(tmp_path: Path) -> AsyncIterator[str]:
    """Two twin replicas (2 GPU slots each) behind a gateway with two tenants."""
    adapters = [
        {
            "name": f"lora-{i}",
            "path": write_adapter_folder(str(tmp_path / f"lora-{i}"), rank=8),
            "rank": 8,
            "tenants": ["acme"] if i < 2 else ["globex"],
        }
        for i in range(3)
    ]
    async with contextlib.AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(
                run_replica(
                    ReplicaConfig(served_model_name=BASE, enable_lora=True, max_loras=2, seed=i),
                    host="127.0.0.1",
                    port=0,
                )
            )
            for i in range(2)
        ]
        config = config_from_mapping(
            {
                "base_model": BASE,
                "replicas": [{"id": f"r{i}", "url": r.url} for i, r in enumerate(replicas)],
                "adapters": adapters,
                "tenants": [
                    {"name": "acme", "api_keys": [KEY]},
                    {"name": "globex", "api_keys": ["sk-globex"]},
                ],
            }
        )
        gateway = await stack.enter_async_context(running_gateway(config, host="127.0.0.1", port=0))
        yield gateway.url


async def loadtest(*argv: str) -> int:
    """``loragate loadtest ARGV`` in a worker thread: its own asyncio.run, as from the shell."""
    return await asyncio.to_thread(main, ["loadtest", "--progress-s", "0", *argv])


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def listed_adapters(url: str, key: str) -> list[str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as resp,
    ):
        doc = await resp.json()
    return [m["id"] for m in doc["data"] if m.get("parent")]


async def test_a_run_maps_the_spec_onto_the_fleet_and_accounts_for_every_request(
    gateway_url: str, spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json, out_records = tmp_path / "summary.json", tmp_path / "records.jsonl"
    code = await loadtest(
        "--url", gateway_url, "--workload", str(spec), "--api-key", KEY,
        "--max-requests", "30", "--timeout-s", "30",
        "--json", str(out_json), "--results", str(out_records),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(out_json.read_text(encoding="utf-8"))
    req = summary["requests"]
    assert req["scheduled"] == req["sent"] == req["ok"] == 30
    assert req["failed"] == req["unanswered"] == 0
    assert req["by_status"] == {"200": 30}
    assert sum(row["requests"] for row in summary["models"]["top"]) == 30
    assert summary["output_tokens"] > 0
    assert summary["ttft_ms"]["p50"] is not None
    assert summary["ttft_ms"]["p50"] <= summary["e2e_ms"]["p50"]

    rows = records(out_records)
    assert sorted(r["index"] for r in rows) == list(range(30))
    assert all(r["ok"] and r["status"] == 200 for r in rows)
    assert sum(r["output_tokens"] for r in rows) == summary["output_tokens"]
    # The gateway relays vLLM's usage chunk: every count is the server's, none estimated.
    assert {r["tokens_source"] for r in rows} == {"usage"}
    assert summary["answers"]["without_usage"] == 0
    assert "no usage" not in captured.out
    # The spec's adapters were sent as the fleet's (acme's two, never globex's lora-2), the most
    # popular one as the first listed; base-model requests named the base model.
    fleet = await listed_adapters(gateway_url, KEY)
    assert sorted(fleet) == ["lora-0", "lora-1"]
    assert {r["model"] for r in rows if r["adapter"] is not None} <= set(fleet)
    assert {r["model"] for r in rows if r["adapter"] == "adapter-000"} == {fleet[0]}
    assert {r["model"] for r in rows if r["adapter"] == "adapter-001"} == {fleet[1]}
    assert {r["model"] for r in rows if r["adapter"] is None} == {BASE}
    assert any(r["adapter"] is None for r in rows)
    assert "adapter-000 -> " + fleet[0] in captured.err
    assert "requests  sent 30, ok 30, failed 0" in captured.out


async def test_a_wrong_api_key_is_counted_as_401s_on_every_request(
    gateway_url: str, spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_records = tmp_path / "records.jsonl"
    code = await loadtest(
        "--url", gateway_url, "--workload", str(spec), "--api-key", "sk-wrong",
        "--models", "lora-0", "--base-model", BASE, "--max-requests", "12",
        "--json", "-", "--results", str(out_records),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    summary = json.loads(captured.out)
    req = summary["requests"]
    assert req["sent"] == req["failed"] == 12
    assert req["ok"] == 0
    assert req["by_status"] == {"401": 12}
    assert req["errors_by_type"] == {"HTTP 401": 12}
    assert [r["status"] for r in records(out_records)] == [401] * 12
    assert "12 x HTTP 401" in captured.err  # the text summary goes to stderr with --json -
    assert "Traceback" not in captured.err


async def test_a_wrong_api_key_with_models_auto_stops_before_the_run(
    gateway_url: str, spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await loadtest("--url", gateway_url, "--workload", str(spec), "--api-key", "sk-wrong")
    err = capsys.readouterr().err
    assert code == 2
    assert "/v1/models answered 401" in err
    assert "--api-key" in err
    assert "Traceback" not in err


async def test_base_only_sends_every_request_to_the_base_model(
    gateway_url: str, spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_records = tmp_path / "records.jsonl"
    code = await loadtest(
        "--url", gateway_url + "/v1/", "--workload", str(spec), "--api-key", KEY,
        "--base-only", "--max-requests", "10", "--endpoint", "chat",
        "--results", str(out_records),
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = records(out_records)
    assert len(rows) == 10
    assert {r["model"] for r in rows} == {BASE}
    assert {r["endpoint"] for r in rows} == {"/chat/completions"}
    assert any(r["adapter"] is not None for r in rows)  # adapter requests, sent to the base


async def test_a_model_the_fleet_lacks_fails_as_404s_and_exits_1(
    gateway_url: str, spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await loadtest(
        "--url", gateway_url, "--workload", str(spec), "--api-key", KEY,
        "--models", "lora-0,no-such-lora", "--max-requests", "20", "--json", "-",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "not listed by GET /v1/models: no-such-lora" in captured.err
    req = json.loads(captured.out)["requests"]
    assert req["sent"] == req["ok"] + req["failed"] == 20
    assert req["failed"] == req["by_status"]["404"] > 0
    assert req["ok"] == req["by_status"]["200"] > 0


async def test_the_error_rate_threshold_decides_the_exit_status(
    gateway_url: str, spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--url", gateway_url, "--workload", str(spec), "--api-key", KEY,
            "--models", "lora-0,no-such-lora", "--max-requests", "20"]  # fmt: skip
    assert await loadtest(*args, "--max-error-rate", "1") == 0
    assert await loadtest(*args, "--max-error-rate", "0.01") == 1
    capsys.readouterr()


async def test_an_unreachable_url_is_one_line_and_exit_2(
    spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code = await loadtest(
        "--url", url, "--workload", str(spec), "--models", "x", "--base-model", BASE
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot reach {url}/v1/models" in err
    assert "Traceback" not in err


def test_an_unreachable_url_from_the_shell_exits_2_without_a_traceback(spec: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "loadtest", "--url",
         f"http://127.0.0.1:{free_port()}", "--workload", str(spec)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "loragate loadtest: error: cannot reach" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--duration-s", "0"], "--duration-s: must be > 0"),
        (["--max-requests", "0"], "--max-requests: must be > 0"),
        (["--rate-scale", "-1"], "--rate-scale: must be > 0"),
        (["--max-error-rate", "2"], "--max-error-rate: must be in [0, 1]"),
        (["--url", "localhost:8080"], "--url must look like http://host:port"),
    ],
)
async def test_bad_flags_are_one_line_and_exit_2(
    extra: list[str], says: str, spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code = await loadtest("--url", url, "--workload", str(spec), *extra)
    err = capsys.readouterr().err
    assert code == 2
    assert says in err
    assert "Traceback" not in err


async def test_a_bad_spec_is_one_line_naming_the_key_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.replace("rate_rps: 40", "rate_rps: -4"), encoding="utf-8")
    code = await loadtest("--url", "http://127.0.0.1:1", "--workload", str(bad))
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.yaml:8:30: arrivals.rate_rps: must be > 0" in err
    assert "Traceback" not in err


async def test_ctrl_c_prints_the_summary_of_what_finished_and_exits_130(
    gateway_url: str, spec: Path, tmp_path: Path
) -> None:
    out_records = tmp_path / "records.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loragate.cli", "loadtest", "--url", gateway_url,
        "--workload", str(spec), "--api-key", KEY, "--duration-s", "600", "--rate-rps", "5",
        "--progress-s", "0", "--results", str(out_records),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(600):  # until some requests were answered (at most 60 s)
            if out_records.exists() and len(out_records.read_text().splitlines()) >= 3:
                break
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, err.decode()
    assert "Traceback" not in err.decode()
    assert "interrupted: the summary covers the requests sent so far" in err.decode()
    sent = records(out_records)
    ok = sum(1 for r in sent if r["ok"])
    assert ok >= 3
    assert all(r["ok"] or r["error_type"] == "interrupted" for r in sent)  # in flight at Ctrl-C
    assert f"requests  sent {len(sent)}, ok {ok}" in out.decode()


def test_help_documents_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["loadtest", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "exit status:" in text
    for line in ("  0    every request", "  1    requests failed", "  2    bad flags", "  130"):
        assert line in text
    assert "(default: auto)" in text
