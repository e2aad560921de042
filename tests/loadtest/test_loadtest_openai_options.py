"""`loragate loadtest` against servers that want ``max_completion_tokens``, and through proxies.

The server answers as OpenAI's reasoning models do: a chat request naming ``max_tokens`` gets
400 "Unsupported parameter: 'max_tokens' ... Use 'max_completion_tokens' instead."; with
``max_completion_tokens`` it streams that many one-token chunks and the usage. It refuses
vLLM's fields as OpenAI does (the runs pass --no-ignore-eos).

The proxy is a forward HTTP proxy on loopback that sends every connection to the server,
whatever host the request names: the load test's target is ``target.invalid`` (a name that does
not resolve), so a run that succeeds went through the proxy, and one that connected directly
fails as unreachable.
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

MODEL = "o-mini"
UNSUPPORTED = (
    "Unsupported parameter: 'max_tokens' is not supported with this model. "
    "Use 'max_completion_tokens' instead."
)


class ReasoningServer:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.hosts: list[str] = []  # the Host header of every request

    async def models(self, request: web.Request) -> web.Response:
        self.hosts.append(request.headers.get("Host", ""))
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.hosts.append(request.headers.get("Host", ""))
        body = await request.json()
        self.bodies.append(body)
        if "max_tokens" in body:
            error = {"message": UNSUPPORTED, "type": "invalid_request_error",
                     "param": "max_tokens", "code": "unsupported_parameter"}  # fmt: skip
            return web.json_response({"error": error}, status=400)
        n = int(body["max_completion_tokens"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            finish = "length" if i == n - 1 else None
            choice = {"index": 0, "delta": {"content": "x"}, "finish_reason": finish}
            await resp.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        usage = {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}
        last = {"choices": [], "usage": usage}
        await resp.write(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
        return resp


class ForwardProxy:
    """Relays each connection to ``port`` on loopback; keeps each connection's request head."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.heads: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []  # both ends of every connection

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writers.append(up_writer)
            up_writer.write(head)  # absolute-form request line: aiohttp's server takes it

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[int, ReasoningServer]]:
    fake = ReasoningServer()
    app = web.Application()
    app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/v1/chat/completions", fake.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, ReasoningServer]]:
    async with serving() as served:
        yield served


@pytest.fixture
async def proxy(server: tuple[int, ReasoningServer]) -> AsyncIterator[tuple[int, ForwardProxy]]:
    forward = ForwardProxy(server[0])
    listener = await asyncio.start_server(forward.relay, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], forward
    finally:
        listener.close()
        forward.close()
        await listener.wait_closed()


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return write_spec(tmp_path, FAKE_SERVER_SPEC)


@pytest.fixture(autouse=True)
def _no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


async def loadtest(url: str, spec: Path, tmp_path: Path, *argv: str) -> int:
    """``loragate loadtest`` of 6 chat requests in a worker thread."""
    args = ["loadtest", "--progress-s", "0", "--url", url, "--workload", str(spec),
            "--base-only", "--max-requests", "6", "--timeout-s", "20", "--endpoint", "chat",
            "--no-ignore-eos", "--json", str(tmp_path / "summary.json"), *argv]  # fmt: skip
    return await asyncio.to_thread(main, args)


async def test_max_completion_tokens_names_the_bound_as_reasoning_models_want_it(
    server: tuple[int, ReasoningServer], spec: Path, tmp_path: Path
) -> None:
    port, fake = server
    code = await loadtest(f"http://127.0.0.1:{port}", spec, tmp_path, "--max-completion-tokens")
    assert code == 0
    assert len(fake.bodies) == 6
    assert all("max_tokens" not in b for b in fake.bodies)
    bounds = [b["max_completion_tokens"] for b in fake.bodies]
    assert all(2 <= n <= 8 for n in bounds)
    summary = summary_of(tmp_path)
    assert summary["requests"]["ok"] == 6
    assert summary["output_tokens"] == sum(bounds)
    assert summary["output_tokens_by_source"] == {"usage": sum(bounds)}


