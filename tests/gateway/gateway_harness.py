"""Test upstreams for the gateway: a scripted vLLM-like replica on a real loopback socket that
can also misbehave on purpose (hang, die before answering, die mid-stream), plus helpers to
build configs and run a gateway in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import openai
import pydantic
from aiohttp import web

from loragate.core.config import GatewayConfig, config_from_mapping
from loragate.gateway import RunningGateway, running_gateway
from vllm_stub import StubVllm, vllm_error

BASE = "tiny-llama"


class ScriptedReplica(StubVllm):
    """vLLM 0.32's API surface, answering instantly. ``mode`` changes how completions behave:
    ``ok``, ``hang`` (never answers), ``drop`` (closes the connection before answering),
    ``die_mid_stream`` (sends two SSE events, then drops the connection). ``raw_answer``, if
    set, is written to the socket as the whole answer (bytes exactly as given: broken framing,
    a body cut short; a list is written piece by piece, 10 ms apart), then the connection is
    closed."""

    runner: web.AppRunner  # its server, set by serving_replicas (cleanup() takes it down)

    def __init__(self, name: str) -> None:
        super().__init__(BASE)  # health, /v1/models and the admin API with vLLM's answers
        self.name = name
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.stream_gate: asyncio.Event | None = None  # if set, hold the stream after event 1
        self.head_gate: asyncio.Event | None = None  # if set, hold the stream after its head
        self.answer_gate: asyncio.Event | None = None  # if set, hold non-streaming answers
        self.raw_answer: bytes | list[bytes] | None = None
        self.cancelled = 0  # completions whose client (the gateway) went away mid-answer
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_post("/v1/chat/completions", self._completions)

    async def _metrics(self, _: web.Request) -> web.Response:
        text = (
            f'vllm:num_requests_running{{engine="0",model_name="{BASE}"}} 0.0\n'
            f'vllm:num_requests_waiting{{engine="0",model_name="{BASE}"}} 0.0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._answer(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        model = body.get("model", BASE)
        if model != BASE and model not in self.adapters:
            return vllm_error(
                404,
                f"The model `{model}` does not exist. Valid aliases: {BASE}.",
                "NotFoundError",
                "model",
            )
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "drop":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        if self.raw_answer is not None:
            assert request.transport is not None
            pieces = [self.raw_answer] if isinstance(self.raw_answer, bytes) else self.raw_answer
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(0.01)
                request.transport.write(piece)
            request.transport.close()  # after the bytes are out
            await asyncio.sleep(3600)
        chat = request.path.endswith("/chat/completions")
        if not _streams(body):
            if self.answer_gate is not None:
                await self.answer_gate.wait()
            return web.json_response(_answer(model, chat, self.name))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        if self.head_gate is not None:
            await self.head_gate.wait()
        for i, piece in enumerate((" one", " two", " three")):
            await resp.write(b"data: " + json.dumps(_chunk(model, chat, piece)).encode() + b"\n\n")
            if i == 0 and self.stream_gate is not None:
                await self.stream_gate.wait()
            if i == 1 and self.mode == "die_mid_stream":
                assert request.transport is not None
                request.transport.abort()
                await asyncio.sleep(3600)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _streams(body: dict[str, Any]) -> bool:
    """Whether vLLM streams its answer: its pydantic model reads ``stream`` in lax mode
    ("true", 1 and "yes" stream; "false" does not)."""
    return bool(pydantic.TypeAdapter(bool | None).validate_python(body.get("stream")))


def _answer(model: str, chat: bool, replica: str) -> dict[str, Any]:
    usage = {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": f"hi from {replica}"},
            "finish_reason": "length",
        }
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                "choices": [choice], "usage": usage}  # fmt: skip
    choice = {"index": 0, "text": f"hi from {replica}", "finish_reason": "length"}
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
            "choices": [choice], "usage": usage}  # fmt: skip


def _chunk(model: str, chat: bool, piece: str) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": model, "choices": [choice]}  # fmt: skip
    choice = {"index": 0, "text": piece, "finish_reason": None}
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
            "choices": [choice]}  # fmt: skip


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[tuple[str, web.AppRunner]]:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", runner
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def gateway_in_background(
    config: GatewayConfig, **options: Any
) -> AsyncIterator[tuple[RunningGateway, asyncio.Event, asyncio.Task[None]]]:
    """``running_gateway(config, port=0, **options)`` in a task of its own, so that the test
    goes on while it shuts down: setting the event starts the shutdown (the task's next step,
    before the loop polls any socket again); the task ends when the shutdown is over."""
    started: asyncio.Future[RunningGateway] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def run() -> None:
        async with running_gateway(config, port=0, **options) as gw:
            started.set_result(gw)
            await stop.wait()

    task = asyncio.create_task(run())
    try:
        await asyncio.wait({started, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # start-up failed: raise its error
        yield started.result(), stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


@contextlib.asynccontextmanager
async def openai_client(url: str, key: str = "none") -> AsyncIterator[openai.AsyncOpenAI]:
    """The reference client for a gateway at ``url``: no retries, so a test sees every failure;
    the timeout only keeps a broken server from hanging the test. Only ``async with`` (or an
    exit stack) gives the client, and closes it with its connections: a client left open is
    finalized during some later test, which then fails (see ``resource_leaks.py``)."""
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=key, max_retries=0, timeout=30.0
    ) as client:
        yield client


async def wait_until(predicate: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``predicate`` every 50 ms until it is true; fail naming ``what`` after ``timeout_s``
    (a hang guard, not a timing assertion)."""
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def gateway_config(urls: list[str], **sections: Any) -> GatewayConfig:
    """A config for ``urls`` (replica ids r0, r1, ...) with fast polling, merged with
    ``sections`` (top-level keys of the YAML document)."""
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": f"r{i}", "url": u} for i, u in enumerate(urls)],
        "adapters": [{"name": f"lora-{i}", "path": f"/loras/lora-{i}"} for i in range(4)],
        "poller": {"interval_s": 3600},  # tests poll explicitly unless they say otherwise
    }
    doc.update(sections)
    return config_from_mapping(doc)


