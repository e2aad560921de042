"""Parsing ``/v1/completions`` and ``/v1/chat/completions`` bodies as vLLM 0.32 validates them.

Type errors become pydantic-style 400s (see ``vllm_errors``); value errors use vLLM's wording.
Only the fields that change what the simulated replica does are interpreted; every other
OpenAI/vLLM field is accepted and ignored (sampling parameters only change synthetic text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from loragate.twin.synthetic_text import chat_prompt_tokens, completion_prompt_tokens
from loragate.twin.vllm_errors import FieldError, VllmApiError, bad_request, validation_error

Kind = Literal["completion", "chat"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptSpec:
    """One prompt of a request: its token count and a key for reproducible output."""

    prompt_tokens: int
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    kind: Kind
    model: str | None
    prompts: tuple[PromptSpec, ...]
    n: int
    max_tokens: int | None
    min_tokens: int
    ignore_eos: bool
    greedy: bool
    seed: int | None
    stream: bool
    include_usage: bool


class _Fields:
    """Collects pydantic-style errors while reading fields of one body."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body
        self.errors: list[FieldError] = []

    def _err(self, field: str, kind: str, msg: str, value: Any) -> None:
        self.errors.append(FieldError(kind=kind, loc=("body", field), msg=msg, input=value))

    def int_(self, field: str, default: int | None) -> int | None:
        value = self.body.get(field)
        if value is None:
            return default
        if isinstance(value, bool) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                self._err(
                    field,
                    "int_parsing",
                    "Input should be a valid integer, unable to parse string as an integer",
                    value,
                )
                return default
        self._err(field, "int_type", "Input should be a valid integer", value)
        return default

    def float_(self, field: str, default: float | None) -> float | None:
        value = self.body.get(field)
        if value is None:
            return default
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                self._err(
                    field,
                    "float_parsing",
                    "Input should be a valid number, unable to parse string as a number",
                    value,
                )
                return default
        self._err(field, "float_type", "Input should be a valid number", value)
        return default

    def bool_(self, field: str, default: bool) -> bool:
        value = self.body.get(field)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOL_STRINGS:
            return _BOOL_STRINGS[value.strip().lower()]
        self._err(field, "bool_parsing", "Input should be a valid boolean", value)
        return default

    def str_(self, field: str) -> str | None:
        value = self.body.get(field)
        if value is None or isinstance(value, str):
            return value
        self._err(field, "string_type", "Input should be a valid string", value)
        return None


_BOOL_STRINGS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def parse_generation_request(kind: Kind, body: Mapping[str, Any]) -> GenerationRequest:
    """Validate a completions or chat body; raises ``VllmApiError`` (400) when invalid."""
    f = _Fields(body)
    model = f.str_("model")
    if kind == "completion":
        prompts = _completion_prompts(f)
        max_tokens = f.int_("max_tokens", None)
    else:
        prompts = _chat_prompts(f)
        max_tokens = f.int_("max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = f.int_("max_tokens", None)
    n = f.int_("n", 1)
    min_tokens = f.int_("min_tokens", 0)
    temperature = f.float_("temperature", None)
    seed = f.int_("seed", None)
    ignore_eos = f.bool_("ignore_eos", False)
    stream = f.bool_("stream", False)
    include_usage = _include_usage(f)
    if f.errors:
        raise validation_error(f.errors)
    if "stream_options" in body and body["stream_options"] is not None and not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.")
    assert n is not None and min_tokens is not None
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}.")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.")
    if min_tokens < 0:
        raise bad_request(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}."
        )
    assert prompts is not None
    return GenerationRequest(
        kind=kind,
        model=model,
        prompts=prompts,
        n=n,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        greedy=temperature is not None and temperature == 0.0,
        seed=seed,
        stream=stream,
        include_usage=include_usage,
    )


def _include_usage(f: _Fields) -> bool:
    options = f.body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, Mapping):
        f.errors.append(
            FieldError(
                kind="model_type",
                loc=("body", "stream_options"),
                msg="Input should be a valid dictionary or instance of StreamOptions",
                input=options,
            )
        )
        return False
    return _Fields(options).bool_("include_usage", False)


def _completion_prompts(f: _Fields) -> tuple[PromptSpec, ...] | None:
    prompt = f.body.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise validation_error(
            [
                FieldError(
                    kind="value_error",
                    loc=("body",),
                    msg="Value error, Either prompt or prompt_embeds must be provided and "
                    "non-empty.",
                    input=dict(f.body),
                )
            ]
        )
    if isinstance(prompt, str):
        return (PromptSpec(prompt_tokens=completion_prompt_tokens(prompt), key=prompt),)
    if isinstance(prompt, list):
        if all(_is_token_id(t) for t in prompt):
            return (PromptSpec(prompt_tokens=len(prompt), key=json.dumps(prompt)),)
        if all(isinstance(p, str) for p in prompt):
            return tuple(
                PromptSpec(prompt_tokens=completion_prompt_tokens(p), key=p) for p in prompt
            )
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
            return tuple(PromptSpec(prompt_tokens=len(p), key=json.dumps(p)) for p in prompt)
    f.errors.append(
        FieldError(
            kind="union_type",
            loc=("body", "prompt"),
            msg="Input should be a string, a list of strings, a list of token ids or a list "
            "of lists of token ids",
            input=prompt,
        )
    )
    return None


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _chat_prompts(f: _Fields) -> tuple[PromptSpec, ...] | None:
    messages = f.body.get("messages")
    if messages is None:
        f.errors.append(
            FieldError(kind="missing", loc=("body", "messages"), msg="Field required", input=f.body)
        )
        return None
    if not isinstance(messages, list):
        f.errors.append(
            FieldError(
                kind="list_type",
                loc=("body", "messages"),
                msg="Input should be a valid list",
                input=messages,
            )
        )
        return None
    texts: list[str] = []
    for i, message in enumerate(messages):
        text = _message_text(f, i, message)
        if text is not None:
            texts.append(text)
    if f.errors:
        return None
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return (PromptSpec(prompt_tokens=chat_prompt_tokens(texts), key=key),)


def _message_text(f: _Fields, index: int, message: Any) -> str | None:
    loc: tuple[str | int, ...] = ("body", "messages", index)
    if not isinstance(message, Mapping):
        f.errors.append(
            FieldError(
                kind="model_type", loc=loc, msg="Input should be a valid dictionary", input=message
            )
        )
        return None
    if not isinstance(message.get("role"), str):
        f.errors.append(
            FieldError(kind="missing", loc=(*loc, "role"), msg="Field required", input=message)
        )
        return None
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        ]
        return "".join(parts)
    f.errors.append(
        FieldError(
            kind="string_type",
            loc=(*loc, "content"),
            msg="Input should be a valid string",
            input=content,
        )
    )
    return None


def resolve_max_tokens(
    kind: Kind, spec: PromptSpec, max_tokens: int | None, max_model_len: int
) -> int:
    """vLLM's context-length checks; the default ``max_tokens`` fills the context window."""
    prompt = spec.prompt_tokens
    if prompt >= max_model_len or (max_tokens is None and prompt + 1 > max_model_len):
        raise VllmApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {prompt} input tokens. Please reduce the length of the input "
            "messages.",
            "BadRequestError",
            "messages" if kind == "chat" else "prompt",
        )
    if max_tokens is None:
        return max_model_len - prompt
    if prompt + max_tokens > max_model_len:
        raise VllmApiError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"maximum context length is {max_model_len} tokens and your request has {prompt} "
            f"input tokens ({max_tokens} > {max_model_len} - {prompt}).",
            "BadRequestError",
            "max_tokens",
        )
    return max_tokens
