"""Reading one answer of an OpenAI-compatible server, streamed or not, as the load test counts it.

A stream (``data:`` lines of JSON chunks, then ``data: [DONE]``) gives the time of its first
output: the first chunk whose choice carries text, content, reasoning or a tool call (a chat's
role chunk ``{"delta": {"role": "assistant", "content": ""}}`` carries none, and some servers
send it before generating anything). A JSON answer (``stream: false``, or a server that ignores
``stream``) has no first-output time.

Output tokens are ``usage.completion_tokens`` when the server sends usage (vLLM does when asked
with ``stream_options.include_usage``; not every OpenAI-compatible server does). Without usage
they are estimated (``tokens_source``): in a stream, the chunks that carried output (vLLM sends
one token per chunk; a server that puts several tokens in a chunk counts fewer), in a JSON
answer the whitespace-separated words of its text (a tokenizer counts more).

An answer fails when an event carries an ``error`` (``stream_error``; a JSON answer:
``answer_error``), a choice finishes with
``abort`` or ``error`` (``aborted``: vLLM's answer to a request it stopped), or a stream ends
without [DONE] or a finish reason (cut short), or with neither output nor a finish reason
(``protocol``). JSON that is not an object, or not the answer's shape, raises ``ValueError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

TokensSource = Literal["usage", "chunks", "words", "none"]

# Finish reasons of a request the server stopped instead of finishing (vLLM's).
FAILED_FINISH_REASONS = frozenset({"abort", "error"})

# Delta fields that carry generated output (chat): text, reasoning, a refusal.
_DELTA_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


@dataclass(slots=True)
class StreamReading:
    """What one stream has said so far; :meth:`feed` every line, then :meth:`end`."""

    started: float  # the clock's time when the request was sent
    first_output_s: float | None = None  # seconds from ``started`` to the first output
    usage_tokens: int | None = None  # the last ``usage.completion_tokens`` seen
    output_chunks: int = 0  # choices in chunks that carried output
    finish_reason: str | None = None
    done: bool = False  # ``data: [DONE]`` seen
    error: str | None = None
    error_type: str | None = None

    def feed(self, line: bytes, now: float) -> bool:
        """Read one line received at ``now``; False once the stream has said all it will
        ([DONE] or an error event)."""
        line = line.strip()
        if not line.startswith(b"data:"):
            return True  # blank lines, comments, ``event:`` fields
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return False
        event = json.loads(payload)
        if not isinstance(event, dict):
            raise ValueError(f"an SSE event that is not an object: {payload[:80]!r}")
        if event.get("error") is not None:
            self.error, self.error_type = _error_text(event["error"]), "stream_error"
            return False
        tokens = completion_tokens(event.get("usage"))
        if tokens is not None:
            self.usage_tokens = tokens
        for choice in _choices(event):
            if _chunk_output(choice):
                self.output_chunks += 1
                if self.first_output_s is None:
                    self.first_output_s = now - self.started
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self.finish_reason = reason
        return True

    def end(self) -> None:
        """Judge the stream once its body has ended (or [DONE] came)."""
        if self.error is not None:
            return
        if self.finish_reason in FAILED_FINISH_REASONS:
            self.error = f"the server stopped the request (finish_reason {self.finish_reason})"
            self.error_type = "aborted"
        elif not self.done and self.finish_reason is None:
            self.error = "stream ended without [DONE] or a finish reason (cut short)"
            self.error_type = "protocol"
        elif self.finish_reason is None and self.output_chunks == 0 and not self.usage_tokens:
            self.error = "stream ended before any output or finish reason"
            self.error_type = "protocol"

    def tokens(self) -> tuple[int, TokensSource]:
        """Output tokens and where they come from."""
        if self.usage_tokens is not None:
            return self.usage_tokens, "usage"
        return self.output_chunks, "chunks"


@dataclass(frozen=True, slots=True, kw_only=True)
class JsonReading:
    """What one JSON (non-streamed) answer said."""

    output_tokens: int
    tokens_source: TokensSource
    finish_reason: str | None
    error: str | None = None
    error_type: str | None = None


def read_json(body: bytes) -> JsonReading:
    """Read a completion or chat completion answered as one JSON object."""
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError(f"an answer that is not a JSON object: {body[:80]!r}")
    if doc.get("error") is not None:
        return JsonReading(
            output_tokens=0,
            tokens_source="none",
            finish_reason=None,
            error=_error_text(doc["error"]),
            error_type="answer_error",
        )
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"an answer without choices: {body[:80]!r}")
    reasons = [c.get("finish_reason") for c in _choices(doc)]
    reason = next((r for r in reasons if isinstance(r, str) and r), None)
    tokens = completion_tokens(doc.get("usage"))
    source: TokensSource = "usage"
    if tokens is None:
        tokens = sum(len(_answer_text(c).split()) for c in _choices(doc))
        source = "words"
    if reason in FAILED_FINISH_REASONS:
        return JsonReading(
            output_tokens=tokens,
            tokens_source=source,
            finish_reason=reason,
            error=f"the server stopped the request (finish_reason {reason})",
            error_type="aborted",
        )
    return JsonReading(output_tokens=tokens, tokens_source=source, finish_reason=reason)


def completion_tokens(usage: object) -> int | None:
    """``usage.completion_tokens`` when ``usage`` states it (OpenAI sends ``"usage": null`` in
    every chunk but the last), else None."""
    if not isinstance(usage, dict):
        return None
    tokens = usage.get("completion_tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        return None
    return tokens


def _choices(doc: dict[str, Any]) -> list[dict[str, Any]]:
    choices = doc.get("choices")
    if not isinstance(choices, list):
        return []
    return [c for c in choices if isinstance(c, dict)]


def _chunk_output(choice: dict[str, Any]) -> bool:
    """Whether a streamed choice carries generated output."""
    text = choice.get("text")
    if isinstance(text, str) and text:
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    if any(isinstance(delta.get(k), str) and delta[k] for k in _DELTA_TEXT_FIELDS):
        return True
    return bool(delta.get("tool_calls") or delta.get("function_call"))


def _answer_text(choice: dict[str, Any]) -> str:
    """A JSON answer's generated text: a completion's ``text``, a chat message's content."""
    text = choice.get("text")
    if isinstance(text, str):
        return text
    message = choice.get("message")
    if not isinstance(message, dict):
        return ""
    parts = [message.get(k) for k in _DELTA_TEXT_FIELDS]
    return " ".join(p for p in parts if isinstance(p, str))


def _error_text(err: object) -> str:
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


def error_message(body: bytes) -> str | None:
    """The message of an error answer: OpenAI's ``{"error": {"message"}}``, a plain
    ``{"error": "..."}`` (Hugging Face TGI) or ``{"message": "..."}`` (vLLM before 0.6); None
    when the body is none of these."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    err = doc.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])
    if isinstance(err, str):
        return err
    message = doc.get("message")
    return message if isinstance(message, str) else None
