"""`loragate loadtest` against OpenAI-compatible servers that are not vLLM, on loopback.

A small aiohttp server answers as such servers do; the model a request names chooses how:

- ``no-usage``: streams three text chunks and ``[DONE]``, ignoring ``stream_options`` (no usage
  chunk, no finish reason), as /tmp/walkc-run/nousage.py did when the load test failed on it;
- ``slow-start``: sends the chat role chunk (completions: an empty text chunk) at once and the
  first text ``SLOW_S`` later, with usage;
- ``json-only``: ignores ``stream`` and answers one JSON object without usage;
- ``cut``: two text chunks, then the body ends (no finish reason, no [DONE]);
- ``abort``: a text chunk, then ``finish_reason: "abort"`` with usage (vLLM stopping it);
- ``strict``: refuses unknown fields with 400 as OpenAI does, else streams with
  ``"usage": null`` in every chunk but the last;
- ``no-options``: refuses ``stream_options`` with 400 (as a server whose request model forbids
  unknown fields), else streams as ``no-usage`` does;
- ``error-null``: every chunk carries ``"error": null``.

The ``bare`` server has no ``GET /v1/models``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from loadtest_files import FAKE_SERVER_SPEC, summary_of, write_spec

from loragate.cli import main

BEHAVIOURS = (
    "no-usage",
    "slow-start",
    "json-only",
    "cut",
    "abort",
    "strict",
    "no-options",
    "error-null",
)
SLOW_S = 0.3
# What the strict server accepts (OpenAI's fields the load test may send).
OPENAI_FIELDS = {"model", "prompt", "messages", "max_tokens", "temperature", "stream",
                 "stream_options"}  # fmt: skip


def chunk(chat: bool, text: str | None, *, finish: str | None = None, **extra: Any) -> bytes:
    """One SSE event of a completion (``text``) or chat (``delta``) stream."""
    if chat:
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    event = {"id": "x", "object": "chunk", "model": "m", "choices": [choice], **extra}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class FakeServer:
    """The server; ``bodies`` keeps every request body by the model it named."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[dict[str, Any]]] = {b: [] for b in BEHAVIOURS}

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": b, "object": "model", "owned_by": "x"} for b in BEHAVIOURS]
        return web.json_response({"object": "list", "data": data})

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        self.bodies[model].append(body)
        chat = request.path.endswith("/chat/completions")
        if model == "json-only":
            if chat:
                choice: dict[str, Any] = {"message": {"role": "assistant", "content": "a b c d"}}
            else:
                choice = {"text": " one two three four"}
            return web.json_response({"id": "x", "choices": [{"index": 0, **choice}]})
        if model == "no-options" and "stream_options" in body:
            message = "Extra inputs are not permitted: stream_options"
            return web.json_response({"error": {"message": message}}, status=400)
        if model == "strict":
            unknown = sorted(set(body) - OPENAI_FIELDS)
            if unknown:
                message = f"Unrecognized request argument supplied: {', '.join(unknown)}"
                return web.json_response(
                    {"error": {"message": message, "type": "invalid_request_error",
                               "param": None, "code": None}},
                    status=400,
                )  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        async for event in self.events(model, chat):
            await resp.write(event)
        return resp

    async def events(self, model: str, chat: bool) -> AsyncIterator[bytes]:
        usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
        done = b"data: [DONE]\n\n"
        if model in ("no-usage", "no-options"):
            for text in "abc":
                yield chunk(chat, text)
            yield done
        elif model == "slow-start":
            yield chunk(chat, None)  # chat: the role chunk; completions: an empty text
            await asyncio.sleep(SLOW_S)
            yield chunk(chat, "x", finish="length", usage={**usage, "completion_tokens": 1})
            yield done
        elif model == "cut":
            yield chunk(chat, "a")
            yield chunk(chat, "b")
        elif model == "abort":
            yield chunk(chat, "a")
            yield chunk(chat, "", finish="abort", usage=usage)
            yield done
        elif model == "strict":
            yield chunk(chat, None, usage=None)
            yield chunk(chat, "a", usage=None)
            yield chunk(chat, "b", finish="length", usage=None)
            yield b"data: " + json.dumps({"id": "x", "choices": [], "usage": usage}).encode()
            yield b"\n\n" + done
        else:
            assert model == "error-null"
            yield chunk(chat, "a", error=None)
            yield chunk(chat, "b", finish="length", error=None)
            yield done


