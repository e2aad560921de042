"""Response bodies and SSE chunks of vLLM 0.32's OpenAI-compatible API, field for field.

Key order and the set of ``null`` fields follow ``shared/design/vllm-0.32/transcript_basic.md``.
JSON is compact (``separators=(",", ":")``) and UTF-8, as pydantic's ``model_dump_json`` writes.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

VLLM_VERSION = "0.32.0"
SYSTEM_FINGERPRINT = "vllm-0.32.0-3216f9d5"  # as recorded
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
SSE_DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def new_id(kind: str, base: str | None = None) -> str:
    """``cmpl-<16 hex>`` or ``chatcmpl-<16 hex>``; vLLM uses an ``X-Request-Id`` as ``base``."""
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return f"{prefix}-{base or secrets.token_hex(8)}"


def now_unix() -> int:
    return int(time.time())


@dataclass(frozen=True, slots=True, kw_only=True)
class ChoiceResult:
    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: dict[str, Any] | None = None
    prompt_logprobs: list[Any] | None = None  # completions with echo and logprobs


def _usage(prompt_tokens: int, completion_tokens: int, *, details: bool) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if details:
        usage["prompt_tokens_details"] = None
        usage["completion_tokens_details"] = None
    return usage


def running_usage(kind: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The usage every chunk of a stream carries with ``stream_options.continuous_usage_stats``
    (and ``include_usage``): its choice's prompt and the tokens it sent so far. vLLM 0.32 sets
    chat's ``completion_tokens_details`` (to null) and leaves it out on completions."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if kind == "chat":
        usage["completion_tokens_details"] = None
    return usage


def with_usage(chunk: dict[str, Any], usage: dict[str, Any] | None) -> dict[str, Any]:
    """``chunk`` with ``usage`` after its ``choices`` (the stream response's field order)."""
    if usage is None:
        return chunk
    out: dict[str, Any] = {}
    for key, value in chunk.items():
        out[key] = value
        if key == "choices":
            out["usage"] = usage
    return out


def completion_body(
    *, request_id: str, created: int, model: str, choices: list[ChoiceResult], prompt_tokens: int
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": c.prompt_logprobs,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
            for c in choices
        ],
        "service_tier": None,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": _usage(prompt_tokens, sum(c.completion_tokens for c in choices), details=True),
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def chat_body(
    *,
    request_id: str,
    created: int,
    model: str,
    choices: list[ChoiceResult],
    prompt_tokens: int,
    role: str = "assistant",
    prompt_logprobs: list[Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": {
                    "role": role,
                    "content": c.text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
                "stop_reason": None,
                "token_ids": None,
                "routed_experts": None,
            }
            for c in choices
        ],
        "service_tier": None,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": _usage(prompt_tokens, sum(c.completion_tokens for c in choices), details=True),
        "prompt_logprobs": prompt_logprobs,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def completion_chunk(
    *,
    request_id: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None,
    prompt_token_ids: list[int] | None = None,
    fingerprint: bool = False,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One chunk of a completion stream. ``prompt_token_ids`` rides on a choice's first chunk
    when ``echo`` is on; ``fingerprint`` marks a choice's terminal chunk of a stream without
    a usage chunk (vLLM 0.32: ``completion/serving.py``, "Stamp on terminal chunk only when no
    trailing usage chunk will follow"; chat does the same)."""
    choice: dict[str, Any] = {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": None,
        "prompt_token_ids": prompt_token_ids,
        "token_ids": None,
    }
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if fingerprint:
        chunk["system_fingerprint"] = SYSTEM_FINGERPRINT
    return chunk


def chat_role_chunk(
    *, request_id: str, created: int, model: str, index: int, role: str = "assistant"
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "delta": {"role": role, "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "prompt_token_ids": None,
        "prompt_text": None,
    }


def chat_echo_chunk(
    *, request_id: str, created: int, model: str, index: int, text: str
) -> dict[str, Any]:
    """The chunk of a chat stream with ``echo`` that repeats the last message's content (after
    the role chunks, before any token; no ``token_ids`` key, as vLLM leaves it unset)."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        ],
    }


def chat_chunk(
    *,
    request_id: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None,
    fingerprint: bool = False,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "delta": {"content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        choice["stop_reason"] = None
    choice["token_ids"] = None
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if fingerprint:
        chunk["system_fingerprint"] = SYSTEM_FINGERPRINT
    return chunk


def usage_chunk(
    *,
    kind: str,
    request_id: str,
    created: int,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """The final ``stream_options.include_usage`` chunk: empty ``choices`` and the usage."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": _usage(prompt_tokens, completion_tokens, details=False),
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def model_card(
    *,
    model_id: str,
    created: int,
    root: str,
    parent: str | None,
    max_model_len: int | None,
    permission_id: str | None = None,
) -> dict[str, Any]:
    """One ``/v1/models`` entry as vLLM 0.32 writes it; the permission id is drawn fresh, as
    vLLM draws it on every answer, unless ``permission_id`` is given."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": permission_id or f"modelperm-{secrets.token_hex(8)}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


_TEXT_SENTINEL = "@@loragate-token-text@@"
_SENTINEL_JSON = dumps(_TEXT_SENTINEL)


class TokenChunkEncoder:
    """Fast SSE encoding of the many mid-stream token chunks of one response.

    Every non-final token chunk of a choice is the same JSON except for its text, so the bytes
    around the text are rendered once per choice index and reused (identical output to
    ``sse(completion_chunk(...))`` / ``sse(chat_chunk(...))`` with ``finish_reason=None``).
    """

    __slots__ = ("_build", "_cache", "_created", "_model", "_request_id")

    def __init__(self, *, kind: str, request_id: str, created: int, model: str) -> None:
        self._build = chat_chunk if kind == "chat" else completion_chunk
        self._request_id = request_id
        self._created = created
        self._model = model
        self._cache: dict[int, tuple[bytes, bytes]] = {}

    def token(
        self,
        index: int,
        text: str,
        usage: dict[str, Any] | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        if usage is not None or logprobs is not None:  # no two chunks alike
            return self.final(index, text, None, fingerprint=False, usage=usage, logprobs=logprobs)
        parts = self._cache.get(index)
        if parts is None:
            chunk = self._build(
                request_id=self._request_id,
                created=self._created,
                model=self._model,
                index=index,
                text=_TEXT_SENTINEL,
                finish_reason=None,
            )
            prefix, _, suffix = sse(chunk).partition(_SENTINEL_JSON)
            parts = self._cache[index] = (prefix, suffix)
        return parts[0] + dumps(text) + parts[1]

    def final(
        self,
        index: int,
        text: str,
        finish_reason: str | None,
        *,
        fingerprint: bool,
        usage: dict[str, Any] | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        chunk = self._build(
            request_id=self._request_id,
            created=self._created,
            model=self._model,
            index=index,
            text=text,
            finish_reason=finish_reason,
            fingerprint=fingerprint,
            logprobs=logprobs,
        )
        return sse(with_usage(chunk, usage))
