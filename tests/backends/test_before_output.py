"""engine_failures.before_output: what the proxy holds before a stream's first output (the
events vLLM sends before a request produced anything) and what it relays at once (anything
else, so that no output waits: tokens, finish reasons, tool calls, reasoning, error events,
and what it cannot read)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loragate.backends.engine_failures import (
    ABORTED_UNANSWERED_MESSAGE,
    ENGINE_DEAD_UNANSWERED_MESSAGE,
    NOTHING_YET,
    OUTPUT,
    UNANSWERED_MESSAGE,
    before_output,
    read_before_output,
)


def _event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    doc = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + json.dumps({**doc, "choices": choices, **extra}).encode() + b"\n\n"


def _delta(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}


def _text(text: str, reason: str | None = None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
            "stop_reason": None}  # fmt: skip


_ROLE = _event([_delta({"role": "assistant", "content": ""})])
_USAGE = _event([], usage={"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4})


@pytest.mark.parametrize(
    ("lines", "said"),
    [
        (_ROLE, NOTHING_YET),
        (_USAGE, NOTHING_YET),
        (_event([_text("")]), NOTHING_YET),
        (b": keep-alive\n\n", NOTHING_YET),
        (_ROLE + _USAGE, NOTHING_YET),
        (b"data: [DONE]\n\n", UNANSWERED_MESSAGE),
        (_ROLE + _USAGE + b"data: [DONE]\n\n", UNANSWERED_MESSAGE),
        (_event([_text("", "abort")]), ABORTED_UNANSWERED_MESSAGE),
        (_ROLE + _event([_delta({}, "abort")]), ABORTED_UNANSWERED_MESSAGE),
        (_event([_text(" a")]), OUTPUT),
        (_ROLE + _event([_delta({"content": "a"})]), OUTPUT),
        (_event([_text(" abort", "abort")]), OUTPUT),  # partial text, then the abort
        (_event([_text("", "stop")]), OUTPUT),  # a finish reason is an answer
        (_event([_text("", "length")]), OUTPUT),
        (_event([_delta({"tool_calls": [{"index": 0, "function": {"name": "f"}}]})]), OUTPUT),
        (_event([_delta({"reasoning_content": "hmm"})]), OUTPUT),
        (_event([_text("", None) | {"prompt_token_ids": [1, 2]}]), OUTPUT),
        (b'data: {"error": {"message": "The prompt is too long"}}\n\n', OUTPUT),
        (b'data: {"error": "The engine stopped"}\n\n', OUTPUT),  # not vLLM's shape
        (b'data: {"error": {not json\n\n', OUTPUT),
        (b"data: {not json\n\n", OUTPUT),
        (b"event: x\n", OUTPUT),
        (_event([_text(" data: [DONE]")]), OUTPUT),  # a token's text is no end
    ],
)
def test_before_output(lines: bytes, said: str | None) -> None:
    assert before_output(lines) == said


_VLLM_DEAD = (
    "EngineCore encountered an issue. See stack trace (above) for the root cause.",
    "InternalServerError",
)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            b"data: "
            + json.dumps(
                {
                    "error": {
                        "message": _VLLM_DEAD[0],
                        "type": _VLLM_DEAD[1],
                        "param": None,
                        "code": 500,
                    }
                }
            ).encode()
            + b"\n\n",
            _VLLM_DEAD[0],
        ),
        (
            _ROLE + b'data: {"error":{"message":"The engine stopped: shutting down"}}\n\n',
            "The engine stopped: shutting down",
        ),
    ],
)
def test_the_engines_error_event_before_any_output_says_it_stopped(
    lines: bytes, message: str
) -> None:
    # vLLM's EngineDeadError in a stream (the simulated replica's words too): nothing of the
    # request's output was made, as with [DONE] alone.
    assert before_output(lines) == f"{ENGINE_DEAD_UNANSWERED_MESSAGE}: {message}"


@pytest.mark.parametrize(
    ("lines", "read"),
    [
        (_ROLE, (NOTHING_YET, len(_ROLE), False)),
        # A token: the reading stops after its line (before the blank line ending its event),
        # which was an answer.
        (
            _ROLE + _event([_text(" a")]) + _USAGE,
            (OUTPUT, len(_ROLE) + len(_event([_text(" a")])) - 1, True),
        ),
        # Anything else decides at the start of its line (the relay's checks read it again).
        (_ROLE + _event([_text(" a", "abort")]), (OUTPUT, len(_ROLE), False)),
        (_ROLE + b"data: [DONE]\n\n", (UNANSWERED_MESSAGE, len(_ROLE), False)),
        (_USAGE + b'data: {"error": {}}\n\n', (OUTPUT, len(_USAGE), False)),
    ],
)
def test_where_the_reading_before_output_stops(
    lines: bytes, read: tuple[str | None, int, bool]
) -> None:
    assert read_before_output(lines) == read
