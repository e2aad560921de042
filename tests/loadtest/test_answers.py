"""How the load test reads one answer and sums estimated token counts (pure parts)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from loragate.loadtest.answers import (
    StreamReading,
    TokensSource,
    completion_tokens,
    error_message,
    read_json,
)
from loragate.loadtest.openloop import RequestResult
from loragate.loadtest.summary import format_text, summarise


def line(event: dict[str, Any] | str) -> bytes:
    payload = event if isinstance(event, str) else json.dumps(event)
    return f"data: {payload}\n".encode()


def read(*events: dict[str, Any] | str) -> StreamReading:
    """A stream of ``events`` read at times 1, 2, 3... after a start at 0."""
    stream = StreamReading(started=0.0)
    for t, event in enumerate(events, start=1):
        if not stream.feed(line(event), float(t)):
            break
    stream.end()
    return stream


def test_usage_is_the_completion_tokens_it_states() -> None:
    assert completion_tokens({"completion_tokens": 7}) == 7
    assert completion_tokens({"completion_tokens": 0}) == 0
    for usage in (None, {}, {"completion_tokens": None}, {"completion_tokens": True},
                  {"completion_tokens": -1}, {"completion_tokens": "7"}, [7]):  # fmt: skip
        assert completion_tokens(usage) is None, usage


def test_a_chat_stream_counts_from_its_first_content_not_its_role_chunk() -> None:
    stream = read(
        {"choices": []},  # e.g. Azure's prompt_filter_results chunk
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "a"}}]},
        {"choices": [{"delta": {"reasoning_content": "b"}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},  # OpenAI's last chunk: no token
        "[DONE]",
    )
    assert (stream.error, stream.first_output_s, stream.finish_reason) == (None, 3.0, "stop")
    assert stream.tokens() == (3, "chunks")


def test_usage_wins_over_chunks_even_when_it_says_zero() -> None:
    stream = read(
        {"choices": [{"text": "", "finish_reason": "stop"}], "usage": None},
        {"choices": [], "usage": {"completion_tokens": 0}},
        "[DONE]",
    )
    assert stream.error is None
    assert stream.first_output_s is None
    assert stream.tokens() == (0, "usage")


@pytest.mark.parametrize(
    ("events", "error_type", "error"),
    [
        (["[DONE]"], "protocol", "stream ended before any output or finish reason"),
        ([{"choices": [{"text": "a"}]}], "protocol", "stream ended without [DONE] or a finish"),
        ([{"error": {"message": "boom"}}], "stream_error", "boom"),
        ([{"choices": [{"text": "", "finish_reason": "abort"}]}, "[DONE]"], "aborted", "abort"),
    ],
)
def test_streams_that_fail(events: list[Any], error_type: str, error: str) -> None:
    stream = read(*events)
    assert stream.error_type == error_type
    assert stream.error is not None and error in stream.error


def test_a_stream_with_a_finish_reason_but_no_done_is_complete() -> None:
    stream = read({"choices": [{"text": "a", "finish_reason": "length"}]})
    assert stream.error is None
    assert stream.tokens() == (1, "chunks")


def test_json_answers() -> None:
    with_usage = read_json(b'{"choices": [{"text": "a b", "finish_reason": "length"}], '
                           b'"usage": {"completion_tokens": 9}}')  # fmt: skip
    assert (with_usage.output_tokens, with_usage.tokens_source) == (9, "usage")
    chat = read_json(b'{"choices": [{"message": {"content": "one two three"}}]}')
    assert (chat.output_tokens, chat.tokens_source, chat.error) == (3, "words", None)
    aborted = read_json(b'{"choices": [{"text": "", "finish_reason": "abort"}]}')
    assert aborted.error_type == "aborted"
    refused = read_json(b'{"error": {"message": "nope"}}')
    assert (refused.error_type, refused.error) == ("answer_error", "nope")
    for body in (b"[]", b'{"choices": []}', b"not json"):
        with pytest.raises(ValueError):
            read_json(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "m", "type": "t", "param": null, "code": 400}}', "m"),  # OpenAI
        (
            b'{"error": "Input validation error", "error_type": "validation"}',
            "Input validation error",
        ),
        (b'{"object": "error", "message": "old vLLM", "code": 400}', "old vLLM"),
        (b'{"error": {"code": 1}}', None),
        (b"[1]", None),
        (b"<html>Bad Gateway</html>", None),
    ],
)
def test_error_messages_of_several_servers(body: bytes, message: str | None) -> None:
    assert error_message(body) == message


def _ok(
    i: int, tokens: int, source: TokensSource, *, streamed: bool = True, finish: str = "length"
) -> RequestResult:
    return RequestResult(
        index=i, adapter=None, endpoint="/completions", scheduled_s=0.0, sent_s=0.0, status=200,
        ttft_s=0.01, latency_s=0.1, output_tokens=tokens, tokens_source=source,
        streamed=streamed, finish_reason=finish, model="m",
    )  # fmt: skip


def test_the_summary_says_which_tokens_are_estimated() -> None:
    results = [_ok(0, 10, "usage"), _ok(1, 3, "chunks", finish="stop"), _ok(2, 4, "words",
               streamed=False)]  # fmt: skip
    failed = dataclasses.replace(_ok(3, 5, "chunks"), error="x", error_type="protocol")
    s = summarise([*results, failed], spec_rps=1.0, window_s=1.0, elapsed_s=1.0)
    assert s["output_tokens"] == 17  # successful requests only
    assert s["output_tokens_by_source"] == {"chunks": 3, "usage": 10, "words": 4}
    assert s["answers"] == {
        "streamed": 2,
        "json": 1,
        "without_usage": 2,
        "finish_reasons": {"length": 2, "stop": 1},
    }
    text = format_text(s)
    assert (
        "17 output tokens, 17.0 tok/s (2 of 3 answers sent no usage: 3 counted as content "
        "chunks, 4 counted as words, an estimate)"
    ) in text
    assert "finished  length 2, stop 1" in text
    plain = format_text(summarise(results[:1], spec_rps=1.0, window_s=1.0, elapsed_s=1.0))
    assert "no usage" not in plain
    assert "finished" not in plain  # every answer ran to max_tokens
