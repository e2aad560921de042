"""An instant-answer, vLLM-shaped upstream for ``bench/gateway_overhead.py``.

Run as a process: ``python bench/_instant_upstream.py --replicas 2`` listens on that many
ephemeral ports of 127.0.0.1 and prints ``PORTS p0 p1 ...`` on stdout once ready; it stops on
SIGTERM/SIGINT or when its stdin closes (so it never outlives the bench).

It answers every request from precomputed bytes on a bare ``asyncio.Protocol`` (uvloop when
installed), so it costs a few µs per request and is never what a measurement sees:

* ``POST /v1/completions`` and ``POST /v1/chat/completions``: a fixed vLLM 0.32-shaped JSON body
  (``Content-Length``), or, when the body asks for ``"stream": true``, a fixed short SSE stream
  (``Transfer-Encoding: chunked``, one HTTP chunk per event: ``STREAM_EVENTS`` token events, a
  usage event and ``data: [DONE]``), all written at once.
* ``GET /health`` (200, empty), ``GET /metrics`` (a minimal vLLM page: running, waiting,
  waiting-by-reason, KV usage, ``lora_requests_info``), ``GET /v1/models`` (the base model and
  the adapter ``ADAPTER``, registered) and ``POST /v1/load_lora_adapter`` (200, plain text), so
  the gateway's poller sees a healthy replica that already has the adapter.
* anything else: 404.

HTTP/1.1 keep-alive, pipelining tolerated; request bodies must carry ``Content-Length``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import cast

BASE_MODEL = "bench-model"
ADAPTER = "bench-lora"
STREAM_EVENTS = 8

_HEAD_END = b"\r\n\r\n"


def _response(status: str, content_type: str | None, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\n"
    if content_type is not None:
        head += f"content-type: {content_type}\r\n"
    head += f"content-length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body


def _completion_body(chat: bool) -> bytes:
    created = int(time.time())
    usage = {
        "prompt_tokens": 12,
        "total_tokens": 28,
        "completion_tokens": 16,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    if chat:
        choice: dict[str, object] = {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": " the quick brown fox jumps over",
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "token_ids": None,
            "routed_experts": None,
        }
        obj = "chat.completion"
        rid = "chatcmpl-0123456789abcdef"
    else:
        choice = {
            "index": 0,
            "text": " the quick brown fox jumps over",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "token_ids": None,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "routed_experts": None,
        }
        obj = "text_completion"
        rid = "cmpl-0123456789abcdef"
    payload = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": ADAPTER,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": "vllm-0.32.0-bench",
        "usage": usage,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def _stream_response(chat: bool) -> bytes:
    created = int(time.time())
    events: list[bytes] = []
    for i in range(STREAM_EVENTS):
        last = i == STREAM_EVENTS - 1
        if chat:
            ev: dict[str, object] = {
                "id": "chatcmpl-0123456789abcdef",
                "object": "chat.completion.chunk",
                "created": created,
                "model": ADAPTER,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": f" tok{i}"},
                        "logprobs": None,
                        "finish_reason": "length" if last else None,
                        "token_ids": None,
                    }
                ],
            }
        else:
            ev = {
                "id": "cmpl-0123456789abcdef",
                "object": "text_completion",
                "created": created,
                "model": ADAPTER,
                "choices": [
                    {
                        "index": 0,
                        "text": f" tok{i}",
                        "logprobs": None,
                        "finish_reason": "length" if last else None,
                        "stop_reason": None,
                        "prompt_token_ids": None,
                        "token_ids": None,
                    }
                ],
            }
        events.append(json.dumps(ev, separators=(",", ":")).encode())
    usage = {
        "id": "cmpl-0123456789abcdef",
        "object": "text_completion",
        "created": created,
        "model": ADAPTER,
        "choices": [],
        "usage": {"prompt_tokens": 12, "total_tokens": 20, "completion_tokens": 8},
    }
    events.append(json.dumps(usage, separators=(",", ":")).encode())
    events.append(b"[DONE]")
    out = [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    ]
    for data in events:
        frame = b"data: " + data + b"\n\n"
        out.append(b"%x\r\n%s\r\n" % (len(frame), frame))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def _metrics_page() -> bytes:
    labels = f'engine="0",model_name="{BASE_MODEL}"'
    now = time.time()
    lines = [
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{labels}}} 0.0",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{labels}}} 0.0",
        "# TYPE vllm:num_requests_waiting_by_reason gauge",
        f'vllm:num_requests_waiting_by_reason{{{labels},reason="capacity"}} 0.0',
        f'vllm:num_requests_waiting_by_reason{{{labels},reason="deferred"}} 0.0',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{labels}}} 0.0",
        "# TYPE vllm:lora_requests_info gauge",
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="",'
        f'waiting_lora_adapters=""}} {now!r}',
    ]
    return ("\n".join(lines) + "\n").encode()


def _models_body() -> bytes:
    created = int(time.time())
    data = [
        {
            "id": BASE_MODEL,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": BASE_MODEL,
            "parent": None,
            "max_model_len": 4096,
        },
        {
            "id": ADAPTER,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": "/bench/" + ADAPTER,
            "parent": BASE_MODEL,
            "max_model_len": None,
        },
    ]
    return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()


class _Answers:
    """Every response, precomputed."""

    def __init__(self) -> None:
        self.completion = _response("200 OK", "application/json", _completion_body(False))
        self.chat = _response("200 OK", "application/json", _completion_body(True))
        self.completion_stream = _stream_response(False)
        self.chat_stream = _stream_response(True)
        self.health = _response("200 OK", None, b"")
        self.models = _response("200 OK", "application/json", _models_body())
        self.loaded = _response(
            "200 OK", "text/plain; charset=utf-8", b"Success: LoRA adapter added successfully."
        )
        self.not_found = _response("404 Not Found", "application/json", b'{"detail":"Not Found"}')

    def metrics(self) -> bytes:  # the lora_requests_info timestamp moves, like vLLM's
        return _response("200 OK", "text/plain; version=1.0.0; charset=utf-8", _metrics_page())


class _Server(asyncio.Protocol):
    __slots__ = ("_answers", "_buf", "_transport")

    def __init__(self, answers: _Answers) -> None:
        self._answers = answers
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        answers = self._answers
        out: list[bytes] = []
        while True:
            end = buf.find(_HEAD_END)
            if end < 0:
                break
            head = buf[:end]
            length = 0
            i = head.find(b"\r\nContent-Length:")
            if i < 0:
                i = head.lower().find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17 : j if j >= 0 else len(head)])
            stop = end + 4 + length
            if len(buf) < stop:
                break
            body = buf[end + 4 : stop]
            buf = buf[stop:]
            path = head[head.find(b" ") + 1 : head.find(b" HTTP/")]
            if head.startswith(b"POST "):
                stream = b'"stream":true' in body or b'"stream": true' in body
                if path == b"/v1/completions":
                    out.append(answers.completion_stream if stream else answers.completion)
                elif path == b"/v1/chat/completions":
                    out.append(answers.chat_stream if stream else answers.chat)
                elif path == b"/v1/load_lora_adapter":
                    out.append(answers.loaded)
                else:
                    out.append(answers.not_found)
            elif path == b"/health":
                out.append(answers.health)
            elif path == b"/metrics":
                out.append(answers.metrics())
            elif path == b"/v1/models":
                out.append(answers.models)
            else:
                out.append(answers.not_found)
        self._buf = buf
        if out and self._transport is not None:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))


async def serve(replicas: int, *, watch_stdin: bool = False) -> None:
    loop = asyncio.get_running_loop()
    answers = _Answers()
    servers = [
        await loop.create_server(lambda: _Server(answers), "127.0.0.1", 0, backlog=1024)
        for _ in range(replicas)
    ]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print("PORTS " + " ".join(map(str, ports)), flush=True)
    await wait_for_stop(watch_stdin)
    for s in servers:
        s.close()


async def wait_for_stop(watch_stdin: bool) -> None:
    """Until SIGINT/SIGTERM, or (``watch_stdin``) until stdin closes: the bench holds our
    stdin, so when it goes away, even killed, we stop too."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if watch_stdin:
        fd = sys.stdin.fileno()

        def on_stdin() -> None:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                stop.set()

        loop.add_reader(fd, on_stdin)
    await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2, help="ports to listen on")
    parser.add_argument("--watch-stdin", action="store_true", help="stop when stdin closes")
    args = parser.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve(args.replicas, watch_stdin=args.watch_stdin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
