"""Open-loop load generation against any OpenAI-compatible URL.

Requests are sent at their scheduled times (``WorkloadRequest.t_s`` after the start) whether
or not earlier ones have finished, as real clients do; a concurrency cap bounds what one
process keeps in flight, and a deadline bounds the run. Requests are streamed (unless
``OpenLoopConfig.stream`` is False) so the time to first token is measured on the client side;
a result is recorded for every request sent, errors included (with an ``error_type``: ``http``,
``timeout``, ``connect``, ``disconnected``, ``stream_error``, ``answer_error``, ``aborted``,
``protocol``, ``client``, ``deadline`` or ``interrupted``), so nothing is lost silently, the
requests in flight when the run is cancelled included. How answers are read, and output tokens
counted when a server sends no usage: :mod:`loragate.loadtest.answers`.

A loragate gateway names the replica that served each request in its ``X-Loragate-Replica``
answer header (errors included); ``RequestResult.replica`` keeps it (None when the target sends
no such header, e.g. vLLM itself, or no answer arrived).

Joining the results to a gateway's logs: every request is sent with its own ``X-Request-Id``,
``lt-<run id>-<index>`` (``OpenLoopConfig.run_id``: random per run), kept as
``RequestResult.sent_request_id``; ``RequestResult.request_id`` is the ``X-Request-Id`` of the
answer (a loragate gateway puts one on every answer, errors included, and keeps a client's id
when it is 1-128 printable ASCII characters without spaces, as these are: the two are equal,
and the gateway's log lines name the request by it). A request without an answer (a refused
connection, a timeout) has no ``request_id``, but its ``sent_request_id`` is what the gateway
logged if it received it. Times: ``scheduled_s`` and ``sent_s`` are offsets from the run's
start (:class:`RunStart`), ``sent_at`` the wall-clock send time (Unix epoch seconds).

``OpenLoopConfig.adapter_map`` renames the workload's adapters to models the target serves
(``loragate loadtest`` maps a spec's ``adapter-000``... onto the adapters a fleet lists).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp

from loragate.loadtest.answers import StreamReading, TokensSource, error_message, read_json
from loragate.workload.generator import WorkloadRequest

# Frequent short English words; with a leading space each is one token in common BPE
# vocabularies (Llama, GPT, Qwen; even the bundled tiny-llama's 1024-token one) and in the
# simulated replica's synthetic tokenizer, so a prompt of N of them is ~N tokens everywhere.
PROMPT_WORDS = (
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "from", "at", "which", "but", "have", "an",
    "were", "their", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when",
    "will", "would", "who", "so", "no", "she", "other", "its", "may", "these", "than", "time",
    "into", "only", "some", "could", "them", "two", "first", "what", "do", "my", "up", "out",
    "about",
)  # fmt: skip

# The answer header in which a loragate gateway names the replica that served the request.
REPLICA_HEADER = "X-Loragate-Replica"
# The request id header: sent with every request, read from every answer.
REQUEST_ID_HEADER = "X-Request-Id"


@dataclass(frozen=True, slots=True)
class RunStart:
    """When a run started, on both clocks: ``perf`` (``time.perf_counter``: the offsets
    ``scheduled_s`` and ``sent_s`` count from it) and ``epoch_s`` (``time.time``: joins the
    run with other logs)."""

    perf: float
    epoch_s: float

    @classmethod
    def now(cls) -> RunStart:
        return cls(perf=time.perf_counter(), epoch_s=time.time())

    def epoch_of(self, perf: float) -> float:
        """The wall-clock time (epoch seconds) of the ``perf_counter`` reading ``perf``."""
        return self.epoch_s + (perf - self.perf)

    def iso(self) -> str:
        """The start as ISO-8601 UTC, to the millisecond (``2026-11-28T19:40:49.123Z``)."""
        when = datetime.fromtimestamp(self.epoch_s, UTC)
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_run_id() -> str:
    """A random run id (12 hex digits), the middle of every request id a run sends."""
    return secrets.token_hex(6)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestResult:
    """The outcome of one request as the client saw it."""

    index: int
    adapter: str | None  # the workload's adapter (None: the base model)
    endpoint: str
    scheduled_s: float  # offset from the start of the run
    sent_s: float
    status: int  # HTTP status; 0 when no response arrived
    ttft_s: float | None  # None: no output, or a JSON answer (not streamed)
    latency_s: float
    output_tokens: int
    # "usage": the server's count; "chunks" / "words": estimated (it sent no usage); "none"
    tokens_source: TokensSource = "none"
    streamed: bool = False  # the answer came as an SSE stream (else one JSON object)
    finish_reason: str | None = None
    error: str | None = None
    error_type: str | None = None  # see the module docstring; None when ok
    model: str = ""  # the ``model`` the request named (after ``adapter_map``)
    prompt_tokens: int = 0  # the workload's prompt length (words sent, one token each)
    max_tokens: int = 0
    replica: str | None = None  # the gateway's X-Loragate-Replica header; None: not sent
    request_id: str | None = None  # the answer's X-Request-Id; None: no answer, or none in it
    sent_request_id: str | None = None  # the X-Request-Id sent (lt-<run id>-<index>)
    sent_at: float = 0.0  # when it was sent: Unix epoch seconds (wall clock)

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenLoopConfig:
    base_url: str  # e.g. "http://127.0.0.1:8080/v1"
    base_model: str
    api_key: str | None = None
    # model -> the API key its requests are sent with (``--api-keys``); absent: ``api_key``
    api_keys: Mapping[str, str] = field(default_factory=dict)
    max_concurrency: int = 256
    deadline_s: float = 120.0  # hard stop of the whole run, from its start
    request_timeout_s: float = 60.0
    chat_every: int = 3  # every n-th request uses /chat/completions (0: never)
    stream: bool = True  # stream answers
    stream_usage: bool = True  # ask a stream for usage (stream_options.include_usage)
    ignore_eos: bool = True  # vLLM's extension: outputs of exactly max_tokens
    # workload adapter -> model to name instead (absent: the adapter's own name)
    adapter_map: Mapping[str, str] = field(default_factory=dict)
    # chat requests bound their output with max_completion_tokens (OpenAI's newer name, which
    # its reasoning models require) instead of max_tokens; /completions knows only max_tokens
    max_completion_tokens: bool = False
    proxy: str | None = None  # an HTTP proxy to send every request through
    # the run's id: request ``index`` is sent with ``X-Request-Id: lt-<run_id>-<index>``
    run_id: str = field(default_factory=new_run_id)


def sent_request_id(cfg: OpenLoopConfig, index: int) -> str:
    """The ``X-Request-Id`` request ``index`` of the run is sent with."""
    return f"lt-{cfg.run_id}-{index}"


def model_of(cfg: OpenLoopConfig, adapter: str | None) -> str:
    """The ``model`` a request for ``adapter`` (None: the base model) names."""
    if adapter is None:
        return cfg.base_model
    return cfg.adapter_map.get(adapter, adapter)


def prompt_of(n_tokens: int, index: int) -> str:
    """A prompt of ``n_tokens`` of :data:`PROMPT_WORDS`, each with a leading space (so each is
    the same token wherever it stands, the first one too)."""
    n = len(PROMPT_WORDS)
    return "".join(" " + PROMPT_WORDS[(index + i) % n] for i in range(max(1, n_tokens)))


def request_body(cfg: OpenLoopConfig, req: WorkloadRequest, index: int) -> tuple[str, bytes]:
    """The endpoint path and JSON body for one workload request."""
    chat = bool(cfg.chat_every) and index % cfg.chat_every == cfg.chat_every - 1
    bound = "max_completion_tokens" if chat and cfg.max_completion_tokens else "max_tokens"
    common: dict[str, object] = {
        "model": model_of(cfg, req.adapter),
        bound: int(req.max_tokens),
        "temperature": 0,
        "stream": cfg.stream,
    }
    if cfg.stream and cfg.stream_usage:  # vLLM refuses stream_options without stream
        common["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        common["ignore_eos"] = True
    prompt = prompt_of(int(req.prompt_tokens), index)
    if chat:
        body = {**common, "messages": [{"role": "user", "content": prompt}]}
        return "/chat/completions", json.dumps(body).encode()
    return "/completions", json.dumps({**common, "prompt": prompt}).encode()


async def _send(
    session: aiohttp.ClientSession,
    cfg: OpenLoopConfig,
    req: WorkloadRequest,
    index: int,
    start: RunStart,
) -> RequestResult:
    endpoint, body = request_body(cfg, req, index)
    sent_id = sent_request_id(cfg, index)
    headers = {"Content-Type": "application/json", REQUEST_ID_HEADER: sent_id}
    key = cfg.api_keys.get(model_of(cfg, req.adapter), cfg.api_key)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    sent = time.perf_counter()
    stream = StreamReading(started=sent)
    streamed = False
    ttft: float | None = None
    tokens = 0
    source: TokensSource = "none"
    finish_reason: str | None = None
    status = 0
    replica: str | None = None
    request_id: str | None = None
    error: str | None = None
    error_type: str | None = None
    try:
        async with session.post(cfg.base_url + endpoint, data=body, headers=headers) as resp:
            status = resp.status
            replica = resp.headers.get(REPLICA_HEADER) or None
            request_id = resp.headers.get(REQUEST_ID_HEADER) or None
            if status != 200:
                error, error_type = _error_message(await resp.read(), status), "http"
            elif resp.content_type == "application/json":
                answer = read_json(await resp.read())
                tokens, source = answer.output_tokens, answer.tokens_source
                finish_reason, error, error_type = (
                    answer.finish_reason,
                    answer.error,
                    answer.error_type,
                )
            else:
                streamed = True
                async for raw in resp.content:
                    if not stream.feed(raw, time.perf_counter()):
                        break
                stream.end()
    except TimeoutError:
        error = f"no complete answer within {cfg.request_timeout_s:g} s"
        error_type = "timeout"
    except aiohttp.ClientConnectorError as exc:
        error, error_type = f"{type(exc).__name__}: {exc}", "connect"
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        error, error_type = f"{type(exc).__name__}: {exc}", "disconnected"
    except aiohttp.ClientError as exc:
        error, error_type = f"{type(exc).__name__}: {exc}", "client"
    except (ValueError, TypeError) as exc:  # not JSON, or not the OpenAI answer's shape
        error, error_type = f"{type(exc).__name__}: {exc}", "protocol"
    if streamed:
        ttft, finish_reason = stream.first_output_s, stream.finish_reason
        tokens, source = stream.tokens()
        if error is None:
            error, error_type = stream.error, stream.error_type
    return RequestResult(
        index=index,
        adapter=req.adapter,
        endpoint=endpoint,
        scheduled_s=req.t_s,
        sent_s=sent - start.perf,
        status=status,
        ttft_s=ttft,
        latency_s=time.perf_counter() - sent,
        output_tokens=tokens,
        tokens_source=source,
        streamed=streamed,
        finish_reason=finish_reason,
        error=error,
        error_type=error_type,
        model=model_of(cfg, req.adapter),
        prompt_tokens=int(req.prompt_tokens),
        max_tokens=int(req.max_tokens),
        replica=replica,
        request_id=request_id,
        sent_request_id=sent_id,
        sent_at=start.epoch_of(sent),
    )


def _error_message(body: bytes, status: int) -> str:
    message = error_message(body)
    return f"HTTP {status}: {body[:200]!r}" if message is None else message


async def run_open_loop(
    cfg: OpenLoopConfig,
    requests: Iterable[WorkloadRequest],
    *,
    on_result: Callable[[RequestResult], None] | None = None,
    started: RunStart | None = None,
) -> list[RequestResult]:
    """Send ``requests`` at their scheduled offsets until they run out or the deadline passes.

    Requests still scheduled after the deadline are not sent; requests in flight at the
    deadline are cancelled and recorded as errors (``deadline``). When the run itself is
    cancelled (Ctrl-C under ``asyncio.run``, an outer timeout), the requests in flight are
    cancelled and awaited, each recorded (``interrupted``, passed to ``on_result``) before the
    HTTP session closes and the cancellation goes on. ``started``: the run's start (offsets
    count from it; default: now).
    """
    results: list[RequestResult] = []
    slots = asyncio.Semaphore(cfg.max_concurrency)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency)
    run_start = RunStart.now() if started is None else started
    start = run_start.perf
    deadline = start + cfg.deadline_s
    pending: dict[asyncio.Task[RequestResult], tuple[int, WorkloadRequest, float]] = {}
    # What a request task cancelled from here on is recorded as (the run's cancellation
    # unless the deadline came first).
    ending = _INTERRUPTED

    def finished(task: asyncio.Task[RequestResult]) -> None:
        slots.release()
        index, req, sent_s = pending.pop(task)
        if task.cancelled():
            error, error_type = ending
            result = _cancelled_result(
                cfg, run_start, index, req, sent_s, time.perf_counter() - start,
                error=error, error_type=error_type,
            )  # fmt: skip
        elif (exc := task.exception()) is not None:
            # an error _send does not turn into a result: the result says it, not the loop
            result = _cancelled_result(
                cfg, run_start, index, req, sent_s, time.perf_counter() - start,
                error=f"{type(exc).__name__}: {exc}", error_type="client",
            )  # fmt: skip
        else:
            result = task.result()
        results.append(result)
        if on_result is not None:
            on_result(result)

    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, proxy=cfg.proxy
    ) as session:
        try:
            for index, req in enumerate(requests):
                due = start + req.t_s
                if due >= deadline:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not await _slot(slots, deadline):  # every slot still taken at the deadline
                    break
                task = asyncio.create_task(_send(session, cfg, req, index, run_start))
                pending[task] = (index, req, time.perf_counter() - start)
                task.add_done_callback(finished)
            if pending:
                remaining_s = max(0.0, deadline - time.perf_counter())
                await asyncio.wait(list(pending), timeout=remaining_s)
            ending = _DEADLINE
        finally:  # the deadline passed, or the run was cancelled: end what is in flight first
            await _cancel_all(list(pending))
    results.sort(key=lambda r: r.index)
    return results


_DEADLINE = ("cancelled at the run's deadline", "deadline")
_INTERRUPTED = ("the run was interrupted before the answer ended", "interrupted")


async def _slot(slots: asyncio.Semaphore, deadline: float) -> bool:
    """Take a slot of ``slots``; False (none taken) if none is free before ``deadline``."""
    if not slots.locked():
        await slots.acquire()
        return True
    try:
        await asyncio.wait_for(slots.acquire(), timeout=max(0.0, deadline - time.perf_counter()))
    except TimeoutError:
        return False
    return True


async def _cancel_all(tasks: list[asyncio.Task[RequestResult]]) -> None:
    """Cancel ``tasks`` and wait until each has ended (its done-callback has recorded it)."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


def _cancelled_result(
    cfg: OpenLoopConfig,
    start: RunStart,
    index: int,
    req: WorkloadRequest,
    sent_s: float,
    now_s: float,
    *,
    error: str = "cancelled at the run's deadline",
    error_type: str = "deadline",
) -> RequestResult:
    return RequestResult(
        index=index,
        adapter=req.adapter,
        endpoint="",
        scheduled_s=req.t_s,
        sent_s=sent_s,
        status=0,
        ttft_s=None,
        latency_s=now_s - sent_s,
        output_tokens=0,
        error=error,
        error_type=error_type,
        model=model_of(cfg, req.adapter),
        prompt_tokens=int(req.prompt_tokens),
        max_tokens=int(req.max_tokens),
        sent_request_id=sent_request_id(cfg, index),
        sent_at=start.epoch_s + sent_s,
    )