@contextlib.asynccontextmanager
async def serving(*, model_list: bool) -> AsyncIterator[tuple[str, FakeServer]]:
    fake = FakeServer()
    app = web.Application()
    if model_list:
        app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/v1/completions", fake.answer)
    app.router.add_post("/v1/chat/completions", fake.answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", fake
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, FakeServer]]:
    async with serving(model_list=True) as served:
        yield served


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return write_spec(tmp_path, FAKE_SERVER_SPEC)


async def loadtest(url: str, spec: Path, model: str, tmp_path: Path, *argv: str) -> int:
    """``loragate loadtest`` of 6 requests, every one naming ``model``, in a worker thread."""
    args = ["loadtest", "--progress-s", "0", "--url", url, "--workload", str(spec),
            "--base-only", "--base-model", model, "--max-requests", "6", "--timeout-s", "20",
            "--json", str(tmp_path / "summary.json"), "--results", str(tmp_path / "r.jsonl"),
            *argv]  # fmt: skip
    return await asyncio.to_thread(main, args)


def records(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


async def test_a_stream_without_usage_is_measured_and_its_tokens_counted_from_chunks(
    server: tuple[str, FakeServer], spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = server
    code = await loadtest(url, spec, "no-usage", tmp_path, "--endpoint", "mixed")
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    rows = records(tmp_path)
    assert len(rows) == 6
    assert {r["endpoint"] for r in rows} == {"/completions", "/chat/completions"}
    assert all(r["ok"] and r["streamed"] for r in rows)
    assert {(r["output_tokens"], r["tokens_source"]) for r in rows} == {(3, "chunks")}
    assert all(0 < r["ttft_s"] <= r["latency_s"] for r in rows)
    summary = summary_of(tmp_path)
    assert summary["requests"]["ok"] == 6
    assert summary["output_tokens"] == 18
    assert summary["output_tokens_by_source"] == {"chunks": 18}
    assert summary["answers"]["without_usage"] == 6
    assert summary["ttft_ms"]["p50"] is not None
    assert "18 output tokens" in captured.out
    assert "6 of 6 answers sent no usage: 18 counted as content chunks, an estimate" in captured.out
    assert captured.err.count("sent a stream without usage") == 1  # said once


async def test_ttft_is_the_first_chunk_with_output_not_the_role_chunk(
    server: tuple[str, FakeServer], spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = server
    code = await loadtest(url, spec, "slow-start", tmp_path, "--endpoint", "mixed")
    assert code == 0, capsys.readouterr().err
    rows = records(tmp_path)
    assert {r["endpoint"] for r in rows} == {"/completions", "/chat/completions"}
    # The role chunk (an empty text) came at once, the first text SLOW_S later.
    assert all(r["ttft_s"] >= SLOW_S for r in rows), [r["ttft_s"] for r in rows]
    assert {(r["output_tokens"], r["tokens_source"]) for r in rows} == {(1, "usage")}


async def test_no_stream_asks_for_json_and_counts_the_words_of_an_answer_without_usage(
    server: tuple[str, FakeServer], spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, fake = server
    code = await loadtest(url, spec, "json-only", tmp_path, "--no-stream", "--endpoint", "mixed")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    bodies = fake.bodies["json-only"]
    assert len(bodies) == 6
    assert all(b["stream"] is False and "stream_options" not in b for b in bodies)
    rows = records(tmp_path)
    assert all(r["ok"] and not r["streamed"] and r["ttft_s"] is None for r in rows)
    assert {(r["output_tokens"], r["tokens_source"]) for r in rows} == {(4, "words")}
    summary = summary_of(tmp_path)
    assert summary["output_tokens_by_source"] == {"words": 24}
    assert summary["answers"]["json"] == 6
    assert summary["ttft_ms"]["p50"] is None
    assert "24 counted as words, an estimate" in captured.out
    assert captured.err.count("sent an answer without usage") == 1
    assert "ignores stream: true" not in captured.err  # it was asked for JSON


async def test_a_json_answer_to_a_streamed_request_is_measured_without_ttft(
    server: tuple[str, FakeServer], spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = server
    code = await loadtest(url, spec, "json-only", tmp_path)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = records(tmp_path)
    assert all(r["ok"] and not r["streamed"] and r["tokens_source"] == "words" for r in rows)
    assert captured.err.count("ignores stream: true") == 1


@pytest.mark.parametrize(
    ("model", "error_type", "message"),
    [
        ("cut", "protocol", "stream ended without [DONE] or a finish reason (cut short)"),
        ("abort", "aborted", "the server stopped the request (finish_reason abort)"),
    ],
)
async def test_a_stream_cut_short_or_aborted_is_a_failure(
    server: tuple[str, FakeServer],
    spec: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
    error_type: str,
    message: str,
) -> None:
    url, _ = server
    code = await loadtest(url, spec, model, tmp_path)
    captured = capsys.readouterr()
    assert code == 1
    rows = records(tmp_path)
    assert {(r["ok"], r["error_type"], r["error"]) for r in rows} == {(False, error_type, message)}
    assert summary_of(tmp_path)["requests"]["errors_by_type"] == {error_type: 6}
    assert f"6 x {error_type}: {message}" in captured.out


async def test_a_server_that_refuses_ignore_eos_gets_a_hint_and_no_ignore_eos_runs(
    server: tuple[str, FakeServer], spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, fake = server
    assert await loadtest(url, spec, "strict", tmp_path) == 1
    captured = capsys.readouterr()
    assert summary_of(tmp_path)["requests"]["by_status"] == {"400": 6}
    assert "try --no-ignore-eos" in captured.err
    assert "--no-stream" not in captured.err  # stream_options was not what it refused

    fake.bodies["strict"].clear()
    code = await loadtest(url, spec, "strict", tmp_path, "--no-ignore-eos", "--endpoint", "mixed")
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert all("ignore_eos" not in b for b in fake.bodies["strict"])
    rows = records(tmp_path)
    # "usage": null in the chunks before the last is no usage; the last chunk's is.
    assert {(r["output_tokens"], r["tokens_source"]) for r in rows} == {(2, "usage")}
    assert summary_of(tmp_path)["answers"]["without_usage"] == 0
    assert "sent no usage" not in captured.out
    assert "without usage" not in captured.err


async def test_chunks_with_a_null_error_field_are_not_errors(
    server: tuple[str, FakeServer], spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = server
    code = await loadtest(url, spec, "error-null", tmp_path)
    assert code == 0, capsys.readouterr().out
    rows = records(tmp_path)
    assert {(r["ok"], r["output_tokens"], r["finish_reason"]) for r in rows} == {
        (True, 2, "length")
    }


async def test_a_server_that_refuses_stream_options_gets_a_hint_and_runs_without(
    server: tuple[str, FakeServer], spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, fake = server
    assert await loadtest(url, spec, "no-options", tmp_path) == 1
    captured = capsys.readouterr()
    assert summary_of(tmp_path)["requests"]["by_status"] == {"400": 6}
    assert "400 answers name stream_options" in captured.err
    assert "try --no-stream-options" in captured.err

    fake.bodies["no-options"].clear()
    assert await loadtest(url, spec, "no-options", tmp_path, "--no-stream-options") == 0
    err = capsys.readouterr().err
    assert err.count("streams carry no usage without stream_options (--no-stream-options)") == 1
    assert "ignores stream_options" not in err  # it was not asked
    assert all("stream_options" not in b and b["stream"] for b in fake.bodies["no-options"])
    rows = records(tmp_path)
    assert {(r["ok"], r["output_tokens"], r["tokens_source"]) for r in rows} == {
        (True, 3, "chunks")
    }


async def test_a_target_without_a_model_list_says_how_to_name_its_models(
    spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(model_list=False) as (url, _):
        args = ["loadtest", "--progress-s", "0", "--url", url, "--workload", str(spec)]
        assert await asyncio.to_thread(main, args) == 2
        err = capsys.readouterr().err
        assert "/v1/models answered 404" in err
        assert "name its models with --models, --base-model" in err
        assert await loadtest(url, spec, "no-usage", tmp_path, "--models", "no-usage") == 0
        assert "going on with --models" in capsys.readouterr().err