async def test_a_refused_max_tokens_hints_at_max_completion_tokens(
    server: tuple[int, ReasoningServer],
    spec: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port, fake = server
    code = await loadtest(f"http://127.0.0.1:{port}", spec, tmp_path)
    err = capsys.readouterr().err
    assert code == 1
    assert all("max_tokens" in b for b in fake.bodies)
    assert summary_of(tmp_path)["requests"]["errors_by_type"] == {"HTTP 400": 6}
    assert (
        "hint: 400 answers name max_tokens, which the target may not accept: try "
        "--max-completion-tokens --endpoint chat" in err
    )


async def test_max_completion_tokens_without_chat_requests_is_one_line_and_exit_2(
    spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["loadtest", "--url", "http://127.0.0.1:1", "--workload", str(spec),
            "--max-completion-tokens"]  # fmt: skip
    code = await asyncio.to_thread(main, argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "--max-completion-tokens" in err and "--endpoint chat or mixed" in err
    assert "Traceback" not in err


async def test_the_proxy_the_environment_names_carries_every_request(
    server: tuple[int, ReasoningServer],
    proxy: tuple[int, ForwardProxy],
    spec: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port, fake = server
    proxy_port, forward = proxy
    monkeypatch.setenv("HTTP_PROXY", f"http://ops:s3cret@127.0.0.1:{proxy_port}")
    url = f"http://target.invalid:{port}"
    code = await loadtest(url, spec, tmp_path, "--max-completion-tokens")
    err = capsys.readouterr().err
    assert code == 0, err
    assert summary_of(tmp_path)["requests"]["ok"] == 6
    # GET /v1/models, POST /tokenize (404 here) and the 6 requests, all to target.invalid
    assert fake.hosts == [f"target.invalid:{port}"] * 7
    assert forward.heads and all(b"Proxy-Authorization: Basic " in h for h in forward.heads)
    assert f"through the proxy http://ops:***@127.0.0.1:{proxy_port} (HTTP_PROXY;" in err
    assert "s3cret" not in err


@pytest.mark.parametrize(
    ("env", "argv"),
    [
        ({}, ["--no-proxy-env"]),
        ({"NO_PROXY": "example.com,.invalid"}, []),
        ({"no_proxy": "*"}, []),
    ],
    ids=["--no-proxy-env", "NO_PROXY suffix", "no_proxy *"],
)
async def test_a_target_the_proxy_is_bypassed_for_is_connected_directly(
    server: tuple[int, ReasoningServer],
    proxy: tuple[int, ForwardProxy],
    spec: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    argv: list[str],
) -> None:
    port, _ = server
    proxy_port, forward = proxy
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
    url = f"http://target.invalid:{port}"
    assert await loadtest(url, spec, tmp_path, "--max-completion-tokens") == 0  # proxied
    proxied = len(forward.heads)
    assert proxied > 0
    capsys.readouterr()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = await loadtest(url, spec, tmp_path, "--max-completion-tokens", *argv)
    err = capsys.readouterr().err
    assert code == 2  # direct: target.invalid does not resolve
    assert f"cannot reach {url}/v1/models" in err
    assert len(forward.heads) == proxied
    assert "through the proxy" not in err


async def test_a_loopback_target_is_never_proxied(
    server: tuple[int, ReasoningServer],
    proxy: tuple[int, ForwardProxy],
    spec: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, fake = server
    proxy_port, forward = proxy
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy_port}")
    code = await loadtest(f"http://localhost:{port}", spec, tmp_path, "--max-completion-tokens")
    assert code == 0
    assert forward.heads == []
    assert fake.hosts == [f"localhost:{port}"] * 7


async def test_a_socks_proxy_is_one_line_naming_the_variable_and_exit_2(
    spec: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    argv = ["loadtest", "--url", "http://target.invalid:9", "--workload", str(spec)]
    code = await asyncio.to_thread(main, argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "ALL_PROXY: a socks5 proxy cannot be used" in err
    assert "--no-proxy-env" in err
    assert "Traceback" not in err