class ServeProcess:
    """A ``loragate serve --config PATH`` subprocess on a free loopback port (see
    :func:`serve_process`); its log (stderr) is read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.url = ""

    async def wait_for_log(self, pattern: str, *, max_lines: int = 100) -> re.Match[str]:
        """The first of the next ``max_lines`` log lines matching ``pattern`` (bounded)."""
        assert self.proc.stderr is not None
        for _ in range(max_lines):
            line = (await asyncio.wait_for(self.proc.stderr.readline(), timeout=30)).decode()
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no log line matching {pattern!r}")


@contextlib.asynccontextmanager
async def serve_process(config_path: Path, *args: str) -> AsyncIterator[ServeProcess]:
    """Start ``loragate serve`` on 127.0.0.1, port 0 (``args``: more options, e.g.
    ``--log-level DEBUG``); ``url`` comes from its start-up log line. Killed on exit if it is
    still running (a test that stops it checks the exit code itself)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loragate.cli", "serve", "--config", str(config_path),
        "--host", "127.0.0.1", "--port", "0", *args,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    serve = ServeProcess(proc)
    try:
        serve.url = (await serve.wait_for_log(r"listening on (http://\S+)")).group(1)
        yield serve
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


class StopsListening(ScriptedReplica):
    """A scripted replica that can stop listening as vLLM's server (uvicorn) does on SIGTERM
    (:meth:`stop_listening`): its listening socket and its idle keep-alive connections (the
    gateway's polls use them) close; the connections in ``busy`` (a subclass adds those with
    a call in progress) stay open."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.busy: set[asyncio.BaseTransport] = set()

    async def stop_listening(self) -> None:
        runner = self.runner
        for site in list(runner.sites):
            await site.stop()
        assert runner.server is not None
        for handler in runner.server.connections:
            transport = handler.transport
            if transport is not None and transport not in self.busy:
                transport.close()


class PickyReplica(ScriptedReplica):
    """Refuses to load the adapters named in ``refuse`` with vLLM's 400 for a rank above its
    ``--max-lora-rank``; counts the refusals."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.refuse: set[str] = set()
        self.refused = 0

    async def _load(self, request: web.Request) -> web.Response:
        name = (await request.json()).get("lora_name")
        if name in self.refuse:
            self.load_calls += 1
            self.refused += 1
            return vllm_error(
                400, f"LoRA rank 16 is greater than max_lora_rank 8 ({name})", "BadRequestError"
            )
        return await super()._load(request)


_Replica = TypeVar("_Replica", bound=ScriptedReplica)


@contextlib.asynccontextmanager
async def serving_replicas(
    make: Callable[[str], _Replica], n: int = 2
) -> AsyncIterator[list[_Replica]]:
    """``n`` replicas ``make("r0")``, ``make("r1")``.. serving on loopback, each with its
    ``url`` and its ``runner`` (``runner.cleanup()`` takes one down); all stopped at the end."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i in range(n):
            rep = make(f"r{i}")
            rep.url, rep.runner = await stack.enter_async_context(serving(rep.app))
            out.append(rep)
        yield out


def picky_replicas(n: int = 2) -> contextlib.AbstractAsyncContextManager[list[PickyReplica]]:
    """``n`` picky replicas ``r0``.. serving on loopback."""
    return serving_replicas(PickyReplica, n)
