"""What ``loragate loadtest`` says while it starts: the ServeGen trace it reads (seconds for a
large one), how many requests the run holds, and a start-up request the target is slow to
answer (GET /v1/models, POST /tokenize), so a silent wait is never unexplained.

Targets on loopback: a simulated vLLM replica, and a small aiohttp server whose ``/tokenize`` or
``/v1/models`` does not answer until the test lets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from loragate.cli import main

BASE = "tiny-llama"

SPEC = """\
name: small
seed: 2
duration_s: 5
adapters: {count: 1}
arrivals: {process: poisson, rate_rps: 4}
lengths: {prompt: 8, output: 2}
"""

TRACE_HEADER = "client_id,window_start_s,rate_rps,iat_cv,iat_dist,dist_param1,dist_param2\n"


async def loadtest(*argv: str) -> int:
    return await asyncio.to_thread(main, ["loadtest", "--progress-s", "0", *argv])


async def test_a_servegen_spec_says_it_reads_the_trace_and_how_many_requests_the_run_holds(
    replica_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.csv.gz"
    rows = [f"{c},{w * 600},1.0,1.0,Gamma,0.5,1.0\n" for c in (1, 2) for w in range(2)]
    with gzip.open(trace, "wt") as fh:
        fh.writelines([TRACE_HEADER, *rows])
    spec = tmp_path / "sg.yaml"
    spec.write_text(
        "name: sg\nseed: 1\nduration_s: 600\nadapters: {count: 2}\n"
        f"arrivals: {{process: servegen, servegen: {{file: {trace}}}}}\n"
        "lengths: {prompt: 8, output: 2}\n",
        encoding="utf-8",
    )
    code = await loadtest(
        "--url", replica_url, "--workload", str(spec), "--base-only", "--max-requests", "2"
    )
    err = capsys.readouterr().err.splitlines()
    assert code == 0, err
    size_mb = trace.stat().st_size / 1e6
    said = (
        f"loragate loadtest: sg: reading the ServeGen trace {trace} ({size_mb:.1f} MB) "
        "for 2 clients"
    )
    assert said in err
    # said before anything that needs the trace read: the mapping and the run's line
    assert err.index(said) < next(i for i, x in enumerate(err) if "offered for" in x)
    # 2 clients x 1 req/s x 600 s
    assert any("offered for 600 s (about 1,200 requests), at most 2 requests" in x for x in err)


async def test_a_spec_without_a_trace_says_no_trace_line(
    replica_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "small.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    code = await loadtest(
        "--url", replica_url, "--workload", str(spec), "--base-only", "--max-requests", "2"
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "ServeGen" not in err
    assert "small: 4 req/s offered for 5 s (about 20 requests), at most 2 requests" in err


class Stalling:
    """An OpenAI server whose /tokenize or /v1/models answers only once ``release`` is set."""

    def __init__(self, stalled: str) -> None:
        self.stalled = stalled
        self.release = asyncio.Event()

    async def _maybe_stall(self, path: str) -> None:
        if path == self.stalled:
            await self.release.wait()

    async def models(self, request: web.Request) -> web.Response:
        await self._maybe_stall("/v1/models")
        return web.json_response({"object": "list", "data": [{"id": BASE, "object": "model"}]})

    async def tokenize(self, request: web.Request) -> web.Response:
        await self._maybe_stall("/tokenize")
        return web.json_response({"count": 256, "max_model_len": 512})

    async def complete(self, request: web.Request) -> web.Response:
        usage = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
        choice = {"index": 0, "text": " a b", "finish_reason": "length"}
        return web.json_response({"id": "x", "choices": [choice], "usage": usage})


@contextlib.asynccontextmanager
async def stalling(path: str) -> AsyncIterator[tuple[str, Stalling]]:
    server = Stalling(path)
    app = web.Application()
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/tokenize", server.tokenize)
    app.router.add_post("/v1/completions", server.complete)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", server
    finally:
        server.release.set()
        await runner.cleanup()


async def test_a_slow_tokenize_is_said_while_it_is_awaited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "small.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    async with stalling("/tokenize") as (url, _):
        # /tokenize never answers: the probe gives up after --timeout-s (3 s) and the run goes on
        code = await loadtest(
            "--url", url, "--workload", str(spec), "--base-only", "--no-stream",
            "--max-requests", "2", "--timeout-s", "3",
        )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (
        f"loragate loadtest: waiting for POST {url}/tokenize (the target's count of the "
        "prompts' tokens; up to 3 s)" in captured.err
    )
    assert "no answer within 3 s" in captured.out  # the summary's prompts line
    assert "waiting for GET" not in captured.err


async def test_a_slow_model_list_is_said_before_its_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "small.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    async with stalling("/v1/models") as (url, _):
        code = await loadtest("--url", url, "--workload", str(spec), "--timeout-s", "3")
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    waiting = (
        f"loragate loadtest: waiting for GET {url}/v1/models (what the target serves; up to 3 s)"
    )
    assert waiting in err
    assert err.index(waiting) < next(i for i, x in enumerate(err) if "error:" in x)
